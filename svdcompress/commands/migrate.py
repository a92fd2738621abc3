"""``svdcompress migrate``: rewrite a checkpoint of an older format as the current one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from svdcompress.commands import handle_errors

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def migrate(
        checkpoint: Annotated[Path, typer.Argument(help="a compressed checkpoint folder")],
        out: Annotated[Path | None, typer.Option(
            help="write the migrated folder here (default: rewrite CHECKPOINT in place)")] = None,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    ) -> None:
        """Rewrite a checkpoint written by an earlier svdcompress in the current format, which
        transformers' AutoModelForCausalLM.from_pretrained reads (after import svdcompress)."""
        with handle_errors():
            from svdcompress.checkpoint import CHECKPOINT_FORMAT
            from svdcompress.checkpoint import migrate as migrate_folder

            written = migrate_folder(checkpoint, out, overwrite=overwrite)
            typer.echo(f"{written} is svdcompress checkpoint format {CHECKPOINT_FORMAT}")
