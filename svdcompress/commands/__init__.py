"""CLI commands, one module each; every module exposes ``register(app: typer.Typer)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from svdcompress.errors import SvdCompressError

__all__ = ["handle_errors", "split_list"]


def split_list(values: list[str] | None) -> tuple[str, ...] | None:
    """A repeatable option whose values may also be comma-separated (``--targets q_proj,k_proj``)."""
    if not values:
        return None
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Expected failures become one line on stderr and exit status 2, never a traceback."""
    try:
        yield
    except SvdCompressError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
