"""Integer storage: int8 factors for low-rank modules, and the whole-model INT8 baseline.

- :func:`quantize_module` turns one ``LowRankLinear`` to int8 codes + per-row scales, refusing a
  matrix that holds NaN or inf with an error naming the module. ``compress_`` calls it last.
- :func:`quantize_factors_` does the same for every float low-rank module of an already
  compressed model (so one float checkpoint gives its int8 twin without recomputing the SVD).
- :func:`quantize_weights_` is the baseline without SVD: weight-only, symmetric, per-output-channel
  round-to-nearest INT8 of every targeted linear layer (the same quantizer and the same kernels as
  the int8 factors, so the two are compared on equal terms). Each layer becomes a ``LowRankLinear``
  with ``storage="dense"`` at full rank holding the original weight — no factorization happens.
- :func:`rtn_quantize_` is the group-wise low-bit baseline (4-bit round-to-nearest, groups of 32 or
  128): *fake* quantization — each weight is replaced by its quantize-dequantize round trip, so the
  quality is exact while the bytes are counted analytically (there is no 4-bit storage format here).
- :func:`int8_sensitivity` measures what INT8 costs each module (dense INT8, and INT8 factors on top
  of each rank), so the byte allocator can choose per module among float and INT8 options.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from svdcompress._version import __version__
from svdcompress.config import check_quant_bits
from svdcompress.errors import AnalysisError, ConfigError, QuantizationError, require_finite
from svdcompress.fetch import atomic_write_json
from svdcompress.linalg import dequantize, quantize_groupwise, quantize_symmetric, whitening
from svdcompress.modules import LowRankLinear, dense_weight, fused_specs
from svdcompress.targets import find_targets

if TYPE_CHECKING:
    from svdcompress.analysis import Analysis, ModuleAnalysis
    from svdcompress.calibration import Calibration

__all__ = [
    "BASELINE_METHOD",
    "Int8Sensitivity",
    "ModuleInt8",
    "int8_sensitivity",
    "quantize_factors_",
    "quantize_module",
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


# --------------------------------------------------------------------------------------------------
# What INT8 costs each module, for the byte allocator

INT8_FILE = "int8_sensitivity.json"
_FORMAT_VERSION = 1


@dataclass
class ModuleInt8:
    """One module's INT8 costs, measured on the analysis' calibration windows and probe.

    Energies are relative whitened output errors ‖(W − W')X‖² / ‖WX‖², as the analysis' tail
    energies; KLs are the analysis' probe KL with this module alone changed.
    """

    name: str
    dense_energy: float | None  # W' = W per-row INT8 (the "INT8 alone" baseline's quantizer)
    dense_kl: float
    # rank -> W' = INT8 factors; empty without energies: INT8 factors then predict as float ones.
    factor_energy: dict[int, float] = field(default_factory=dict)
    factor_kl: dict[int, float] = field(default_factory=dict)  # rank -> measured KL (some ranks)

    def quant_extra(self, module: ModuleAnalysis, rank: int) -> float:
        """Energy INT8 factors add at ``rank`` over float factors (measured at a few ranks,
        linear in rank between them, the nearest measurement outside)."""
        ranks = sorted(self.factor_energy)
        extra = [max(self.factor_energy[r] - module.tail_energy(r), 0.0) for r in ranks]
        return float(np.interp(rank, ranks, extra)) if ranks else 0.0

    def predicted_kl(self, module: ModuleAnalysis, rank: int | None) -> float:
        """Predicted KL with only this module INT8: dense (``rank=None``) is measured; factors at
        ``rank`` are interpolated on the float measurements, like a float rank, at the float tail
        energy plus the INT8 extra. (``factor_kl``, where measured, checks this; it is not used:
        its energies lie so close to the float points' that a segment between them is noise.)"""
        if rank is None:
            return self.dense_kl
        from svdcompress.analysis import interpolate_kl  # lazy: analysis imports half the package

        points = [(m.energy, m.kl) for m in module.measurements]
        return interpolate_kl(module.tail_energy(rank) + self.quant_extra(module, rank), points)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleInt8:
        data = dict(data)
        for key in ("factor_energy", "factor_kl"):  # JSON keys are strings
            data[key] = {int(r): float(v) for r, v in data.get(key, {}).items()}
        return cls(**data)


@dataclass
class Int8Sensitivity:
    fingerprint: str  # of the analysis (model and settings) it extends
    modules: dict[str, ModuleInt8]
    seconds: float = 0.0
    energies: bool = True  # False: dense INT8 KLs only (no calibration pass)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": _FORMAT_VERSION, "fingerprint": self.fingerprint,
                "energies": self.energies, "seconds": round(self.seconds, 2),
                "modules": {name: asdict(m) for name, m in self.modules.items()}}


def _read_int8(path: Path, fingerprint: str, energies: bool) -> dict[str, ModuleInt8]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AnalysisError(f"cannot read {path}: {err}; delete it to measure again.") from None
    if data.get("format_version") != _FORMAT_VERSION or data.get("fingerprint") != fingerprint:
        raise AnalysisError(f"{path} was measured for another analysis (fingerprint "
                            f"{data.get('fingerprint')}, this one {fingerprint}); delete it to "
                            "measure again.")
    if data.get("energies", True) != energies:
        raise AnalysisError(f"{path} was measured with energies={not energies}; delete it to "
                            f"measure again with energies={energies}.")
    return {name: ModuleInt8.from_dict(m) for name, m in data["modules"].items()}


def _int8_round_trip(matrix: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_symmetric(matrix, 8, dim=1)  # per row, as LowRankLinear.quantize_ stores it
    return dequantize(q, scale, dim=1, dtype=torch.float64)


def _factor_ranks(module: ModuleAnalysis, min_rank: int) -> list[int]:
    from svdcompress.linalg import break_even_rank

    top = break_even_rank(module.out_features, module.in_features)
    return sorted({min(min_rank, top), *(m.rank for m in module.measurements), top})


def _dense_int8_kl(model: nn.Module, name: str, block: int, probe) -> float:
    from svdcompress.analysis import _weight_replaced

    layer = model.get_submodule(name)
    with _weight_replaced(layer, _int8_round_trip(dense_weight(layer).detach().double())):
        return probe.measure(block)[0]


def _measure_int8(model: nn.Module, module: ModuleAnalysis, block: int, gram: torch.Tensor,
                  n_tokens: int, probe, min_rank: int, probe_factors: bool) -> ModuleInt8:
    """Whitened energies of dense INT8 and of INT8 whitened-SVD factors at a few ranks; the probe
    KL of dense INT8 (and, if ``probe_factors``, of the factors at the analysis' measured ranks)."""
    from svdcompress.analysis import _weight_replaced

    layer = model.get_submodule(module.name)
    weight = dense_weight(layer).detach().double()  # (out, in)
    white = whitening(gram / max(n_tokens, 1))
    s_white = white.s.float()  # energies of ~1e-5 are far above float32 rounding; 2x faster
    target = weight.float() @ s_white  # (out, in): W in whitened coordinates
    total = float(target.double().pow(2).sum())

    def energy(approx: torch.Tensor) -> float:
        return float((target - approx.float() @ s_white).double().pow(2).sum()) / max(total, 1e-300)

    dense = _int8_round_trip(weight)
    result = ModuleInt8(module.name, energy(dense), _dense_int8_kl(model, module.name, block, probe))
    u, s, vh = torch.linalg.svd(weight @ white.s, full_matrices=False)
    measured = {m.rank for m in module.measurements} if probe_factors else set()
    for rank in _factor_ranks(module, min_rank):
        root = s[:rank].sqrt()  # the split whitened_svd makes, so the rows quantize alike
        left = _int8_round_trip(u[:, :rank] * root)
        right = _int8_round_trip(root[:, None] * vh[:rank] @ white.s_inv)
        approx = left @ right
        result.factor_energy[rank] = energy(approx)
        if rank in measured:
            with _weight_replaced(layer, approx):
                result.factor_kl[rank], _ = probe.measure(block)
    return result


def _check_same_calibration(found, calibration: Calibration, analysis: Analysis) -> None:
    """The INT8 measurements extend the analysis' curves: same modules, same windows, same probe."""
    from svdcompress.analysis import _settings

    recorded = analysis.settings
    here = _settings(found, calibration, recorded["fractions"], recorded["probe_samples"],
                     recorded["probe_len"])
    changed = sorted(k for k in ("targets", "calibration_shape", "calibration_sha256")
                     if here[k] != recorded.get(k))
    if changed:
        raise AnalysisError(
            f"int8_sensitivity needs the model and calibration windows the analysis was made on; "
            f"these differ in {', '.join(changed)}. Pass the analysis' own windows "
            f"({recorded.get('calibration')}, shape {recorded.get('calibration_shape')})."
        )


def int8_sensitivity(
    model: nn.Module,
    calibration: Calibration | torch.Tensor,
    analysis: Analysis,
    out_dir: str | Path | None = None,
    *,
    min_rank: int = 8,
    probe_factors: bool = False,
    energies: bool = True,
    batch_size: int = 4,
) -> Int8Sensitivity:
    """What INT8 costs each module of ``analysis``, on the same calibration windows and probe.

    ``calibration`` must be the windows the analysis was made on (checked by fingerprint). Cost: one
    calibration pass, one SVD per module, and per module one probe pass (plus one per measured rank
    with ``probe_factors``: the INT8 factors' own KL, then also an interpolation point). With
    ``out_dir`` the results are cached in ``out_dir/int8_sensitivity.json`` after each block.

    ``energies=False`` measures only each module's dense INT8 KL, on the probe (no calibration
    pass, no SVD: a few times cheaper); INT8 factors are then predicted like float factors of the
    same rank — what the whitened SVD's INT8 factors cost on top of it is ~1 % of perplexity
    (BENCHMARKS.md, issue 4), far below the rank's own loss.
    """
    from svdcompress.analysis import _build_probe
    from svdcompress.calibration import Calibration as _Calibration
    from svdcompress.calibration import run_sequential

    if isinstance(calibration, torch.Tensor):
        calibration = _Calibration(calibration)
    settings = analysis.settings
    found = find_targets(model, tuple(settings["targets"]), ())
    _check_same_calibration(found, calibration, analysis)
    path = None if out_dir is None else Path(out_dir) / INT8_FILE
    done = {} if path is None else _read_int8(path, analysis.fingerprint, energies)
    todo = [t for t in found if t.name not in done]
    start = time.perf_counter()

    def save() -> None:
        if path is not None:
            atomic_write_json(path, Int8Sensitivity(analysis.fingerprint, done, energies=energies).to_dict())

    if todo and not energies:
        probe = _build_probe(model, calibration.windows[: settings["probe_samples"], : settings["probe_len"]])
        for target in todo:
            done[target.name] = ModuleInt8(target.name, None, _dense_int8_kl(model, target.name,
                                                                             target.block, probe))
            save()
    elif todo:
        probe = _build_probe(model, calibration.windows[: settings["probe_samples"], : settings["probe_len"]])

        def per_block(index: int, stats: dict) -> None:
            for name, module_stats in stats.items():
                done[name] = _measure_int8(model, analysis.module(name), index, module_stats.gram,
                                           module_stats.n_tokens, probe, min_rank, probe_factors)
            save()
            logger.info("int8 sensitivity: block %d (%.0f s)", index, time.perf_counter() - start)

        run_sequential(model, todo, calibration, per_block, batch_size=batch_size)
    return Int8Sensitivity(analysis.fingerprint, {t.name: done[t.name] for t in found},
                           time.perf_counter() - start, energies)
