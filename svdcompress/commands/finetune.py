"""``svdcompress finetune``: gentle fine-tuning on the Hugging Face Trainer (CF90's last step)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from svdcompress import distributed
from svdcompress.commands import handle_errors
from svdcompress.commands._vocabulary import (
    DEFAULT_DEVICE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEVICE_HELP,
    write_json,
)
from svdcompress.pipelines.finetune import run_finetune, state_folder

__all__ = ["register"]


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fine-tuned → {out}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    freezing = summary["freezing"] or {}
    rows = {
        "base model": summary["base_model"], "data": summary["data"],
        "rows (examples)": summary["n_examples"], "steps": summary["steps"],
        "first → final loss": f"{summary['first_loss']:.4g} → {summary['final_loss']:.4g}"
        if summary["first_loss"] is not None else "–",
        "frozen blocks": f"{freezing.get('n_frozen', 0)} of {freezing.get('n_layers', '–')}"
        + (" + embeddings" if freezing.get("embeddings_frozen") else ""),
        "LoRA": "–" if not summary["lora"] else f"r={summary['lora']['rank']} "
        f"alpha={summary['lora']['alpha']} on {summary['lora']['modules']} modules (merged)",
        "trainable / frozen params": f"{summary['trainable_params']:,} / {summary['frozen_params']:,}",
        "stopped": summary["stopped"], "wall seconds": f"{summary['wall_seconds']:.1f}",
        "peak memory MB": f"{summary['peak_memory_mb']:.0f} ({summary['device']})",
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console().print(table)
    for note in summary["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        model: Annotated[str, typer.Argument(help="a model (alias, folder, .gguf) or svdcompress checkpoint")] = "smollm2-135m",
        data: Annotated[Path, typer.Option(help=".txt (blank-line separated documents) or .jsonl "
                                                 "({text} or {prompt, completion} per line)")] = ...,
        epochs: Annotated[float, typer.Option(help="passes over the data")] = 1.0,
        lr: Annotated[float, typer.Option(help="peak AdamW learning rate (linear decay)")] = 1e-5,
        batch_size: Annotated[int, typer.Option(help="rows per step")] = 4,
        seq_len: Annotated[int, typer.Option(help="longest training row in tokens")] = DEFAULT_SEQ_LEN,
        freeze: Annotated[float, typer.Option(help="fraction of decoder blocks frozen from the "
                                                   "bottom, with the embeddings (CF90: 0.75)")] = 0.0,
        lora_rank: Annotated[int | None, typer.Option(help="train LoRA adapters of this rank on "
                                                           "Q/K/O instead (merged when saved)")] = None,
        lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 × rank)")] = None,
        seed: Annotated[int, typer.Option(help="seed of the data order")] = DEFAULT_SEED,
        out: Annotated[Path, typer.Option(help="output folder")] = ...,
        resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
        checkpoint_every: Annotated[int, typer.Option(help="steps between resumable states (0: none)")] = 50,
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary here")] = None,
    ) -> None:
        """Fine-tune MODEL on --data with the Hugging Face Trainer; writes an svdcompress folder."""
        from svdcompress.finetune import FinetuneConfig

        with handle_errors():
            config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seq_len=seq_len,
                                    freeze=freeze, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                    seed=seed, checkpoint_every=checkpoint_every, device=device)
            try:
                summary = run_finetune(model, data, config, out=out, resume=resume,
                                       overwrite=overwrite)
            except KeyboardInterrupt:
                typer.secho(f"interrupted; states (if any) are in {state_folder(out)}. Run the same "
                            "command with --resume to continue.", fg=typer.colors.YELLOW, err=True)
                raise typer.Exit(130) from None
            if json_out is not None and distributed.is_main():
                write_json(json_out, summary)
            if distributed.is_main():
                _print_summary(summary, out)
            if summary["stopped"] != "completed":
                typer.secho(f"error: {summary['notes'][0]} Saved to {out}.", fg=typer.colors.RED,
                            err=True)
                raise typer.Exit(2)
