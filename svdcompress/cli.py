"""The ``svdcompress`` command line: a thin layer that maps flags onto library calls.

Each command lives in its own module under :mod:`svdcompress.commands` and exposes
``register(app)``; every such module is registered here, so adding a command is adding a file.
Expected failures (:class:`~svdcompress.errors.SvdCompressError`) end as one line on stderr and
exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Annotated

import typer
from typer.core import TyperCommand

from svdcompress import commands
from svdcompress.commands._vocabulary import VocabularyCommand
from svdcompress.errors import SvdCompressError

__all__ = ["app", "main"]

app = typer.Typer(
    name="svdcompress",
    help="Low-rank (SVD) compression of Hugging Face causal language models, measured honestly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def configure_logging(verbose: bool) -> None:
    """Our own INFO lines (downloads, conversions, loads) always show: a first run fetches
    hundreds of MB and should say so. ``--verbose`` adds every library's INFO and progress bars."""
    # No force=True: when a host (pytest, a notebook) already set up logging, keep its handlers.
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("svdcompress").setLevel(logging.INFO)
    if not verbose:
        # transformers draws a bar for every weight load; ours are the ones worth watching.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also log every library's details")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads for torch; 1 is faster on a busy, shared machine"),
    ] = None,
) -> None:
    configure_logging(verbose)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(app)
    for command in app.registered_commands:  # old option spellings keep working (with a warning)
        if command.cls in (None, TyperCommand):
            command.cls = VocabularyCommand


_register_commands()


def main() -> None:
    """Entry point of the ``svdcompress`` script."""
    try:
        app(prog_name="svdcompress")
    except SvdCompressError as err:  # a command that forgot handle_errors() still exits cleanly
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
