"""Integer storage: int8 factors for low-rank modules, and the whole-model INT8 baseline.

- :func:`quantize_module` turns one ``LowRankLinear`` to int8 codes + per-row scales, refusing a
  matrix that holds NaN or inf with an error naming the module. ``compress_`` calls it last.
- :func:`quantize_factors_` does the same for every float low-rank module of an already
  compressed model (so one float checkpoint gives its int8 twin without recomputing the SVD).
- :func:`quantize_outer_` stores the output head (``head_quant_bits``) and the input embeddings
  (``embedding_quant_bits``) the same way: at batch-1 decode the head of a small model is a large
  share of the bytes read per token, and the two tables a large share of its bytes.
- :func:`quantize_weights_` is the baseline without SVD: weight-only, symmetric, per-output-channel
  round-to-nearest INT8 of every targeted linear layer (the same quantizer and the same kernels as
  the int8 factors, so the two are compared on equal terms). Each layer becomes a ``LowRankLinear``
  with ``storage="dense"`` at full rank holding the original weight — no factorization happens.
- :func:`rtn_quantize_` is the group-wise low-bit baseline (4-bit round-to-nearest, groups of 32 or
  128): *fake* quantization — each weight is replaced by its quantize-dequantize round trip, so the
  quality is exact while the bytes are counted analytically (there is no 4-bit storage format here).
- What INT8 costs each module, for the byte allocator, is measured in :mod:`svdcompress.int8_analysis`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from svdcompress._version import __version__
from svdcompress.config import check_quant_bits
from svdcompress.errors import ConfigError, QuantizationError, require_finite
from svdcompress.linalg import quantize_groupwise, relative_weight_error
from svdcompress.modules import LowRankLinear, dense_weight, fused_specs
from svdcompress.targets import find_targets

__all__ = [
    "BASELINE_METHOD",
    "check_outer",
    "quantize_factors_",
    "quantize_module",
    "quantize_outer_",
    "quantize_weights_",
    "rtn_quantize_",
]

logger = logging.getLogger(__name__)

BASELINE_METHOD = "int8-rtn"


def quantize_module(name: str, module: LowRankLinear, bits: int) -> LowRankLinear:
    """Quantize ``module``'s matrices in place; NaN/inf is refused naming ``name``."""
    matrices = {("the weight" if m == "weight" else f"the {m} factor"): getattr(module, m)
                for m in module.matrix_names}
    require_finite(matrices, module=name, error=QuantizationError, refusing="quantize it",
                   fix="the float matrices are already broken: check the weights or calibration data")
    return module.quantize_(bits)


def quantize_factors_(model: nn.Module, bits: int = 8) -> int:
    """Quantize every float ``LowRankLinear`` of a compressed model in place; returns how many.

    The model's ``compression_config`` (module specs and settings) is updated to match, so
    ``save`` writes a checkpoint that ``load`` rebuilds with int8 buffers.
    """
    check_quant_bits(bits)
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


def _tied_to_embeddings(model: nn.Module, name: str, weight: torch.Tensor) -> bool:
    """The head shares the input embeddings' tensor, or transformers would tie it to them on load
    (a streamed model holds the head's weight alone: the tensors are no longer one)."""
    embeddings = getattr(model.get_input_embeddings(), "weight", None)
    if embeddings is not None and not weight.is_meta and embeddings.data_ptr() == weight.data_ptr():
        return True
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    return expanded is not None and f"{name}.weight" in expanded(all_submodels=True)


