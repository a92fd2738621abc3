"""``LowRankLinear``: the one module that replaces ``nn.Linear`` or GPT-2's ``Conv1D``.

Storage modes:
- ``factored``: ``left`` (out, r) and ``right`` (r, in); ``y = (x @ rightᵀ) @ leftᵀ + bias``.
  Never materialises the dense weight in ``forward``.
- ``dense``: ``weight`` (out, in) holding the rank-r product (SVD as denoising; saves nothing).

The module remembers the layout it replaced (``linear`` or ``conv1d``) so ``to_dense`` gives back
the original type and stock transformers can load an exported checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from svdcompress.linalg import Factors

__all__ = ["LowRankLinear"]

Layout = Literal["linear", "conv1d"]
Storage = Literal["factored", "dense"]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of an ``nn.Linear``, a ``Conv1D`` or a ``LowRankLinear``."""
    if isinstance(module, LowRankLinear):
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.storage, self.layout = storage, layout
        factory = {"device": device, "dtype": dtype}
        if storage == "factored":
            self.left = nn.Parameter(torch.empty(out_features, rank, **factory))
            self.right = nn.Parameter(torch.empty(rank, in_features, **factory))
        elif storage == "dense":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        else:
            raise ValueError(f"unknown storage {storage!r}")
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

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

    @torch.no_grad()
    def set_factors(self, factors: Factors) -> None:
        if factors.rank != self.rank:
            raise ValueError(f"factors have rank {factors.rank}, module has rank {self.rank}")
        if self.storage == "factored":
            self.left.data.copy_(factors.left)
            self.right.data.copy_(factors.right)
        else:
            self.weight.data.copy_(factors.product())

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this module applies."""
        return self.left @ self.right if self.storage == "factored" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.storage == "dense":
            return F.linear(x, self.weight, self.bias)
        return F.linear(F.linear(x, self.right), self.left, self.bias)  # (..., r) then (..., out)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """An ordinary ``nn.Linear`` (or ``Conv1D``, if that is what was replaced)."""
        weight = self.dense_weight().detach()
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
        """Numbers this module stores for its weight (bias excluded)."""
        if self.storage == "factored":
            return self.rank * (self.in_features + self.out_features)
        return self.in_features * self.out_features

    def spec(self) -> dict:
        """What ``checkpoint.load`` needs to rebuild this module before loading its tensors."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
            "bias": self.bias is not None, "storage": self.storage, "layout": self.layout,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"storage={self.storage}, bias={self.bias is not None}"
        )
