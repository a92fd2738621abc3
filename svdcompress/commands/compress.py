"""``svdcompress compress`` and ``svdcompress export-dense``: flags map onto config fields."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from svdcompress import distributed
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
from svdcompress.config import (
    CompressionConfig,
    config_from_dict,
    load_recipe,
    method_names,
    preset,
)
from svdcompress.errors import ConfigError
from svdcompress.pipelines import DEFAULT_STORAGE
from svdcompress.pipelines.compress import allocation_options, run_compress
from svdcompress.recipe import recipe_data

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


def build_config(
    *,
    method: str | None = None,
    recipe: Path | None = None,
    preset_name: str | None = None,
    **flags: Any,
) -> CompressionConfig:
    """A config from (in order of precedence) explicit flags, a preset or recipe, and defaults.

    ``flags`` holds config fields; ``None`` means "not given". Without any ratio, param_ratio=0.8;
    without a recipe, preset or ``storage``, storage is ``pivoted`` (the same rank-r product as two
    factors in fewer numbers, so a budget buys higher ranks).
    """
    if recipe is not None and preset_name is not None:
        raise ConfigError("give either --recipe or --preset, not both.")
    given = {k: v for k, v in flags.items() if v is not None}
    if recipe is not None:
        base = load_recipe(recipe).to_dict()
    elif preset_name is not None:
        base = preset(preset_name, method or "svd").to_dict()
    else:  # the measured best training-free storage (BENCHMARKS.md, issue 14) unless --storage says
        base = {"method": method or "whiten", "storage": DEFAULT_STORAGE}
    if method is not None:
        base["method"] = method
    if any(f in given for f in _RATIO_FIELDS):
        base = {k: v for k, v in base.items() if k not in _RATIO_FIELDS}
    settings = {**base, **given}
    if not any(settings.get(f) is not None for f in _RATIO_FIELDS):
        settings["param_ratio"] = 0.8
    settings.pop("format_version", None)
    return config_from_dict(settings)


# --- issue 12: models larger than memory stream block by block (svdcompress.streaming) ---


# --- --allocate (issue 5): per-module ranks from measured sensitivity under a global budget ---


def _importance_flags(method: str | None, mode: str | None) -> dict[str, str]:
    if mode is None:
        return {}
    if method not in (None, "importance"):
        raise ConfigError(f"--importance-mode applies to --method importance, not {method!r}.")
    return {"mode": mode}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed the option (a default must not override a recipe's or preset's value)."""
    # By name: typer ships its own copy of click, whose ParameterSource is not click's class.
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


# Options that choose the compression itself: with any of them given, a shipped recipe is not used.
_SHAPING_OPTIONS = ("method", "param_ratio", "rank_ratio", "rank", "targets", "exclude", "rank_pattern",
                    "storage", "preset_name", "recipe", "allocate", "analysis_dir", "byte_budget",
                    "int8_options", "speed_caps")


def _shipped_recipe(ctx: typer.Context, model: str) -> Path | None:
    """The recipe svdcompress ships for built-in ``model`` when no option chose the compression:
    the best configuration measured for it is the default (other options still apply on top)."""
    if any(_given(ctx, name) for name in _SHAPING_OPTIONS):
        return None
    from svdcompress.zoo import shipped_recipe  # lazy: the zoo imports transformers

    return shipped_recipe(model)


