"""``LowRankLinear``: the one module that replaces ``nn.Linear`` or GPT-2's ``Conv1D``.

Storage modes:
- ``factored``: ``left`` (out, r) and ``right`` (r, in); ``y = (x @ rightᵀ) @ leftᵀ + bias``.
  Never materialises the dense weight in ``forward``.
- ``dense``: ``weight`` (out, in) holding the rank-r product (SVD as denoising; saves nothing).
- ``pivoted`` (PIFA, :func:`svdcompress.linalg.pivot_factors`): the same rank-r product as
  ``factored`` in r·(out + in − r) numbers: ``left`` (out, r), ``coupling`` (r, in − r) and an int64
  buffer ``permutation`` (in,) of input columns, the r pivot columns first;
  ``y = (x_pivot + x_rest @ couplingᵀ) @ leftᵀ + bias``. Every rank below full rank saves numbers.

Integer factors (``quant_bits=8``): each stored matrix ``M`` becomes int8 codes ``M_q`` and a float32
scale per row, ``M ≈ M_q · M_scale[:, None]`` (buffers ``left_q``/``left_scale`` (out,),
``right_q``/``right_scale`` (r,), or ``weight_q``/``weight_scale`` (out,) for dense storage).
Per row is per output channel of each of the two matmuls the module performs: for ``left`` that is
per output feature, for ``right`` per singular direction. Splitting √σ to both factors (linalg)
keeps the rows of each factor on comparable scales, so one scale per row loses little; a row scale
also commutes with the matmul, so kernels apply it to the outputs and never build the float matrix
(see :mod:`svdcompress.runtime`, selected per module by ``kernel``).

The module remembers the layout it replaced (``linear`` or ``conv1d``) so ``to_dense`` gives back
the original type and stock transformers can load an exported checkpoint. Layout ``embedding``
(dense storage only) holds an ``nn.Embedding``'s (vocab, hidden) table and looks rows up instead of
multiplying: the int8 input embeddings (``embedding_quant_bits``) are stored, saved and loaded as
any compressed module.

``SlicedLinear`` holds a fused projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``) as one
ordinary linear per logical slice, so each slice can be a ``LowRankLinear`` of its own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from svdcompress import native
from svdcompress.linalg import (
    SUPPORTED_QUANT_BITS,
    Factors,
    dequantize,
    factored_params,
    pivot_factors,
    quantize_symmetric,
)
from svdcompress.runtime import (
    PackCache,
    dequant_once,
    fbgemm_linear,
    fbgemm_usable,
    float_key,
    gemv_usable,
    int8_linear,
    resolve_kernel,
)

__all__ = [
    "LowRankLinear",
    "SlicedLinear",
    "fused_specs",
    "merge_dense_slices_",
    "split_fused_",
    "stored_numbers",
    "tensor_layout",
    "unsplit_state_dict",
]

Layout = Literal["linear", "conv1d", "embedding"]
Storage = Literal["factored", "dense", "pivoted"]


def _stored_matrices(storage: str, in_features: int, out_features: int, rank: int) -> dict:
    if storage == "factored":
        return {"left": (out_features, rank), "right": (rank, in_features)}
    if storage == "pivoted":
        return {"left": (out_features, rank), "coupling": (rank, in_features - rank)}
    if storage == "dense":
        return {"weight": (out_features, in_features)}
    raise ValueError(f"unknown storage {storage!r}")


def tensor_layout(spec: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Tensor name (relative to the module) -> (shape, dtype) that a module with ``spec`` holds.

    dtype is ``None`` where it follows the model (float matrices, bias).
    """
    matrices = _stored_matrices(spec["storage"], spec["in_features"], spec["out_features"], spec["rank"])
    layout: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, shape in matrices.items():
        if spec.get("quant_bits") is None:
            layout[name] = (shape, None)
        else:
            layout[f"{name}_q"] = (shape, torch.int8)
            layout[f"{name}_scale"] = ((shape[0],), torch.float32)
    if spec["storage"] == "pivoted":
        layout["permutation"] = ((spec["in_features"],), torch.int64)
    if spec["bias"]:
        layout["bias"] = ((spec["out_features"],), None)
    return layout


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of an ``nn.Linear``, a ``Conv1D`` or a ``LowRankLinear``."""
    if isinstance(module, LowRankLinear | SlicedLinear):
        return module.dense_weight()
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


class LowRankLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        storage: Storage = "factored",
        layout: Layout = "linear",
        quant_bits: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, {min(in_features, out_features)}]")
        if quant_bits is not None and quant_bits not in SUPPORTED_QUANT_BITS:
            raise ValueError(f"quant_bits={quant_bits}; supported: {SUPPORTED_QUANT_BITS}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.storage, self.layout, self.quant_bits = storage, layout, quant_bits
        self.kernel = "auto"  # runtime choice for int8 matrices, not saved (see runtime.set_runtime)
        self._packs = PackCache()
        factory = {"device": device, "dtype": dtype}
        for name, shape in _stored_matrices(storage, in_features, out_features, rank).items():
            if quant_bits is None:
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
            else:
                self._register_int8(name, shape, device)
        if storage == "pivoted":
            self.register_buffer("permutation", torch.empty(in_features, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    def _register_int8(self, name: str, shape: tuple[int, int], device) -> None:
        self.register_buffer(f"{name}_q", torch.empty(shape, dtype=torch.int8, device=device))
        self.register_buffer(f"{name}_scale", torch.empty(shape[0], dtype=torch.float32, device=device))

    @property
    def matrix_names(self) -> tuple[str, ...]:
        """The stored float (or int8) matrices: ``left``/``right``, ``left``/``coupling`` or ``weight``."""
        return tuple(_stored_matrices(self.storage, 1, 1, 1))

    def matrix(self, name: str) -> torch.Tensor:
        """A stored matrix (``left``, ``right`` or ``weight``) as floats (dequantized if int8)."""
        if self.quant_bits is None:
            return getattr(self, name)
        scale = getattr(self, f"{name}_scale")  # float32, or the model's dtype after model.to(dtype)
        return dequantize(getattr(self, f"{name}_q"), scale, dim=1, dtype=scale.dtype)

    @classmethod
    def from_linear(
        cls, module: nn.Module, factors: Factors, *, storage: Storage = "factored"
    ) -> LowRankLinear:
        """Build from an ``nn.Linear``/``Conv1D`` and its factors; device and dtype of its weight."""
        weight = dense_weight(module)
        out_features, in_features = weight.shape
        layout: Layout = "conv1d" if isinstance(module, Conv1D) else "linear"
        new = cls(
            in_features, out_features, factors.rank, bias=module.bias is not None,
            storage=storage, layout=layout, device=weight.device, dtype=weight.dtype,
        )
        new.set_factors(factors)
        if module.bias is not None:
            new.bias.data.copy_(module.bias.detach())
        return new

    @classmethod
    @torch.no_grad()
    def full_rank_copy(cls, module: nn.Module) -> LowRankLinear:
        """Dense storage at full rank holding ``module``'s own weight: no factorization.

        The starting point of the whole-model INT8 baseline (``quantize.quantize_weights_``).
        """
        weight = dense_weight(module).detach()
        out_features, in_features = weight.shape
        bias = getattr(module, "bias", None)  # an nn.Embedding has none
        layout = "conv1d" if isinstance(module, Conv1D) else "embedding" if isinstance(module, nn.Embedding) else "linear"
        new = cls(
            in_features, out_features, min(out_features, in_features), bias=bias is not None,
            storage="dense", layout=layout, device=weight.device, dtype=weight.dtype,
        )
        new.weight.data.copy_(weight)
        if bias is not None:
            new.bias.data.copy_(bias.detach())
        return new

    @torch.no_grad()
    def set_factors(self, factors: Factors) -> None:
        if factors.rank != self.rank:
            raise ValueError(f"factors have rank {factors.rank}, module has rank {self.rank}")
        if self.storage == "pivoted":
            pivoted = pivot_factors(factors.left, factors.right)
            values = {"left": pivoted.left, "coupling": pivoted.coupling}
            self.permutation.copy_(pivoted.permutation)
        elif self.storage == "factored":
            values = {"left": factors.left, "right": factors.right}
        else:
            values = {"weight": factors.product()}
        for name, value in values.items():
            if self.quant_bits is None:
                getattr(self, name).data.copy_(value)
            else:
                q, scale = quantize_symmetric(value, self.quant_bits, dim=1)
                getattr(self, f"{name}_q").copy_(q)
                getattr(self, f"{name}_scale").copy_(scale)

    @torch.no_grad()
    def quantize_(self, bits: int = 8) -> LowRankLinear:
        """Turn float matrices into int8 codes + per-row float32 scales, in place.

        Raises ``ValueError`` if a matrix holds NaN or inf; callers add the module's name.
        """
        if self.quant_bits is not None:
            raise ValueError(f"already quantized to {self.quant_bits} bits")
        if bits not in SUPPORTED_QUANT_BITS:
            raise ValueError(f"quant_bits={bits}; supported: {SUPPORTED_QUANT_BITS}")
        codes = {name: quantize_symmetric(getattr(self, name), bits, dim=1) for name in self.matrix_names}
        for name, (q, scale) in codes.items():  # codes stay on the device of the float matrix
            delattr(self, name)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)
        self.quant_bits = bits
        return self

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this module applies (from dequantized factors if int8)."""
        if self.storage == "factored":
            return self.matrix("left") @ self.matrix("right")
        if self.storage == "pivoted":
            left = self.matrix("left")
            permuted = torch.cat([left, left @ self.matrix("coupling")], dim=1)  # (out, in), columns permuted
            return torch.zeros_like(permuted).index_copy(1, self.permutation, permuted)
        return self.matrix("weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "embedding":
            return self._lookup(x)
        if self.storage == "pivoted":
            return self._forward_pivoted(x)
        if self.quant_bits is not None:
            return self._forward_int8(x)
        if self.storage == "dense":
            return F.linear(x, self.weight, self.bias)
        return F.linear(F.linear(x, self.right), self.left, self.bias)  # (..., r) then (..., out)

    def _bias_for_c(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the bias a fused C call adds, the bias added after it): a bias that trains needs
        autograd, which the C code has not, so it is added in torch."""
        bias = self.bias
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            return None, bias
        return bias, None

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the (vocab, hidden) table: an input embedding (layout ``embedding``)."""
        if self.quant_bits is None:
            return F.embedding(ids, self.weight)
        q, scale = self._buffers["weight_q"], self._buffers["weight_scale"]
        flat = ids.reshape(-1)  # index_select: every dtype on every device (CUDA's embedding has no int8)
        rows = q.index_select(0, flat).to(scale.dtype) * scale.index_select(0, flat).unsqueeze(-1)
        return rows.reshape(*ids.shape, self.in_features)

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        # Matrices in the order they are applied: right then left, (..., in) → (..., r) → (..., out).
        order = ("right", "left") if self.storage == "factored" else ("weight",)
        buffers = self._buffers  # direct access: Module.__getattr__ is slow at decode call rates
        if self.kernel == "float_cache":  # float copies made once: plain matmuls, bias fused
            build = dequant_once(x.dtype)
            *first, last = [self._packs.get(float_key(n, x.dtype), buffers[f"{n}_q"],
                                            buffers[f"{n}_scale"], build) for n in order]
            y = F.linear(x, first[0]) if first else x  # (..., r)
            return F.linear(y, last, self.bias)
        if self.kernel == "fbgemm" and fbgemm_usable(x):  # fused fast path, no per-call lookups
            flat = x.reshape(-1, x.shape[-1])  # (M, in)
            for name in order:
                packed = self._packs.get(name, buffers[f"{name}_q"], buffers[f"{name}_scale"])
                flat = fbgemm_linear(flat, packed)
            y = flat.reshape(*x.shape[:-1], self.out_features)
        elif resolve_kernel(self.kernel) == "gemv" and gemv_usable(x):
            # decode: the matrices (and the bias, unless it trains) in one C call, one reshape
            flat = x.reshape(-1, x.shape[-1])
            if self.storage == "dense":
                y, after = native.int8_gemv(flat, buffers["weight_q"], buffers["weight_scale"]), self.bias
            else:
                in_c, after = self._bias_for_c()
                y = native.int8_factored_gemv(flat, buffers["right_q"], buffers["right_scale"], buffers["left_q"],
                                              buffers["left_scale"], in_c)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if after is None else y + after
        else:
            y = x
            for name in order:
                y = int8_linear(y, buffers[f"{name}_q"], buffers[f"{name}_scale"], self.kernel,
                                cache=self._packs, key=name)
        return y if self.bias is None else y + self.bias

    def _forward_pivoted(self, x: torch.Tensor) -> torch.Tensor:
        # The pivot columns of x pass straight through; the others are folded into them by coupling.
        permutation = self._buffers["permutation"]
        if self.quant_bits is not None and resolve_kernel(self.kernel) == "gemv" and gemv_usable(x):
            # decode: the gather, both matrices (and the bias, unless it trains) in one C call
            buffers = self._buffers
            in_c, after = self._bias_for_c()
            y = native.int8_pivoted_gemv(
                x.reshape(-1, x.shape[-1]), permutation, buffers["coupling_q"], buffers["coupling_scale"],
                buffers["left_q"], buffers["left_scale"], in_c)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if after is None else y + after
        # On 2-D rows: index_select along the last dim of a 3-D tensor took 3.6x as long on one
        # thread, far longer on two (BENCHMARKS.md, issue 14, session of 2026-12-07).
        flat = x.reshape(-1, x.shape[-1])  # (M, in)
        pivot = flat.index_select(1, permutation[: self.rank])  # (M, r)
        rest = flat.index_select(1, permutation[self.rank :])  # (M, in − r)
        mixed = pivot + self._apply_matrix("coupling", rest)  # (M, r)
        if self.quant_bits is None:
            y = F.linear(mixed, self.left, self.bias)  # (M, out)
        else:
            y = self._apply_matrix("left", mixed)
            y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply_matrix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ Mᵀ`` for one stored matrix: float, or int8 through the module's kernel."""
        if self.quant_bits is None:
            return F.linear(x, self._parameters[name])
        q, scale = self._buffers[f"{name}_q"], self._buffers[f"{name}_scale"]
        if self.kernel == "float_cache":
            return F.linear(x, self._packs.get(float_key(name, x.dtype), q, scale, dequant_once(x.dtype)))
        if self.kernel == "fbgemm" and fbgemm_usable(x):
            flat = fbgemm_linear(x.reshape(-1, x.shape[-1]), self._packs.get(name, q, scale))
            return flat.reshape(*x.shape[:-1], q.shape[0])
        return int8_linear(x, q, scale, self.kernel, cache=self._packs, key=name)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """An ordinary ``nn.Linear`` (or ``Conv1D`` or ``nn.Embedding``, if that is what was replaced)."""
        weight = self.dense_weight().detach()
        if self.layout == "embedding":
            dense = nn.Embedding(self.out_features, self.in_features, device=weight.device, dtype=weight.dtype)
            dense.weight.data.copy_(weight)
            return dense
        if self.layout == "conv1d":
            dense = Conv1D(self.out_features, self.in_features)
            dense.to(device=weight.device, dtype=weight.dtype)
            dense.weight.data.copy_(weight.T)
        else:
            dense = nn.Linear(
                self.in_features, self.out_features, bias=self.bias is not None,
                device=weight.device, dtype=weight.dtype,
            )
            dense.weight.data.copy_(weight)
        if self.bias is not None:
            dense.bias.data.copy_(self.bias)
        return dense

    def num_stored(self) -> int:
        """Numbers this module stores for its weight (bias, int8 scales and the pivoted storage's
        integer column permutation excluded; ``weight_bytes`` counts them)."""
        if self.storage == "dense":
            return self.in_features * self.out_features
        return factored_params(self.out_features, self.in_features, self.rank, self.storage)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight as held in memory and on disk: codes + scales (+ the pivoted
        storage's int64 permutation), bias excluded."""
        names = [f"{n}_q" for n in self.matrix_names] + [f"{n}_scale" for n in self.matrix_names]
        if self.quant_bits is None:
            names = list(self.matrix_names)
        if self.storage == "pivoted":
            names.append("permutation")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def spec(self) -> dict:
        """What ``checkpoint.load`` needs to rebuild this module before loading its tensors."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
            "bias": self.bias is not None, "storage": self.storage, "layout": self.layout,
            "quant_bits": self.quant_bits,
        }

    def extra_repr(self) -> str:
        quant = "" if self.quant_bits is None else f", int{self.quant_bits}, kernel={self.kernel}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"storage={self.storage}{quant}, bias={self.bias is not None}"
        )


class SlicedLinear(nn.Module):
    """A fused projection held as one linear layer per logical slice, outputs concatenated.

    GPT-2's ``c_attn`` (a ``Conv1D`` computing [q | k | v]), Phi-3's ``qkv_proj`` and
    ``gate_up_proj`` apply several logical matrices in one. Compressing the fused matrix as a whole
    would give Q, K and V one shared rank and make ``qko`` impossible; split into slices (children
    named ``q_proj``, ``k_proj``, ``v_proj`` or ``gate_proj``, ``up_proj``), each is an ordinary
    ``nn.Linear`` that can be compressed or left alone, and the module computes the same function
    as the fused layer: ``y = cat([slice(x) for slice in slices], -1)``.

    ``layout`` remembers what was split (``linear`` or ``conv1d``) so ``to_fused`` gives it back.
    """

    def __init__(self, slices: dict[str, int], in_features: int, *, bias: bool = True,
                 layout: Layout = "linear", device=None, dtype=None) -> None:
        super().__init__()
        self.slice_sizes = dict(slices)  # child name -> out_features, in output order
        self.in_features, self.out_features = in_features, sum(slices.values())
        self.layout = layout
        for name, size in slices.items():
            self.add_module(name, nn.Linear(in_features, size, bias=bias, device=device, dtype=dtype))

    @classmethod
    @torch.no_grad()
    def from_fused(cls, module: nn.Module, slices: dict[str, int]) -> SlicedLinear:
        """Split an ``nn.Linear`` or ``Conv1D`` whose output rows are the slices, in order."""
        weight = dense_weight(module).detach()  # (out, in)
        if weight.shape[0] != sum(slices.values()):
            raise ValueError(f"slices {slices} do not add up to {weight.shape[0]} output features")
        new = cls(slices, weight.shape[1], bias=module.bias is not None,
                  layout="conv1d" if isinstance(module, Conv1D) else "linear",
                  device=weight.device, dtype=weight.dtype)
        start = 0
        for name, size in slices.items():
            child = getattr(new, name)
            child.weight.copy_(weight[start : start + size])
            if module.bias is not None:
                child.bias.copy_(module.bias.detach()[start : start + size])
            start += size
        return new

    @classmethod
    def from_spec(cls, spec: dict, *, device=None, dtype=None) -> SlicedLinear:
        return cls(dict(spec["slices"]), spec["in_features"], bias=spec["bias"],
                   layout=spec["layout"], device=device, dtype=dtype)

    def spec(self) -> dict:
        """What ``checkpoint.load`` needs to split the fused module again before loading tensors.

        Slices are [name, out_features] pairs: their order is the output order, and config.json
        is written with sorted keys, which would reorder a mapping.
        """
        return {"slices": [[n, size] for n, size in self.slice_sizes.items()],
                "in_features": self.in_features,
                "bias": self.bias_present, "layout": self.layout}

    @property
    def bias_present(self) -> bool:
        return getattr(self, next(iter(self.slice_sizes))).bias is not None

    @property
    def all_dense(self) -> bool:
        """No slice compressed: the module is still exactly the fused layer it came from."""
        return all(type(getattr(self, name)) is nn.Linear for name in self.slice_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.slice_sizes], dim=-1)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) fused matrix this module applies."""
        return torch.cat([dense_weight(getattr(self, name)) for name in self.slice_sizes])

    def fused_bias(self) -> torch.Tensor | None:
        if not self.bias_present:
            return None
        return torch.cat([getattr(self, name).bias for name in self.slice_sizes])

    @torch.no_grad()
    def to_fused(self) -> nn.Module:
        """The plain ``nn.Linear`` (or ``Conv1D``) this module computes, rank-r slices made dense."""
        weight, bias = self.dense_weight().detach(), self.fused_bias()
        if self.layout == "conv1d":
            fused = Conv1D(self.out_features, self.in_features).to(weight.device, weight.dtype)
            fused.weight.copy_(weight.T)
        else:
            fused = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                              device=weight.device, dtype=weight.dtype)
            fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
        return fused

    def fused_state(self) -> dict[str, torch.Tensor]:
        """The tensors of the fused layer (``weight`` in its own layout, ``bias``)."""
        weight = self.dense_weight().detach()
        state = {"weight": weight.T if self.layout == "conv1d" else weight}
        if self.bias_present:
            state["bias"] = self.fused_bias().detach()
        return state

    def extra_repr(self) -> str:
        return f"slices={self.slice_sizes}, in_features={self.in_features}, layout={self.layout}"


def split_fused_(model: nn.Module, slices: dict[str, dict]) -> list[str]:
    """Replace each named fused module by a :class:`SlicedLinear`, in place; returns those split.

    ``slices`` maps a module name to ``{slice name: out_features}`` (a live module: its weights are
    copied) or to a ``SlicedLinear.spec()`` (a model on the meta device being rebuilt for loading).
    Names already split are left as they are.
    """
    done = []
    for name, value in slices.items():
        module = model.get_submodule(name)
        if isinstance(module, SlicedLinear):
            continue
        if "slices" in value:  # a spec: shapes only, the checkpoint's tensors arrive later
            new = SlicedLinear.from_spec(value, device=module.weight.device, dtype=module.weight.dtype)
        else:
            new = SlicedLinear.from_fused(module, value)
        model.set_submodule(name, new)
        done.append(name)
    return done


def merge_dense_slices_(model: nn.Module) -> list[str]:
    """Put every :class:`SlicedLinear` whose slices are all still dense back as its fused layer.

    A plain model must stay loadable by stock transformers: splitting is an internal
    representation that only compressed slices need on disk.
    """
    merged = [name for name, m in model.named_modules() if isinstance(m, SlicedLinear) and m.all_dense]
    for name in merged:
        model.set_submodule(name, model.get_submodule(name).to_fused())
    return merged


def fused_specs(model: nn.Module) -> dict[str, dict]:
    """Name -> spec of every split fused module: what a checkpoint records to rebuild them."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, SlicedLinear)}


def unsplit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every all-dense :class:`SlicedLinear` shown as its fused layer.

    The same weights then have the same names and shapes whether or not a fused projection was
    split (fingerprints of the original model must not depend on it).
    """
    dense_split = {name: m for name, m in model.named_modules()
                   if isinstance(m, SlicedLinear) and m.all_dense}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 2)[0]
        if owner not in dense_split:
            state[key] = tensor
        elif f"{owner}.weight" not in state:
            state.update({f"{owner}.{k}": v for k, v in dense_split[owner].fused_state().items()})
    return state


def stored_numbers(model: nn.Module) -> int:
    """Parameters plus int8 codes (held as buffers, so ``parameters()`` alone would miss them)."""
    codes = sum(buffer.numel() for buffer in model.buffers() if buffer.dtype == torch.int8)
    return sum(p.numel() for p in model.parameters()) + codes