def _named(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def check_outer(model: nn.Module, head_bits: int | None, embedding_bits: int | None) -> bool:
    """Refuse settings :func:`quantize_outer_` cannot apply to ``model`` (a ConfigError saying why),
    before any work; returns whether its head is tied to its input embeddings."""
    check_quant_bits(head_bits, "head_quant_bits")
    check_quant_bits(embedding_bits, "embedding_quant_bits")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = isinstance(head, nn.Linear) and _tied_to_embeddings(model, _named(model, head), head.weight)
    if head_bits is not None and not isinstance(head, nn.Linear):
        what = "has no output head" if head is None else f"has an output head of type {type(head).__name__}"
        raise ConfigError(f"{type(model).__name__} {what}, which head_quant_bits cannot store as int8 "
                          "(it takes an nn.Linear head); leave head_quant_bits unset.")
    if embedding_bits is not None and not isinstance(embeddings, nn.Embedding):
        raise ConfigError(f"{type(model).__name__}'s input embeddings are a {type(embeddings).__name__}, "
                          "which embedding_quant_bits cannot store as int8 (it takes an nn.Embedding); "
                          "leave embedding_quant_bits unset.")
    if embedding_bits is not None and head_bits is None and tied:
        raise ConfigError(f"{type(model).__name__}'s output head shares the input embeddings' tensor: an "
                          "int8 table for the lookup beside the float one the head keeps would store more, "
                          "not less. Set head_quant_bits too (--head-quant-bits 8), or neither.")
    return tied


@torch.no_grad()
def _quantize_table(model: nn.Module, module: nn.Module, bits: int, shared: bool) -> dict[str, Any]:
    name = _named(model, module)
    weight = dense_weight(module).detach()
    new = quantize_module(name, LowRankLinear.full_rank_copy(module), bits)
    model.set_submodule(name, new)
    return {"name": name, "quant_bits": bits, "weight_error": relative_weight_error(weight, new.dense_weight()),
            "bytes_before": 0 if shared else weight.numel() * weight.element_size(),
            "bytes_after": new.weight_bytes(), "untied": False}


def _untie(model: nn.Module) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 keeps the mapping it tied by
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def quantize_outer_(model: nn.Module, *, head_bits: int | None = None,
                    embedding_bits: int | None = None) -> dict[str, dict[str, Any]]:
    """Store the output head (``head_bits``) and/or the input embeddings (``embedding_bits``) as
    symmetric per-row integers, in place; returns ``{"head": ..., "embeddings": ...}`` for those done.

    Each becomes a full-rank dense ``LowRankLinear`` with int8 codes (the INT8 baseline's quantizer;
    the head runs on its kernels, the embeddings look rows up: layout ``embedding``), so checkpoints
    save and load them like any compressed module. A head tied to the input embeddings is untied
    (``config.tie_word_embeddings = False``): with the head alone, the embeddings stay float for the
    lookup and the int8 head is stored on top; with both, each is an int8 table (half the float
    bytes of the one they shared). Each summary: name, bits, relative weight error, bytes before
    (0 for a tied head: it shared the embeddings' tensor) and after, whether the pair was untied.
    A compressed model's ``compression_config`` records them (specs, settings, summaries), so
    ``save`` writes a checkpoint that ``load`` rebuilds.
    """
    tied = check_outer(model, head_bits, embedding_bits)
    done = {}
    if head_bits is not None:
        done["head"] = _quantize_table(model, model.get_output_embeddings(), head_bits, shared=tied)
    if embedding_bits is not None:
        done["embeddings"] = _quantize_table(model, model.get_input_embeddings(), embedding_bits, shared=False)
    if tied and done:
        _untie(model)
        for summary in done.values():
            summary["untied"] = True
    compression = getattr(model.config, "compression_config", None)
    for key, setting in (("head", "head_quant_bits"), ("embeddings", "embedding_quant_bits")):
        if key in done and compression:  # a compressed model: its checkpoint must rebuild them too
            compression["modules"][done[key]["name"]] = model.get_submodule(done[key]["name"]).spec()
            compression["config"][setting] = done[key]["quant_bits"]
            compression[key] = done[key]
        if key in done:
            logger.info("%s %s stored as int%d: %s", key, done[key]["name"], done[key]["quant_bits"], done[key])
    return done


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
    check_quant_bits(bits)
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
        new = quantize_module(target.name, LowRankLinear.full_rank_copy(module), bits)
        before += weight.numel() * weight.element_size()
        after += new.weight_bytes()
        specs[target.name] = new.spec()
        model.set_submodule(target.name, new)
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


def _refuse_compressed(model: nn.Module, what: str) -> None:
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ConfigError(f"{what} is a baseline for a plain model, and this model is already "
                          "compressed; load the original model first.")


@torch.no_grad()
def rtn_quantize_(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    *,
    symmetric: bool = False,
    targets: tuple[str, ...] = ("all-linear",),
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Baseline: group-wise round-to-nearest of every targeted linear's weight, in place.

    Fake quantization (see :func:`svdcompress.linalg.quantize_groupwise` for the convention): the
    weights stay float tensors holding exactly the values the codes and fp16 scales reproduce, and
    ``target_bytes_after`` is what those codes and scales would take. Biases are left as they are
    and counted in neither total. Nothing is recorded for ``save``: a saved model holds the float
    round-tripped weights, not a 4-bit checkpoint.
    """
    _refuse_compressed(model, "rtn_quantize_")
    found = find_targets(model, targets, exclude)
    before = after = 0
    for target in found:
        module = model.get_submodule(target.name)
        weight = dense_weight(module)
        try:
            approx, nbytes = quantize_groupwise(weight, bits, group_size, symmetric=symmetric)
        except ValueError as err:
            raise QuantizationError(f"{target.name}: {err}; refusing to quantize it.") from None
        (module.weight if weight is module.weight else module.weight.T).copy_(approx)
        before += weight.numel() * weight.element_size()
        after += nbytes
    summary = {"modules": len(found), "bits": bits, "group_size": group_size,
               "symmetric": symmetric, "target_bytes_before": before, "target_bytes_after": after,
               "byte_ratio": after / max(before, 1)}
    logger.info("%d-bit RTN baseline (groups of %d): %s", bits, group_size, summary)
    return summary
