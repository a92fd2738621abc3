"""``svdcompress quantize``: int8 factors for a compressed checkpoint, or the INT8 baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from svdcompress.commands import handle_errors
from svdcompress.commands._vocabulary import write_json
from svdcompress.provenance import command_line

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: Annotated[str, typer.Argument(
            help="a compressed checkpoint (its factors become int8) or a plain model / alias "
                 "(whole-model INT8 baseline, no SVD)")] = "smollm2-135m",
        out: Annotated[Path, typer.Option(help="output checkpoint folder")] = ...,
        bits: Annotated[int, typer.Option(help="integer width (supported: 8)")] = 8,
        targets: Annotated[list[str] | None, typer.Option(
            help="baseline only: layers to quantize (default all-linear)")] = None,
        exclude: Annotated[list[str] | None, typer.Option(help="baseline only: layers left float")] = None,
        head: Annotated[bool, typer.Option(
            "--head", help="also store the output head (lm_head) as int8 per-row (a tied head is "
            "untied; the embeddings stay float unless --embeddings)")] = False,
        embeddings: Annotated[bool, typer.Option(
            "--embeddings", help="also store the input embeddings as int8 per-row (a tied model "
            "needs --head too)")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary here")] = None,
    ) -> None:
        """Store weights as symmetric per-row int8 codes + float32 scales, and save the result."""
        with handle_errors():
            from svdcompress.checkpoint import save
            from svdcompress.config import check_quant_bits
            from svdcompress.errors import ConfigError
            from svdcompress.modules import LowRankLinear
            from svdcompress.quantize import (
                check_outer,
                quantize_factors_,
                quantize_outer_,
                quantize_weights_,
            )
            from svdcompress.zoo import load_model

            check_quant_bits(bits)
            if out.exists() and not overwrite:
                raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
            loaded, tokenizer = load_model(model)
            outer = {"head_bits": bits if head else None, "embedding_bits": bits if embeddings else None}
            check_outer(loaded, *outer.values())  # before any work
            if any(isinstance(m, LowRankLinear) for m in loaded.modules()):
                if targets or exclude:
                    raise ConfigError("--targets/--exclude apply to the baseline; a compressed "
                                      "checkpoint's low-rank factors are all quantized.")
                count = quantize_factors_(loaded, bits)
                summary = {"modules": count, "quant_bits": bits, "kind": "factors"}
                what = f"int{bits} factors in {count} low-rank modules"
            else:
                summary = quantize_weights_(
                    loaded, bits, targets=tuple(targets or ("all-linear",)), exclude=tuple(exclude or ()))
                loaded.config.compression_config["base_model"] = model
                ratio = summary["target_bytes_after"] / summary["target_bytes_before"]
                summary = {**summary, "quant_bits": bits, "kind": "baseline", "byte_ratio": ratio}
                what = f"int{bits} baseline of {summary['modules']} linear layers ({ratio:.1%} of their bytes)"
            for key, done in quantize_outer_(loaded, **outer).items():
                summary[key] = done
                what += f", and the {'output head' if key == 'head' else 'input embeddings'} ({done['bytes_after'] / 1e6:.1f} MB)"
            save(loaded, out, tokenizer=tokenizer, overwrite=overwrite, command=command_line())
            typer.echo(f"wrote {out}: {what}")
            if json_out is not None:
                write_json(json_out, summary)
