"""``svdcompress analyze``: spectra, measured sensitivity, allocated ranks and a visual report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from svdcompress.commands import handle_errors, split_list
from svdcompress.commands._vocabulary import (
    DEFAULT_DATA,
    DEFAULT_DEVICE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_WINDOWS,
    DEVICE_HELP,
    write_json,
)
from svdcompress.errors import ConfigError
from svdcompress.pipelines.analyze import analyze_model

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--fractions {text!r}: write comma-separated fractions, e.g. 0.7,0.35") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def analyze(
        model: Annotated[str, typer.Argument(help="alias, local folder, .gguf file or hub id")] = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="analysis folder (cache, JSON, report, plots)")] = ...,
        data: Annotated[str, typer.Option(help="calibration text source")] = DEFAULT_DATA,
        windows: Annotated[int, typer.Option(help="calibration windows")] = DEFAULT_WINDOWS,
        seq_len: Annotated[int, typer.Option(help="tokens per window")] = DEFAULT_SEQ_LEN,
        targets: Annotated[list[str] | None, typer.Option(help="groups, roles, suffixes or regexes")] = None,
        exclude: Annotated[list[str] | None, typer.Option(help="patterns left out")] = None,
        probe_windows: Annotated[int, typer.Option(
            help="calibration windows (the first ones) in the sensitivity probe")] = 2,
        probe_len: Annotated[int, typer.Option(help="tokens per probe window")] = 256,
        fractions: Annotated[str, typer.Option(help="parameter fractions where KL is measured")] = "0.7,0.35",
        param_ratio: Annotated[list[float] | None, typer.Option(help="budgets to allocate (repeatable)")] = None,
        min_rank: Annotated[int, typer.Option(help="smallest rank allocation may choose")] = 8,
        rank_step: Annotated[int, typer.Option(help="allocated ranks are multiples of this")] = 8,
        storage: Annotated[str, typer.Option(
            help="how the recipes store each rank: factored, or pivoted (the same product in "
                 "fewer numbers: PIFA)")] = "factored",
        diagnose: Annotated[list[str] | None, typer.Option(
            help="policies to apply and diagnose at the first budget: allocated, uniform")] = None,
        no_diagnose: Annotated[bool, typer.Option("--no-diagnose", help="skip diagnostics")] = False,
        eval_windows: Annotated[int, typer.Option(help="held-out windows for diagnostics")] = 4,
        seed: Annotated[int, typer.Option(help="picks the windows")] = DEFAULT_SEED,
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
        json_out: Annotated[Path | None, typer.Option(
            "--json", help="also write the summary (analysis.json's content) here")] = None,
    ) -> None:
        """Measure where compression hurts MODEL, allocate ranks, and write a report to --out."""
        with handle_errors():
            summary = analyze_model(
                model, out, data=data, windows=windows, seq_len=seq_len, seed=seed, device=device,
                targets=split_list(targets) or ("all-linear",), exclude=split_list(exclude) or (),
                fractions=_parse_fractions(fractions), probe_windows=probe_windows,
                probe_len=probe_len, ratios=tuple(param_ratio or [0.8]), min_rank=min_rank,
                rank_step=rank_step, diagnose=() if no_diagnose else tuple(diagnose or ["allocated"]),
                eval_windows=eval_windows, storage=storage,
            )
            typer.echo(f"analysed {len(summary['modules'])} modules in "
                       f"{summary['analysis_seconds']:.0f} s; report: {out / 'report.md'}")
            if json_out is not None:
                write_json(json_out, summary)
