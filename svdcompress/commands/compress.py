"""``svdcompress compress`` and ``svdcompress export-dense``: flags map onto config fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from svdcompress.commands import handle_errors
from svdcompress.config import (
    CompressionConfig,
    config_from_dict,
    load_recipe,
    method_names,
    preset,
)
from svdcompress.errors import ConfigError

__all__ = ["build_config", "register"]

logger = logging.getLogger(__name__)

_RATIO_FIELDS = ("rank", "rank_ratio", "param_ratio")


def _parse_rank_pattern(items: list[str]) -> dict[str, int | float]:
    """``REGEX=16`` (a rank) or ``REGEX=0.9`` (a rank_ratio)."""
    pattern: dict[str, int | float] = {}
    for item in items:
        regex, sep, value = item.rpartition("=")
        if not sep or not regex:
            raise ConfigError(f"--rank-pattern {item!r}: write REGEX=RANK (e.g. 'layers\\.0\\.=64').")
        try:
            pattern[regex] = float(value) if "." in value else int(value)
        except ValueError:
            raise ConfigError(f"--rank-pattern {item!r}: {value!r} is neither a rank nor a ratio.") from None
    return pattern


def _split_list(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def build_config(
    *,
    method: str | None = None,
    recipe: Path | None = None,
    preset_name: str | None = None,
    **flags: Any,
) -> CompressionConfig:
    """A config from (in order of precedence) explicit flags, a preset or recipe, and defaults.

    ``flags`` holds config fields; ``None`` means "not given". Without any ratio, param_ratio=0.8.
    """
    if recipe is not None and preset_name is not None:
        raise ConfigError("give either --recipe or --preset, not both.")
    given = {k: v for k, v in flags.items() if v is not None}
    if recipe is not None:
        base = load_recipe(recipe).to_dict()
    elif preset_name is not None:
        base = preset(preset_name, method or "svd").to_dict()
    else:
        base = {"method": method or "whiten"}
    if method is not None:
        base["method"] = method
    if any(f in given for f in _RATIO_FIELDS):
        base = {k: v for k, v in base.items() if k not in _RATIO_FIELDS}
    settings = {**base, **given}
    if not any(settings.get(f) is not None for f in _RATIO_FIELDS):
        settings["param_ratio"] = 0.8
    settings.pop("format_version", None)
    return config_from_dict(settings)


def _calibration(tokenizer, model, config, calib: str, samples: int, seq_len: int, seed: int):
    from svdcompress.calibration import Calibration
    from svdcompress.datasets import token_windows

    windows = token_windows(
        tokenizer, calib, "calib", seq_len=seq_len, n_samples=samples, seed=seed,
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )
    return Calibration(windows, source=f"{calib}:calib seq_len={seq_len} n={samples} seed={seed}")


def _importance(model, tokenizer, config, n_facts: int, seed: int):
    from svdcompress.datasets import load_facts
    from svdcompress.methods.importance import compute_importance

    facts = load_facts(n_facts, seed=seed, split="calib")
    return compute_importance(
        model, tokenizer, facts, targets=config.targets, exclude=config.exclude,
        source=f"bigbench qa_wikidata calib split: {n_facts} facts seed={seed}",
    )


def _check_before_loading(config: CompressionConfig, out: Path, *, overwrite: bool, calib: str,
                          calib_samples: int, seq_len: int, n_facts: int,
                          allocation: dict | None) -> None:
    """Everything that needs no model is checked first: fail before minutes of loading."""
    from svdcompress.datasets import check_window_request

    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    if config.uses_calibration or config.method == "svd" or allocation is not None:
        check_window_request(seq_len, calib_samples, source=calib)
    if config.method == "importance" and n_facts < 1:
        raise ConfigError(f"--facts {n_facts}: the importance method needs at least 1 fact prompt.")


def run_compress(model_spec: str, config: CompressionConfig, out: Path, *, calib: str,
                 calib_samples: int, seq_len: int, n_facts: int, overwrite: bool,
                 allocation: dict | None = None) -> dict:
    from svdcompress.checkpoint import save
    from svdcompress.compress import compress_
    from svdcompress.zoo import load_model

    _check_before_loading(config, out, overwrite=overwrite, calib=calib, calib_samples=calib_samples,
                          seq_len=seq_len, n_facts=n_facts, allocation=allocation)
    model, tokenizer = load_model(model_spec)
    calibration = None
    if config.uses_calibration or config.method == "svd":
        calibration = _calibration(tokenizer, model, config, calib, calib_samples, seq_len, config.seed)
    if allocation is not None:
        config, calibration = _allocate(model, tokenizer, config, calibration, allocation,
                                        calib, calib_samples, seq_len)
    importance = _importance(model, tokenizer, config, n_facts, config.seed) if config.method == "importance" else None
    report = compress_(model, config, calibration, importance=importance)
    model.config.compression_config["base_model"] = model_spec
    report_json = json.dumps(report.to_dict(), indent=2)
    save(model, out, tokenizer=tokenizer, overwrite=overwrite,
         extra_files={"compression_report.json": report_json})
    return report.summary()


# --- --allocate (issue 5): per-module ranks from measured sensitivity under a global budget ---


def _allocate(model, tokenizer, config, calibration, allocation: dict, calib, samples, seq_len):
    from svdcompress.allocation import allocate_config

    if calibration is None:  # sensitivity is measured on calibration text whatever the method
        calibration = _calibration(tokenizer, model, config, calib, samples, seq_len, config.seed)
    return allocate_config(model, config, calibration, **allocation), calibration


def _allocation_options(allocate: bool, analysis_dir: Path | None, byte_budget: int | None):
    if not allocate:
        if analysis_dir is not None or byte_budget is not None:
            raise ConfigError("--analysis-dir and --byte-budget only apply with --allocate.")
        return None
    return {"analysis_dir": analysis_dir, "byte_budget": byte_budget}


def register(app: typer.Typer) -> None:
    @app.command()
    def compress(
        model: Annotated[str, typer.Argument(help="alias, local folder, .gguf file or hub id")] = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="output checkpoint folder")] = ...,
        method: Annotated[str | None, typer.Option(help=f"one of {method_names()} (default whiten)")] = None,
        param_ratio: Annotated[float | None, typer.Option(help="parameters kept / before, per matrix")] = None,
        rank_ratio: Annotated[float | None, typer.Option(help="rank / min(out, in)")] = None,
        rank: Annotated[int | None, typer.Option(help="singular values kept per matrix")] = None,
        targets: Annotated[list[str] | None, typer.Option(help="groups, roles, suffixes or regexes")] = None,
        exclude: Annotated[list[str] | None, typer.Option(help="patterns left uncompressed")] = None,
        rank_pattern: Annotated[list[str] | None, typer.Option(help="REGEX=RANK or REGEX=RATIO")] = None,
        storage: Annotated[str | None, typer.Option(help="factored (saves) or dense (denoise)")] = None,
        update: Annotated[bool | None, typer.Option("--update/--no-update", help="LS update of left factor")] = None,
        quant_bits: Annotated[int | None, typer.Option(help="store factors as int8 per-row (8); default float")] = None,
        # --- issue 6: gradient refinement of each module's factors (svdcompress.refine) ---
        refine_iters: Annotated[int | None, typer.Option(
            help="Adam steps refining each module's factor pair on its calibration output loss "
            "(0: none); with --update the target is the original model's outputs")] = None,
        refine_lr: Annotated[float | None, typer.Option(
            help="refinement step size, relative to each factor's RMS (default 0.03)")] = None,
        preset_name: Annotated[str | None, typer.Option("--preset", help="cf90 or k-only")] = None,
        recipe: Annotated[Path | None, typer.Option(help="YAML/JSON file with config fields")] = None,
        calib: Annotated[str, typer.Option(help="calibration text source")] = "wiki",
        calib_samples: Annotated[int, typer.Option(help="calibration windows")] = 64,
        seq_len: Annotated[int, typer.Option(help="tokens per window")] = 512,
        facts: Annotated[int, typer.Option(help="fact items for the importance method")] = 256,
        seed: Annotated[int | None, typer.Option(help="seed for data selection")] = None,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
        allocate: Annotated[bool, typer.Option(
            "--allocate", help="per-module ranks from measured sensitivity, --param-ratio as a "
            "global budget")] = False,
        analysis_dir: Annotated[Path | None, typer.Option(
            help="with --allocate: analysis cache folder (as written by `analyze --out`)")] = None,
        byte_budget: Annotated[int | None, typer.Option(
            help="with --allocate: a global budget in bytes instead of --param-ratio")] = None,
    ) -> None:
        """Compress MODEL's linear layers and write a checkpoint folder."""
        with handle_errors():
            config = build_config(
                method=method, recipe=recipe, preset_name=preset_name,
                param_ratio=param_ratio, rank_ratio=rank_ratio, rank=rank,
                targets=_split_list(targets), exclude=_split_list(exclude),
                rank_pattern=_parse_rank_pattern(rank_pattern) if rank_pattern else None,
                storage=storage, update=update, seed=seed, quant_bits=quant_bits,
                refine_iters=refine_iters, refine_lr=refine_lr,
            )
            summary = run_compress(model, config, out, calib=calib, calib_samples=calib_samples,
                                   seq_len=seq_len, n_facts=facts, overwrite=overwrite,
                                   allocation=_allocation_options(allocate, analysis_dir, byte_budget))
            _print_summary(summary, out)

    @app.command("export-dense")
    def export_dense_command(
        checkpoint: Annotated[Path, typer.Argument(help="a compressed checkpoint folder")],
        out: Annotated[Path, typer.Option(help="folder for the plain model")] = ...,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    ) -> None:
        """Write a plain model that stock transformers loads without svdcompress."""
        with handle_errors():
            from svdcompress.checkpoint import export_dense, load

            model, tokenizer = load(checkpoint)
            export_dense(model, out, tokenizer=tokenizer, overwrite=overwrite)
            typer.echo(f"wrote {out}")


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compressed → {out}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)
