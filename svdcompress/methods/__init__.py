"""Method registry: each config type maps to the handler that factorizes one weight.

Adding a method is adding a file here that defines a config in ``svdcompress.config`` and calls
``register``. ``prepare`` runs once on the whole (still uncompressed) model before any weight is
replaced — for statistics that need gradients — and returns per-module extras for ``factorize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from svdcompress.calibration import ModuleStats
from svdcompress.config import CompressionConfig
from svdcompress.errors import ConfigError
from svdcompress.linalg import Factors

__all__ = ["Method", "get_method", "register"]

Factorize = Callable[[torch.Tensor, int, ModuleStats | None, Any, CompressionConfig], Factors]
Prepare = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Method:
    factorize: Factorize  # (weight (out, in), rank, stats, extra, config) -> Factors
    prepare: Prepare | None = None  # (model, targets, config, calibration, importance) -> extras


_REGISTRY: dict[type[CompressionConfig], Method] = {}


def register(config_type: type[CompressionConfig], factorize: Factorize, prepare: Prepare | None = None):
    _REGISTRY[config_type] = Method(factorize, prepare)


def get_method(config: CompressionConfig) -> Method:
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise ConfigError(f"no handler registered for {type(config).__name__}") from None


def _load_all() -> None:
    from svdcompress.methods import asvd, fisher, importance, svd, whiten  # noqa: F401


_load_all()
