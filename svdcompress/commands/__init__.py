"""CLI commands, one module each; every module exposes ``register(app: typer.Typer)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from svdcompress.errors import SvdCompressError

__all__ = ["handle_errors"]


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Expected failures become one line on stderr and exit status 2, never a traceback."""
    try:
        yield
    except SvdCompressError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
