"""CPU kernels for int8-stored matrices, and choosing them for a whole model.

Every kernel computes ``y = x @ (q · scale[:, None])ᵀ`` for ``x`` (..., in), int8 ``q`` (out, in)
and a float32 per-row ``scale`` (out,), without ever building the float matrix ``q · scale``
(the per-row scale commutes with the matmul: ``x @ (q·s)ᵀ = (x @ qᵀ) · s``):

- ``dequant``: cast ``q`` to the activation dtype per call, matmul, scale the outputs. Weight-only:
  matches the dequantized reference to float rounding. Works on any device and dtype.
- ``dequant_serial``: ``dequant``, but an input of at most ``SERIAL_ROWS`` rows (decode: one row
  per sequence) is cast, multiplied and scaled on one thread. At decode sizes each cast is an
  OpenMP fork/join whose second thread mostly waits, and the memory-bound matmuls gain little
  from it (BENCHMARKS.md, issue 14); prefill-sized inputs keep every thread.
- ``gemv``: at most ``SERIAL_ROWS`` float32 CPU rows (decode), the fused int8 GEMV of
  :mod:`svdcompress.native` (C, compiled for this machine on first use): each int8 weight vector
  is widened in registers and used at once, so the matrix is read once as bytes and never
  converted; a pivoted layer (gather, both matrices, bias) is one call. Its output rows are shared
  among torch's threads for weights of 128 KiB and more, unless idle OpenMP threads sleep
  (``OMP_WAIT_POLICY=PASSIVE``: then one thread, as waking one costs more than it saves). Larger
  inputs (prefill), other dtypes and devices, and a machine without a C compiler take
  ``dequant_serial``. Exact like ``dequant`` (float32 sums in another order; the same bits on any
  thread count).
- ``int_mm``: quantize each activation row (token) to int8 on the fly, ``torch._int_mm`` (int32
  accumulation), rescale by the two scales. Adds activation-quantization error.
- ``fbgemm``: ``torch.ops.quantized.linear_dynamic`` on weights packed once (per-channel qint8):
  fbgemm quantizes the whole activation tensor (one uint8 scale per call, shared by every token
  of the batch) inside one fused C++ call. The fastest path, but a token with outlier
  activations coarsens every other token's grid: on SmolLM2 it multiplied perplexity by 1.8
  (BENCHMARKS.md, issue 4). Needs float32 CPU input and the x86/fbgemm engine.
- ``int8pack``: ``torch._weight_int8pack_mm`` (weight-only); exact like ``dequant`` but its CPU
  float32 path is slow — kept for comparison.
- ``float_cache``: dequantize each matrix once, on first use, into a float copy kept beside the int8
  buffers (rebuilt if they change), then plain ``F.linear``. Exact like ``dequant``, no per-call
  conversion, but it holds the float bytes in RAM (4× the int8 codes in float32: +242 MiB on
  SmolLM2-135M at param_ratio 0.6) — it is the float factored model, with int8 only on disk. It
  is *slower* than ``dequant`` at decode on our CPU (BENCHMARKS.md, issue 14): decode is bound by
  memory traffic, and reading 4-byte factors costs more than casting 1-byte ones in cache. Kept
  for that comparison and for machines where the opposite holds.

``auto`` (the default) is ``gemv`` (``dequant_serial`` until 2026-12-04, ``dequant`` before
2026-12-03): the fastest kernel whose output equals the dequantized model's. On SmolLM2-135M at
param_ratio 0.6 with INT8 factors it decodes ×1.71 / ×1.91 dense float32 at 1 thread and
×1.59 / ×1.85 at 2 (batch 1 / 8; ``dequant_serial``: ×1.59 / ×1.55 and ×1.30 / ×1.41 in the
same rounds; BENCHMARKS.md issue 14). Prefill and anything ``gemv`` does not take run as
``dequant_serial``. ``int_mm`` and ``fbgemm`` quantize activations and cost perplexity; ``auto``
does not pick ``float_cache``: it is exact, but it holds the float factors in RAM and measured
slower at decode. Choose with :func:`set_runtime` or ``svdcompress bench --kernel``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from svdcompress import native
from svdcompress.errors import ConfigError

__all__ = [
    "AUTO_KERNEL",
    "KERNELS",
    "Kernel",
    "PackCache",
    "available_kernels",
    "dequant_once",
    "fbgemm_linear",
    "fbgemm_usable",
    "float_key",
    "gemv_usable",
    "int8_linear",
    "resolve_kernel",
    "set_runtime",
]

logger = logging.getLogger(__name__)

Kernel = Literal["auto", "dequant", "dequant_serial", "gemv", "int_mm", "fbgemm", "int8pack", "float_cache"]
KERNELS: tuple[str, ...] = ("auto", "dequant", "dequant_serial", "gemv", "int_mm", "fbgemm", "int8pack",
                            "float_cache")
SERIAL_ROWS = 16  # dequant_serial and gemv: inputs of at most this many rows run on one thread
AUTO_KERNEL = "gemv"  # what "auto" means (module docstring: why)


class _OneThread:
    """torch's intra-op threads set to one inside the block and restored after it (~0.4 µs a switch
    and back). torch's setting is not scoped to the block: torch ops that another Python thread runs
    at the same moment may see one thread too."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *_exc) -> None:
        torch.set_num_threads(self.threads)


