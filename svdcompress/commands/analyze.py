"""``svdcompress analyze``: spectra, measured sensitivity, allocated ranks and a visual report."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from svdcompress.commands import handle_errors
from svdcompress.errors import ConfigError

__all__ = ["register", "run_analyze"]

logger = logging.getLogger(__name__)

_CURVE_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--fractions {text!r}: write comma-separated fractions, e.g. 0.7,0.35") from None


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
                rank_step=8, diagnose=("allocated",), eval_windows=None) -> dict[str, Any]:
    """Analyse, allocate at each ratio (writing ``recipe-pX.json``), diagnose, write the report."""
    from svdcompress.allocation import allocate, predicted_curve
    from svdcompress.analysis import DEFAULT_FRACTIONS, analyze
    from svdcompress.config import WhitenConfig
    from svdcompress.fetch import atomic_write_json
    from svdcompress.report import write_report

    analysis = analyze(model, calibration, out, targets=targets, exclude=exclude,
                       fractions=fractions or DEFAULT_FRACTIONS, probe_samples=probe_samples,
                       probe_len=probe_len)
    options = {"min_rank": min_rank, "rank_step": rank_step}
    allocations, recipes = {}, {}
    for ratio in ratios:
        allocation = allocate(analysis, param_ratio=ratio, **options)
        base = WhitenConfig(param_ratio=ratio, targets=tuple(targets), exclude=tuple(exclude))
        name = f"allocation-p{ratio:.2f}"
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


def register(app: typer.Typer) -> None:
    @app.command()
    def analyze(
        model: Annotated[str, typer.Argument(help="alias, local folder, .gguf file or hub id")] = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="analysis folder (cache, JSON, report, plots)")] = ...,
        calib: Annotated[str, typer.Option(help="calibration text source")] = "wiki",
        calib_samples: Annotated[int, typer.Option(help="calibration windows")] = 64,
        seq_len: Annotated[int, typer.Option(help="tokens per window")] = 512,
        targets: Annotated[list[str] | None, typer.Option(help="groups, roles, suffixes or regexes")] = None,
        exclude: Annotated[list[str] | None, typer.Option(help="patterns left out")] = None,
        probe_samples: Annotated[int, typer.Option(help="windows in the sensitivity probe")] = 2,
        probe_len: Annotated[int, typer.Option(help="tokens per probe window")] = 256,
        fractions: Annotated[str, typer.Option(help="parameter fractions where KL is measured")] = "0.7,0.35",
        param_ratio: Annotated[list[float] | None, typer.Option(help="budgets to allocate (repeatable)")] = None,
        min_rank: Annotated[int, typer.Option(help="smallest rank allocation may choose")] = 8,
        rank_step: Annotated[int, typer.Option(help="allocated ranks are multiples of this")] = 8,
        diagnose: Annotated[list[str] | None, typer.Option(
            help="policies to apply and diagnose at the first budget: allocated, uniform")] = None,
        no_diagnose: Annotated[bool, typer.Option("--no-diagnose", help="skip diagnostics")] = False,
        eval_samples: Annotated[int, typer.Option(help="held-out windows for diagnostics")] = 4,
    ) -> None:
        """Measure where compression hurts MODEL, allocate ranks, and write a report to --out."""
        with handle_errors():
            from svdcompress.commands.compress import _calibration, _split_list
            from svdcompress.config import WhitenConfig
            from svdcompress.datasets import check_window_request, token_windows
            from svdcompress.zoo import load_model

            parsed_fractions, ratios = _parse_fractions(fractions), tuple(param_ratio or [0.8])
            _check_budgets(ratios)  # everything that needs no model is checked before one loads
            check_window_request(seq_len, calib_samples, source=calib)
            loaded, tokenizer = load_model(model)
            calibration = _calibration(tokenizer, loaded, WhitenConfig(param_ratio=0.8), calib,
                                       calib_samples, seq_len, 0)
            windows = None if no_diagnose else token_windows(
                tokenizer, calib, "eval", seq_len=seq_len, n_samples=eval_samples, seed=0)
            summary = run_analyze(
                loaded, tokenizer, calibration, out, targets=_split_list(targets) or ("all-linear",),
                exclude=_split_list(exclude) or (), fractions=parsed_fractions,
                probe_samples=probe_samples, probe_len=probe_len, ratios=ratios,
                min_rank=min_rank, rank_step=rank_step, diagnose=tuple(diagnose or ["allocated"]),
                eval_windows=windows,
            )
            typer.echo(f"analysed {len(summary['modules'])} modules in "
                       f"{summary['analysis_seconds']:.0f} s; report: {out / 'report.md'}")
