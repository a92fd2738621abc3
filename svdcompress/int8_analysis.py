"""What INT8 costs each module, measured on an analysis' calibration windows and probe.

:func:`int8_sensitivity` extends a sensitivity analysis (:mod:`svdcompress.analysis`) with each
module's cost of dense INT8 and of INT8 factors on top of each rank, so the byte allocator
(:func:`svdcompress.allocation.allocate` with ``int8``) can choose per module among float and INT8
options. The quantizer is the one :mod:`svdcompress.quantize` stores (symmetric, per row).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from svdcompress.analysis import (
    Analysis,
    ModuleAnalysis,
    analysis_settings,
    build_probe,
    interpolate_kl,
    weight_replaced,
)
from svdcompress.calibration import Calibration, run_sequential
from svdcompress.errors import AnalysisError
from svdcompress.fetch import atomic_write_json
from svdcompress.linalg import break_even_rank, dequantize, quantize_symmetric, whitening
from svdcompress.modules import dense_weight
from svdcompress.provenance import provenance
from svdcompress.targets import find_targets

__all__ = ["INT8_FILE", "Int8Sensitivity", "ModuleInt8", "int8_sensitivity"]

logger = logging.getLogger(__name__)

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


def _read_int8(path: Path, fingerprint: str, energies: bool) -> tuple[dict[str, ModuleInt8], float]:
    """The cached modules and the seconds spent measuring them (over every run that added some)."""
    if not path.is_file():
        return {}, 0.0
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
    return ({name: ModuleInt8.from_dict(m) for name, m in data["modules"].items()},
            float(data.get("seconds", 0.0)))


def _int8_round_trip(matrix: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_symmetric(matrix, 8, dim=1)  # per row, as LowRankLinear.quantize_ stores it
    return dequantize(q, scale, dim=1, dtype=torch.float64)


def _factor_ranks(module: ModuleAnalysis, min_rank: int) -> list[int]:
    top = break_even_rank(module.out_features, module.in_features)
    return sorted({min(min_rank, top), *(m.rank for m in module.measurements), top})


def _dense_int8_kl(model: nn.Module, name: str, block: int, probe) -> float:
    layer = model.get_submodule(name)
    with weight_replaced(layer, _int8_round_trip(dense_weight(layer).detach().double())):
        return probe.measure(block)[0]


def _measure_int8(model: nn.Module, module: ModuleAnalysis, block: int, gram: torch.Tensor,
                  n_tokens: int, probe, min_rank: int, probe_factors: bool) -> ModuleInt8:
    """Whitened energies of dense INT8 and of INT8 whitened-SVD factors at a few ranks; the probe
    KL of dense INT8 (and, if ``probe_factors``, of the factors at the analysis' measured ranks)."""
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
            with weight_replaced(layer, approx):
                result.factor_kl[rank], _ = probe.measure(block)
    return result


def _check_same_calibration(found, calibration: Calibration, analysis: Analysis) -> None:
    """The INT8 measurements extend the analysis' curves: same modules, same windows, same probe."""
    recorded = analysis.settings
    here = analysis_settings(found, calibration, recorded["fractions"], recorded["probe_samples"],
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
    if isinstance(calibration, torch.Tensor):
        calibration = Calibration(calibration)
    settings = analysis.settings
    found = find_targets(model, tuple(settings["targets"]), ())
    _check_same_calibration(found, calibration, analysis)
    path = None if out_dir is None else Path(out_dir) / INT8_FILE
    done, earlier_seconds = ({}, 0.0) if path is None else _read_int8(path, analysis.fingerprint, energies)
    todo = [t for t in found if t.name not in done]
    start = time.perf_counter()

    def seconds() -> float:
        return earlier_seconds + time.perf_counter() - start

    stamp = provenance() if path is not None and todo else None  # once: it asks git

    def save() -> None:
        if path is not None:
            atomic_write_json(path, {**Int8Sensitivity(analysis.fingerprint, done, seconds(), energies).to_dict(),
                                     "provenance": stamp})

    if todo and not energies:
        probe = build_probe(model, calibration.windows[: settings["probe_samples"], : settings["probe_len"]])
        for target in todo:
            done[target.name] = ModuleInt8(target.name, None, _dense_int8_kl(model, target.name,
                                                                             target.block, probe))
            save()
    elif todo:
        probe = build_probe(model, calibration.windows[: settings["probe_samples"], : settings["probe_len"]])

        def per_block(index: int, stats: dict) -> None:
            for name, module_stats in stats.items():
                done[name] = _measure_int8(model, analysis.module(name), index, module_stats.gram,
                                           module_stats.n_tokens, probe, min_rank, probe_factors)
            save()
            logger.info("int8 sensitivity: block %d (%.0f s)", index, time.perf_counter() - start)

        run_sequential(model, todo, calibration, per_block, batch_size=batch_size)
    return Int8Sensitivity(analysis.fingerprint, {t.name: done[t.name] for t in found}, seconds(), energies)
