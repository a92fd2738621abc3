"""Integer storage: int8 factors for low-rank modules, and the whole-model INT8 baseline.

- :func:`quantize_module` turns one ``LowRankLinear`` to int8 codes + per-row scales, refusing a
  matrix that holds NaN or inf with an error naming the module. ``compress_`` calls it last.
- :func:`quantize_factors_` does the same for every float low-rank module of an already
  compressed model (so one float checkpoint gives its int8 twin without recomputing the SVD).
- :func:`quantize_weights_` is the baseline without SVD: weight-only, symmetric, per-output-channel
  round-to-nearest INT8 of every targeted linear layer (the same quantizer and the same kernels as
  the int8 factors, so the two are compared on equal terms). Each layer becomes a ``LowRankLinear``
  with ``storage="dense"`` at full rank holding the original weight — no factorization happens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from svdcompress import __version__
from svdcompress.config import _check_quant_bits
from svdcompress.errors import ConfigError, QuantizationError
from svdcompress.modules import LowRankLinear, dense_weight, fused_specs
from svdcompress.targets import find_targets

__all__ = ["BASELINE_METHOD", "quantize_factors_", "quantize_module", "quantize_weights_"]

logger = logging.getLogger(__name__)

BASELINE_METHOD = "int8-rtn"


def quantize_module(name: str, module: LowRankLinear, bits: int) -> LowRankLinear:
    """Quantize ``module``'s matrices in place; NaN/inf is refused naming ``name``."""
    for matrix_name in ("left", "right") if module.storage == "factored" else ("weight",):
        matrix = getattr(module, matrix_name)
        if not torch.isfinite(matrix).all():
            bad = int((~torch.isfinite(matrix)).sum())
            raise QuantizationError(
                f"{name}: the {matrix_name} factor holds {bad} NaN/inf values; refusing to quantize "
                "it (the float factors are already broken: check the weights or calibration data)."
            )
    return module.quantize_(bits)


def quantize_factors_(model: nn.Module, bits: int = 8) -> int:
    """Quantize every float ``LowRankLinear`` of a compressed model in place; returns how many.

    The model's ``compression_config`` (module specs and settings) is updated to match, so
    ``save`` writes a checkpoint that ``load`` rebuilds with int8 buffers.
    """
    _check_quant_bits(bits)
    compression = getattr(model.config, "compression_config", None)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) and module.quant_bits is None:
            quantize_module(name, module, bits)
            if compression is not None:
                compression["modules"][name] = module.spec()
            count += 1
    if compression is not None and count:
        compression["config"]["quant_bits"] = bits
    logger.info("quantized %d low-rank modules to int%d", count, bits)
    return count


def quantize_weights_(
    model: nn.Module,
    bits: int = 8,
    *,
    targets: tuple[str, ...] = ("all-linear",),
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Baseline: per-output-channel round-to-nearest INT8 of every targeted linear, no SVD.

    Records a ``compression_config`` so ``checkpoint.save``/``load`` round-trip the model; returns
    a summary with bytes before and after for the targeted layers.
    """
    _check_quant_bits(bits)
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ConfigError(
            "quantize_weights_ is the INT8 baseline for a plain model, and this model is already "
            "compressed; use quantize_factors_ to quantize its low-rank factors."
        )
    found = find_targets(model, targets, exclude)
    specs, before, after = {}, 0, 0
    for target in found:
        module = model.get_submodule(target.name)
        weight = dense_weight(module)
        if not torch.isfinite(weight).all():
            raise QuantizationError(f"{target.name} holds NaN or inf weights; refusing to quantize it.")
        new = quantize_module(target.name, LowRankLinear.full_rank_copy(module), bits)
        before += weight.numel() * weight.element_size()
        after += new.weight_bytes()
        specs[target.name] = new.spec()
        parent, _, child = target.name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    settings = {"method": BASELINE_METHOD, "quant_bits": bits, "targets": list(targets),
                "exclude": list(exclude)}
    model.config.compression_config = {
        "config": settings, "modules": specs, "fused": fused_specs(model), "calibration": None,
        "importance": None,
        "library_version": __version__,
    }
    summary = {"modules": len(specs), "target_bytes_before": before, "target_bytes_after": after}
    logger.info("int8 baseline: %s", summary)
    return summary