@functools.cache
def _cpu_has_vnni() -> bool:
    # Without VNNI, fbgemm's u8×s8 pairs add up in int16 and can saturate; PyTorch's own dynamic
    # quantization then reduces activations to 7 bits (reduce_range), and so do we.
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "vnni" in cpuinfo.read_text()


@functools.cache
def fbgemm_available() -> bool:
    engine = torch.backends.quantized.engine
    return engine in ("x86", "fbgemm") and hasattr(torch.ops.quantized, "linear_dynamic")


def available_kernels() -> list[str]:
    """Kernels that can run in this process (``auto`` always can)."""
    return [k for k in KERNELS if k != "fbgemm" or fbgemm_available()]


def _dequant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # (..., out)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of activations (M, in): ``q`` int8 and ``scale`` (M, 1)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).to(torch.int8), scale  # |x / scale| <= 127 by construction


def _int_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()  # (M, in)
    xq, xs = _quantize_rows(flat)
    acc = torch._int_mm(xq, q.t())  # (M, out) int32
    y = acc.float() * xs * scale
    return y.reshape(*x.shape[:-1], q.shape[0]).to(x.dtype)


def _int8pack(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        # Seen crashing the process (not raising) with bfloat16 input at 512 rows on torch 2.13.
        raise ConfigError(f"kernel 'int8pack' is kept for float32 CPU input only (got {x.dtype} "
                          f"on {x.device}); use 'dequant'.")
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
    y = torch._weight_int8pack_mm(flat, q, scale.to(x.dtype))
    return y.reshape(*x.shape[:-1], q.shape[0])


def _pack_fbgemm(q: torch.Tensor, scale: torch.Tensor) -> Any:
    zero_points = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # PyTorch deprecates quantized-tensor constructors; they are still the only way in.
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


@functools.cache
def _linear_dynamic() -> Any:
    # The op packet's Python __call__ scans every argument for fake script objects (for export)
    # before dispatching, which costs more than the matmul itself at decode sizes; its C++
    # entry point (``_op``) skips that scan. Fall back to the packet if the attribute goes away.
    packet = torch.ops.quantized.linear_dynamic
    return getattr(packet, "_op", packet)


def fbgemm_linear(flat: torch.Tensor, packed: Any) -> torch.Tensor:
    """(M, in) float32 → (M, out) with fbgemm's dynamic int8 linear on prepacked weights."""
    return _linear_dynamic()(flat.contiguous(), packed, not _cpu_has_vnni())


def _fbgemm(x: torch.Tensor, packed: Any) -> torch.Tensor:
    y = fbgemm_linear(x.reshape(-1, x.shape[-1]), packed)  # (M, out)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def resolve_kernel(kernel: str) -> str:
    """The kernel ``kernel`` names: ``auto`` is :data:`AUTO_KERNEL`, any other is itself."""
    return AUTO_KERNEL if kernel == "auto" else kernel


def gemv_usable(x: torch.Tensor) -> bool:
    """Whether kernel ``gemv`` runs ``x`` natively: float32 on the CPU, at most ``SERIAL_ROWS`` rows,
    no gradient to carry back to ``x`` (the C code has no autograd), and the library built."""
    return (x.is_cpu and x.dtype is torch.float32 and x.numel() <= SERIAL_ROWS * x.shape[-1]
            and not (x.requires_grad and torch.is_grad_enabled()) and native.gemv_available())


def fbgemm_usable(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and fbgemm_available()


@functools.cache
def dequant_once(dtype: torch.dtype):
    """A :class:`PackCache` builder: the float matrix ``q · scale[:, None]`` in ``dtype``."""
    def build(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)  # (out, in)
    return build


def float_key(name: str, dtype: torch.dtype) -> str:
    """The :class:`PackCache` key of the ``float_cache`` copy of matrix ``name`` in ``dtype``."""
    return f"float:{name}:{dtype}"


def _version(tensor: torch.Tensor) -> int:
    return 0 if tensor.is_inference() else tensor._version  # inference tensors keep no counter


class PackCache:
    """fbgemm-packed copies of int8 buffers, rebuilt when a buffer is replaced or changed in place.

    An entry keeps the buffer objects it was built from: a buffer replaced by another tensor (a
    reload, ``module.to``) fails the identity check, one changed in place fails the version check.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple] = {}

    def get(self, key: str, q: torch.Tensor, scale: torch.Tensor, build=_pack_fbgemm) -> Any:
        """The prepared copy of ``(q, scale)`` stored under ``key`` (``build`` makes it if needed)."""
        entry = self._entries.get(key)
        if (entry is None or entry[0] is not q or entry[1] is not scale
                or entry[2] != _version(q) or entry[3] != _version(scale)):
            entry = (q, scale, _version(q), _version(scale), build(q, scale))
            self._entries[key] = entry
        return entry[4]

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes held in prepared tensors (float caches; fbgemm packs are opaque and not counted)."""
        return sum(e[4].numel() * e[4].element_size() for e in self._entries.values()
                   if isinstance(e[4], torch.Tensor))

    # Packed weights are torchbind objects: a copied or pickled module repacks on first use.
    def __deepcopy__(self, memo: dict) -> PackCache:
        return PackCache()

    def __getstate__(self) -> dict:
        return {"_entries": {}}


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernel: str = "auto", *,
                cache: PackCache | None = None, key: str = "") -> torch.Tensor:
    """``x @ (q · scale[:, None])ᵀ`` with the chosen kernel (no bias)."""
    kernel = resolve_kernel(kernel)
    if kernel == "dequant":
        return _dequant(x, q, scale)
    if kernel == "gemv":
        if gemv_usable(x):
            y = native.int8_gemv(x.reshape(-1, x.shape[-1]), q, scale)
            return y.reshape(*x.shape[:-1], q.shape[0])
        kernel = "dequant_serial"
    if kernel == "dequant_serial":
        if x.device.type != "cpu" or x.numel() > SERIAL_ROWS * x.shape[-1] or torch.get_num_threads() == 1:
            return _dequant(x, q, scale)
        with _OneThread():
            return _dequant(x, q, scale)
    if kernel == "int_mm":
        return _int_mm(x, q, scale)
    if kernel == "int8pack":
        return _int8pack(x, q, scale)
    if kernel == "float_cache":
        if cache is None:
            raise ConfigError("kernel 'float_cache' needs a cache to keep the float matrices in.")
        return F.linear(x, cache.get(float_key(key, x.dtype), q, scale, dequant_once(x.dtype)))
    if kernel == "fbgemm":
        if cache is None or not fbgemm_usable(x):
            raise ConfigError(
                f"kernel 'fbgemm' needs float32 input on the CPU with the x86/fbgemm quantized "
                f"engine (got {x.dtype} on {x.device}, engine {torch.backends.quantized.engine}); "
                "use 'auto' or 'dequant'."
            )
        return _fbgemm(x, cache.get(key, q, scale))
    raise ConfigError(f"unknown kernel {kernel!r}; known: {list(KERNELS)}")


def set_runtime(model: nn.Module, kernel: str) -> int:
    """Make every int8 module of ``model`` use ``kernel``; returns how many modules it set.

    An int8 module is one with int8 ``quant_bits`` and a ``kernel`` to choose (``LowRankLinear``):
    asked by attribute, since the modules build on these kernels and not the reverse."""
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel {kernel!r}; known: {list(KERNELS)}")
    if kernel == "fbgemm" and not fbgemm_available():
        raise ConfigError(
            f"kernel 'fbgemm' is not available (quantized engine "
            f"{torch.backends.quantized.engine!r}); available: {available_kernels()}"
        )
    count = 0
    for module in model.modules():
        if hasattr(module, "kernel") and getattr(module, "quant_bits", None) is not None:
            module.kernel = kernel
            count += 1
    logger.info("kernel %s set on %d int8 modules", kernel, count)
    return count
