"""``svdcompress recover``: short knowledge distillation of a compressed checkpoint (issue 6)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from svdcompress import distributed
from svdcompress.commands import handle_errors
from svdcompress.commands._vocabulary import (
    DEFAULT_DATA,
    DEFAULT_DEVICE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEVICE_HELP,
    write_json,
)
from svdcompress.pipelines.recover import run_recover, state_folder

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _interrupted(out: Path) -> None:
    state = state_folder(out) / "state.json"
    step = json.loads(state.read_text())["step"] if state.is_file() else None
    where = f"the checkpoint of step {step} is in {state.parent}" if step else "no checkpoint yet"
    typer.secho(f"interrupted; {where}. Run the same command with --resume to continue.",
                fg=typer.colors.YELLOW, err=True)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"recovered → {out}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("base_model", "data", "steps_run", "resumed_from", "stopped", "first_loss",
                "final_loss", "trainable_params", "wall_seconds"):
        value = summary[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    for note in summary["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def recover(
        checkpoint: Annotated[Path, typer.Argument(help="a compressed checkpoint folder")],
        steps: Annotated[int, typer.Option(help="optimisation steps (each: --batch-size windows)")] = ...,
        lr: Annotated[float, typer.Option(help="peak Adam learning rate (warm-up, cosine decay)")] = 1e-4,
        batch_size: Annotated[int, typer.Option(help="windows per step")] = 4,
        seq_len: Annotated[int, typer.Option(help="tokens per window")] = DEFAULT_SEQ_LEN,
        windows: Annotated[int | None, typer.Option(
            help="distinct training windows (default steps × batch size: each seen once)")] = None,
        data: Annotated[str, typer.Option(
            help="text source, or several joined by + (e.g. wiki+news); their calib splits are used")] = DEFAULT_DATA,
        train_norms: Annotated[bool, typer.Option("--train-norms", help="also train norm weights")] = False,
        hidden_weight: Annotated[float, typer.Option(
            help="weight of hidden-state distillation (each block's output) beside the logit KL; "
                 "0: logits only")] = 0.0,
        base: Annotated[str | None, typer.Option(
            help="the original model (default: compression_config.base_model)")] = None,
        out: Annotated[Path | None, typer.Option(help="output folder (default CHECKPOINT-recovered)")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
        checkpoint_every: Annotated[int, typer.Option(help="steps between saved states")] = 50,
        seed: Annotated[int, typer.Option(help="seed for window choice and order")] = DEFAULT_SEED,
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary here")] = None,
    ) -> None:
        """Distil the original model's logits into CHECKPOINT's low-rank factors."""
        from svdcompress.recover import RecoverySettings

        out = out or checkpoint.with_name(f"{checkpoint.name}-recovered")
        with handle_errors():
            settings = RecoverySettings(steps=steps, lr=lr, batch_size=batch_size,
                                        train_norms=train_norms, hidden_weight=hidden_weight,
                                        seed=seed, checkpoint_every=checkpoint_every)
            try:
                summary = run_recover(checkpoint, settings, out=out, base=base, data=data,
                                      seq_len=seq_len, n_windows=windows, resume=resume,
                                      overwrite=overwrite, device=device)
            except KeyboardInterrupt:
                _interrupted(out)
                raise typer.Exit(130) from None
            if distributed.is_main():
                _print_summary(summary, out)
                if json_out is not None:
                    write_json(json_out, summary)