def register(app: typer.Typer) -> None:
    @app.command()
    def compress(
        ctx: typer.Context,
        model: Annotated[str, typer.Argument(help="alias, local folder, .gguf file or hub id")] = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="output checkpoint folder")] = ...,
        method: Annotated[str | None, typer.Option(help=f"one of {method_names()} (default whiten)")] = None,
        param_ratio: Annotated[float | None, typer.Option(help="parameters kept / before, per matrix")] = None,
        rank_ratio: Annotated[float | None, typer.Option(help="rank / min(out, in)")] = None,
        rank: Annotated[int | None, typer.Option(help="singular values kept per matrix")] = None,
        targets: Annotated[list[str] | None, typer.Option(help="groups, roles, suffixes or regexes")] = None,
        exclude: Annotated[list[str] | None, typer.Option(help="patterns left uncompressed")] = None,
        rank_pattern: Annotated[list[str] | None, typer.Option(help="REGEX=RANK or REGEX=RATIO")] = None,
        storage: Annotated[str | None, typer.Option(
            help="pivoted (default: the rank-r product in r·(out+in−r) numbers, PIFA), factored "
            "(two factors, r·(out+in)) or dense (the rank-r product kept dense: denoising, saves nothing)")] = None,
        update: Annotated[bool | None, typer.Option("--update/--no-update", help="LS update of left factor")] = None,
        quant_bits: Annotated[int | None, typer.Option(help="store factors as int8 per-row (8); default float")] = None,
        head_quant_bits: Annotated[int | None, typer.Option(
            help="store the output head (lm_head) as int8 per-row (8; a tied head is untied, the "
            "embeddings stay float); default as it was")] = None,
        embedding_quant_bits: Annotated[int | None, typer.Option(
            help="store the input embeddings as int8 per-row (8; a tied model needs "
            "--head-quant-bits too); default as they were")] = None,
        error_blend: Annotated[float | None, typer.Option(
            help="whiten, 0..1: fit each layer towards the original model's outputs on the inputs "
            "the compressed model feeds it (0: plain whitening; tracks both streams: ~2x the "
            "calibration time)")] = None,
        calibration_stream: Annotated[str | None, typer.Option(
            help="compressed (default: each block calibrated on the inputs of the model compressed so "
            "far) or original (the original model's inputs, every block run once: faster)")] = None,
        # --- issue 6: gradient refinement of each module's factors (svdcompress.refine) ---
        refine_iters: Annotated[int | None, typer.Option(
            help="Adam steps refining each module's factor pair on its calibration output loss "
            "(0: none); with --update the target is the original model's outputs")] = None,
        refine_lr: Annotated[float | None, typer.Option(
            help="refinement step size, relative to each factor's RMS (default 0.03)")] = None,
        preset_name: Annotated[str | None, typer.Option("--preset", help="cf90 or k-only")] = None,
        recipe: Annotated[Path | None, typer.Option(help="YAML/JSON file with config fields")] = None,
        data: Annotated[str, typer.Option(help="calibration text source")] = DEFAULT_DATA,
        windows: Annotated[int, typer.Option(help="calibration windows")] = DEFAULT_WINDOWS,
        seq_len: Annotated[int, typer.Option(help="tokens per window")] = DEFAULT_SEQ_LEN,
        facts: Annotated[int, typer.Option(help="fact items for the importance method")] = 256,
        importance_mode: Annotated[str | None, typer.Option(
            help="importance method: fisher (default: Σ over fact batches of (σᵢ uᵢᵀ G vᵢ)²) or "
            "taylor (|Σ σᵢ uᵢᵀ G vᵢ|, where batches of opposite sign cancel)")] = None,
        seed: Annotated[int, typer.Option(
            help="seed for data selection (a --recipe or --preset keeps its own unless given)")] = DEFAULT_SEED,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
        allocate: Annotated[bool, typer.Option(
            "--allocate", help="per-module ranks from measured sensitivity, --param-ratio as a "
            "global budget")] = False,
        analysis_dir: Annotated[Path | None, typer.Option(
            help="with --allocate: analysis cache folder (as written by `analyze --out`)")] = None,
        byte_budget: Annotated[int | None, typer.Option(
            help="with --allocate: a global budget in bytes instead of --param-ratio")] = None,
        int8_options: Annotated[bool, typer.Option(
            "--int8-options", help="with --allocate --byte-budget: each module may also be dense "
            "INT8 or hold INT8 factors (measured per module on the calibration windows)")] = False,
        speed_caps: Annotated[Path | None, typer.Option(
            help="with --allocate: a break-even file measured for the --storage used (factored: "
            "experiments/results/speed/break_even.json, pivoted: .../break_even_pivoted/break_even.json): "
            "no rank above the one where that layer shape stops decoding faster than dense")] = None,
        error_report: Annotated[bool, typer.Option(
            "--error-report/--no-error-report",
            help="svd: also measure each layer's output error on calibration text (a pass "
            "through every block); data-aware methods always report it")] = False,
        stream: Annotated[bool | None, typer.Option(
            "--stream/--no-stream", help="compress block by block from the safetensors shards "
            "(default: when the model does not fit --max-memory)")] = None,
        max_memory: Annotated[str | None, typer.Option(
            help="memory budget, e.g. 12GB (default: the machine's available memory)")] = None,
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary here")] = None,
    ) -> None:
        """Compress MODEL's linear layers and write a checkpoint folder.

        A built-in model given no option that chooses the compression (method,
        ratio, ranks, targets, storage, preset, recipe, allocation) gets the
        recipe svdcompress ships for it, its best measured configuration
        (smollm2-135m: allocated ranks for 0.8, pivoted, error blend 0.25).
        Other models, or any such option: whiten, pivoted, param_ratio 0.8.
        """
        with handle_errors():
            shipped = _shipped_recipe(ctx, model)
            if shipped is not None:
                recipe = shipped
                if distributed.is_main():
                    typer.echo(f"{model}: the recipe svdcompress ships for it ({shipped.name}, its best "
                               "measured configuration); --method, --param-ratio, --rank, --targets, "
                               "--storage, --recipe or --allocate choose other settings", err=True)
            config = build_config(
                method=method, recipe=recipe, preset_name=preset_name,
                param_ratio=param_ratio, rank_ratio=rank_ratio, rank=rank,
                targets=split_list(targets), exclude=split_list(exclude),
                rank_pattern=_parse_rank_pattern(rank_pattern) if rank_pattern else None,
                # The byte allocator's INT8 options price factored storage only.
                storage=storage or ("factored" if int8_options else None), update=update,
                seed=seed if _given(ctx, "seed") else None,
                quant_bits=quant_bits, head_quant_bits=head_quant_bits,
                embedding_quant_bits=embedding_quant_bits, calibration_stream=calibration_stream,
                error_blend=error_blend,
                refine_iters=refine_iters, refine_lr=refine_lr,
                **_importance_flags(method, importance_mode),
            )
            if recipe is not None:  # a recipe's text settings replace the defaults, not given flags
                options = {"source": "data", "windows": "windows", "seq_len": "seq_len", "facts": "facts"}
                chosen = recipe_data(recipe, {"source": data, "windows": windows, "seq_len": seq_len,
                                              "facts": facts},
                                     {key for key, option in options.items() if _given(ctx, option)})
                data, windows, seq_len, facts = (chosen[key] for key in options)
            summary = run_compress(model, config, out, calib=data, calib_samples=windows,
                                   seq_len=seq_len, n_facts=facts, overwrite=overwrite, recipe=recipe,
                                   allocation=allocation_options(allocate, analysis_dir, byte_budget,
                                                                  int8_options, speed_caps),
                                   error_report=error_report, stream=stream, max_memory=max_memory,
                                   device=device)
            if distributed.is_main():
                _print_summary(summary, out)
                if json_out is not None:
                    write_json(json_out, summary)

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


def _cell(value) -> str:
    if isinstance(value, dict) and "quant_bits" in value:  # an int8 table (head or embeddings)
        untied = ", untied" if value["untied"] else ""
        return (f"INT{value['quant_bits']} {value['name']}: {value['bytes_after']:,} bytes "
                f"(was {value['bytes_before']:,}{untied}), weight error {value['weight_error']:.4f}")
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compressed → {out}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, _cell(value))
    Console().print(table)
