"""``svdcompress analyze`` as a library call: spectra, measured sensitivity, allocated ranks, report."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from svdcompress.errors import ConfigError
from svdcompress.pipelines import DEFAULT_DATA, DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_WINDOWS

__all__ = ["analyze_model", "run_analyze"]

_CURVE_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _check_budgets(ratios: tuple[float, ...]) -> None:
    for ratio in ratios:
        if not 0 < ratio <= 1:
            raise ConfigError(f"--param-ratio {ratio} is outside (0, 1]; it is the fraction of the "
                              "targeted parameters kept, e.g. 0.8.")


def _diagnose(model, tokenizer, calibration, windows, configs: dict[str, Any]) -> dict[str, dict]:
    """Compress a copy of ``model`` with each config and compare it with the original."""
    from svdcompress.compress import compress_
    from svdcompress.diagnostics import diagnose_policy

    results = {}
    for label, config in configs.items():
        compressed = copy.deepcopy(model)
        compress_(compressed, config, calibration)
        results[label] = diagnose_policy(model, compressed, windows, tokenizer=tokenizer).to_dict()
        del compressed
    return results


def _policies(allocated, uniform, names: list[str]) -> dict[str, Any]:
    unknown = sorted(set(names) - {"allocated", "uniform"})
    if unknown:
        raise ConfigError(f"--diagnose {unknown}: choose allocated and/or uniform.")
    configs = {"allocated": allocated, "uniform": uniform}
    return {f"{name} p={uniform.param_ratio}": configs[name] for name in names}


def run_analyze(model, tokenizer, calibration, out: Path, *, targets=("all-linear",), exclude=(),
                fractions=None, probe_samples=2, probe_len=256, ratios=(0.8,), min_rank=8,
                rank_step=8, diagnose=("allocated",), eval_windows=None,
                storage="factored") -> dict[str, Any]:
    """Analyse, allocate at each ratio (writing ``recipe-pX.json``), diagnose, write the report.

    ``storage``: ``factored`` or ``pivoted`` (PIFA), how the recipes store each rank and so what
    a rank costs; the analysis itself does not depend on it (same rank, same product)."""
    from svdcompress.allocation import allocate, predicted_curve
    from svdcompress.analysis import DEFAULT_FRACTIONS, analyze
    from svdcompress.config import WhitenConfig
    from svdcompress.fetch import atomic_write_json
    from svdcompress.report import write_report

    analysis = analyze(model, calibration, out, targets=targets, exclude=exclude,
                       fractions=fractions or DEFAULT_FRACTIONS, probe_samples=probe_samples,
                       probe_len=probe_len)
    options = {"min_rank": min_rank, "rank_step": rank_step, "storage": storage}
    allocations, recipes = {}, {}
    for ratio in ratios:
        allocation = allocate(analysis, param_ratio=ratio, **options)
        base = WhitenConfig(param_ratio=ratio, targets=tuple(targets), exclude=tuple(exclude),
                            storage=storage)
        name = f"allocation-p{ratio:.2f}" + ("-pivoted" if storage == "pivoted" else "")
        allocations[name], recipes[ratio] = allocation.to_dict(), (allocation.to_config(base), base)
        atomic_write_json(out / f"{name}.json", recipes[ratio][0].to_dict())  # a --recipe file
    ratios_for_curve = sorted({*_CURVE_RATIOS, *ratios})
    curve = predicted_curve(analysis, ratios_for_curve, **options)
    diagnostics = {}
    if diagnose and eval_windows is not None:
        configs = _policies(*recipes[ratios[0]], list(diagnose))
        diagnostics = _diagnose(model, tokenizer, calibration, eval_windows, configs)
    summary = {
        "fingerprint": analysis.fingerprint, "settings": analysis.settings,
        "analysis_seconds": analysis.seconds,
        "modules": {m.name: {"block": m.block, "role": m.role, **m.summary(),
                             "measurements": [vars(x) for x in m.measurements]}
                    for m in analysis.modules},
        "sensitivity": analysis.sensitivity(0.5), "roles": analysis.role_summary(0.5),
        "allocations": allocations, "predicted_curve": curve, "diagnostics": diagnostics,
    }
    atomic_write_json(out / "analysis.json", summary)
    write_report(out, analysis, allocations=allocations, curve=curve, diagnostics=diagnostics)
    return summary


def analyze_model(model_spec: str, out: Path, *, data: str = DEFAULT_DATA,
                  windows: int = DEFAULT_WINDOWS, seq_len: int = DEFAULT_SEQ_LEN,
                  seed: int = DEFAULT_SEED, device: str = "cpu", eval_windows: int = 4,
                  probe_windows: int = 2, diagnose: tuple[str, ...] = ("allocated",),
                  **options: Any) -> dict[str, Any]:
    """Load ``model_spec``, read calibration (and held-out) windows, and :func:`run_analyze`.

    ``options``: the rest of :func:`run_analyze`'s settings (targets, exclude, fractions,
    probe_len, ratios, min_rank, rank_step). ``diagnose=()`` skips the diagnostics.
    """
    from svdcompress.config import WhitenConfig
    from svdcompress.datasets import check_window_request, token_windows
    from svdcompress.devices import resolve_device
    from svdcompress.pipelines.compress import calibration_windows
    from svdcompress.zoo import load_model

    _check_budgets(tuple(options.get("ratios", (0.8,))))  # all that needs no model, before one loads
    check_window_request(seq_len, windows, source=data)
    loaded, tokenizer = load_model(model_spec, device=resolve_device(device))
    calibration = calibration_windows(tokenizer, loaded, WhitenConfig(param_ratio=0.8), data, windows,
                               seq_len, seed)
    held_out = None if not diagnose else token_windows(
        tokenizer, data, "eval", seq_len=seq_len, n_samples=eval_windows, seed=seed)
    return run_analyze(loaded, tokenizer, calibration, out, probe_samples=probe_windows,
                       diagnose=diagnose, eval_windows=held_out, **options)
