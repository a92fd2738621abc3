"""``svdcompress bench``: speed and memory of one or more models against the original."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from svdcompress.commands import handle_errors
from svdcompress.commands._vocabulary import DEFAULT_DEVICE, DEVICE_HELP, write_json

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        models: Annotated[list[str] | None, typer.Argument(
            help="compressed checkpoint folders, model folders or aliases (default smollm2-135m)")] = None,
        against: Annotated[str | None, typer.Option(
            help="the original to compare with, measured in the same run")] = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="write the full result here")] = None,
        threads: Annotated[int | None, typer.Option(help="torch threads per worker (default: torch's)")] = None,
        runs: Annotated[int, typer.Option(help="timed runs per quantity and process")] = 3,
        warmup: Annotated[int, typer.Option(help="untimed runs before them")] = 1,
        rounds: Annotated[int, typer.Option(help="fresh processes per model, alternating")] = 1,
        prefill_tokens: Annotated[int, typer.Option(help="prompt length for prefill speed")] = 512,
        prompt_tokens: Annotated[int, typer.Option(help="prompt length before decoding")] = 32,
        new_tokens: Annotated[int, typer.Option(help="greedy tokens generated per decode run")] = 32,
        batch_sizes: Annotated[str, typer.Option(help="decode batch sizes, comma-separated")] = "1,8",
        kernel: Annotated[str, typer.Option(
            help="int8 kernel: auto, dequant, dequant_serial, gemv, int_mm, fbgemm, int8pack, float_cache")] = "auto",
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
        dtype: Annotated[str, typer.Option(
            help="the models' floats: float32, bfloat16 or float16 (GPU comparisons); int8 codes stay")] = "float32",
    ) -> None:
        """Prefill and decode tokens/s, peak RSS, bytes of weights and load time, side by side."""
        with handle_errors():
            from svdcompress.bench import BenchSettings, format_table, run_bench
            from svdcompress.devices import resolve_device
            from svdcompress.errors import ConfigError
            from svdcompress.runtime import KERNELS

            if kernel not in KERNELS:
                raise ConfigError(f"--kernel {kernel!r}: use one of {list(KERNELS)}.")
            try:
                sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
            except ValueError:
                raise ConfigError(f"--batch-sizes {batch_sizes!r}: write e.g. 1,8.") from None
            import torch

            settings = BenchSettings(
                prefill_tokens=prefill_tokens, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                batch_sizes=sizes, warmup=warmup, runs=runs, rounds=rounds, kernel=kernel,
                # workers are fresh processes: pass the count on (the global --threads sets ours)
                threads=threads or torch.get_num_threads(),
                device=str(resolve_device(device)),  # resolved here: workers get a concrete one
                dtype=dtype,
            )
            result = run_bench(models or ["smollm2-135m"], against, settings)
            typer.echo(format_table(result))
            if json_out is not None:
                write_json(json_out, result)
