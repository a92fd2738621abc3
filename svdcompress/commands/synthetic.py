"""``svdcompress make-synthetic``: a Llama-shaped model with random weights, for benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from svdcompress.commands import handle_errors

__all__ = ["register"]

_DTYPES = ("float32", "bfloat16", "float16")


def register(app: typer.Typer) -> None:
    @app.command("make-synthetic")
    def make_synthetic_command(
        shape: Annotated[str, typer.Option(help="tinyllama-1.1b or llama-7b")] = "tinyllama-1.1b",
        out: Annotated[Path, typer.Option(help="output folder (under runs/: never commit it)")] = ...,
        dtype: Annotated[str, typer.Option(help=f"weight dtype, one of {_DTYPES}")] = "float32",
        seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
        layers: Annotated[int | None, typer.Option(help="decoder blocks (default: the shape's)")] = None,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    ) -> None:
        """Write a random-weight model of a published shape as sharded safetensors + tokenizer."""
        with handle_errors():
            import torch

            from svdcompress.errors import ConfigError
            from svdcompress.synthetic import make_synthetic

            if dtype not in _DTYPES:
                raise ConfigError(f"--dtype {dtype!r}: use one of {list(_DTYPES)}.")
            overrides = {} if layers is None else {"num_hidden_layers": layers}
            make_synthetic(shape, out, seed=seed, dtype=getattr(torch, dtype), overwrite=overwrite,
                           **overrides)
            typer.echo(f"wrote {out}")
