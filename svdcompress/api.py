"""Everything the command line does, as one library call each, with the CLI's vocabulary.

``svdcompress compress MODEL --out DIR ...`` is ``compress(MODEL, DIR, config, ...)``, and so on:
each function runs the same pipeline as its command (check what needs no model, load, compute,
save) and returns the numbers the command prints. Keyword names follow the CLI's options
(``data``, ``windows``, ``seq_len``, ``seed``, ``device``; see the README's vocabulary table).

Use them as ``svdcompress.api.compress(...)``: bare at the package root these names would
collide with the modules ``svdcompress.compress``, ``svdcompress.evaluate``, ... (``from
svdcompress import evaluate`` must keep giving the module).

The in-memory building blocks stay public too: ``compress_`` (a model you hold), ``analysis.analyze``
(sensitivity from a calibration), ``allocate`` (ranks under a budget), ``recover_``, ``finetune_``,
``evaluate.evaluate_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from svdcompress.pipelines import (
    DEFAULT_DATA,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_STORAGE,
    DEFAULT_WINDOWS,
)

__all__ = ["analyze", "bench", "compress", "evaluate", "finetune", "recover"]


def compress(model: str, out: str | Path, config=None, *, data: str = DEFAULT_DATA,
             windows: int = DEFAULT_WINDOWS, seq_len: int = DEFAULT_SEQ_LEN, facts: int = 256,
             device: str = "auto", overwrite: bool = False, allocate: bool = False,
             analysis_dir: str | Path | None = None, byte_budget: int | None = None,
             speed_caps: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Compress ``model`` (alias, folder, .gguf or hub id) with ``config`` and save it to ``out``.

    ``config``: a :class:`~svdcompress.config.CompressionConfig` (default, as the command line's:
    ``WhitenConfig(param_ratio=0.8, storage="pivoted")``); its ``seed`` picks the calibration
    windows. ``allocate=True`` spends ``config``'s ``param_ratio`` (or ``byte_budget``) as a global
    budget over ranks chosen from measured sensitivity; with ``speed_caps`` (a break-even file
    measured for the config's storage) no rank above the one where that shape stops being faster than dense.
    ``options`` go to the command's pipeline
    (``error_report``, ``stream``, ``max_memory``, ``recipe``). Returns the summary the command prints.
    """
    from svdcompress.config import WhitenConfig
    from svdcompress.pipelines.compress import allocation_options, run_compress

    config = config if config is not None else WhitenConfig(param_ratio=0.8, storage=DEFAULT_STORAGE)
    allocation = allocation_options(allocate, Path(analysis_dir) if analysis_dir else None,
                                     byte_budget, speed_caps=Path(speed_caps) if speed_caps else None)
    return run_compress(model, config, Path(out), calib=data, calib_samples=windows,
                        seq_len=seq_len, n_facts=facts, overwrite=overwrite,
                        allocation=allocation, device=device, **options)


def analyze(model: str, out: str | Path, *, param_ratios: Sequence[float] = (0.8,),
            data: str = DEFAULT_DATA, windows: int = DEFAULT_WINDOWS,
            seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED, device: str = "auto",
            **options: Any) -> dict[str, Any]:
    """Measure where compression hurts ``model``, allocate ranks at each of ``param_ratios``
    (``out/allocation-pR.json``, each a recipe for :func:`compress`), and write ``out/report.md``.

    ``options``: ``targets``, ``exclude``, ``fractions``, ``probe_windows``, ``probe_len``,
    ``min_rank``, ``rank_step``, ``diagnose`` (``()`` skips it), ``eval_windows``. Returns the
    summary also written to ``out/analysis.json``.
    """
    from svdcompress.pipelines.analyze import analyze_model

    return analyze_model(model, Path(out), data=data, windows=windows, seq_len=seq_len, seed=seed,
                         device=device, ratios=tuple(param_ratios), **options)


def recover(checkpoint: str | Path, *, steps: int, out: str | Path | None = None, lr: float = 1e-4,
            batch_size: int = 4, train_norms: bool = False, hidden_weight: float = 0.0,
            base: str | None = None,
            data: str = DEFAULT_DATA, windows: int | None = None, seq_len: int = DEFAULT_SEQ_LEN,
            seed: int = DEFAULT_SEED, device: str = "auto", resume: bool = False,
            overwrite: bool = False, checkpoint_every: int = 50) -> dict[str, Any]:
    """Distil the original model's logits into a compressed ``checkpoint``'s factors; save to
    ``out`` (default ``CHECKPOINT-recovered``). ``windows`` defaults to steps × batch size (each
    seen once); ``data`` may join sources with ``+`` (``"wiki+news"``); ``hidden_weight`` > 0 adds
    hidden-state distillation. Returns the summary written to ``recovery_report.json``."""
    from svdcompress.pipelines.recover import run_recover
    from svdcompress.recover import RecoverySettings

    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_name(f"{checkpoint.name}-recovered")
    settings = RecoverySettings(steps=steps, lr=lr, batch_size=batch_size, train_norms=train_norms,
                                hidden_weight=hidden_weight, seed=seed,
                                checkpoint_every=checkpoint_every)
    return run_recover(checkpoint, settings, out=out, base=base, data=data, seq_len=seq_len,
                       n_windows=windows, resume=resume, overwrite=overwrite, device=device)


def finetune(model: str, data: str | Path, out: str | Path, config=None, *, resume: bool = False,
             overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``model`` on the ``.txt``/``.jsonl`` file ``data`` with the Hugging Face Trainer
    (``config``: a :class:`~svdcompress.finetune.FinetuneConfig`; default the CLI's: one epoch at
    lr 1e-5, rows of up to 512 tokens) and save to ``out``. Returns the summary written to ``finetune_report.json``."""
    from svdcompress.finetune import FinetuneConfig
    from svdcompress.pipelines.finetune import run_finetune

    config = config if config is not None else FinetuneConfig(seq_len=DEFAULT_SEQ_LEN)
    return run_finetune(model, Path(data), config, out=Path(out), resume=resume, overwrite=overwrite)


def evaluate(model: str, *, reference: str | None = None, data: str = DEFAULT_DATA,
             windows: int = DEFAULT_WINDOWS, seq_len: int = DEFAULT_SEQ_LEN,
             seed: int = DEFAULT_SEED, device: str = "auto", tasks: str | None = None,
             limit: int | None = None, **settings: Any) -> dict[str, Any]:
    """Held-out perplexity, second-domain perplexity, fact recall and benchmark ``tasks`` of
    ``model``; with ``reference``, the same side by side plus logits fidelity and paired statistics.

    ``settings``: ``second_domain`` (default ``"sotu"``, ``None`` skips), ``facts`` (300; 0 skips),
    ``generation``, ``batch_size``. Returns what ``svdcompress eval --json`` writes.
    """
    from svdcompress.pipelines.evaluate import run_eval

    return run_eval(model, reference_spec=reference, tasks=tasks, limit=limit, device=device,
                    data=data, n_samples=windows, seq_len=seq_len, seed=seed, **settings)


def bench(models: Sequence[str], *, against: str | None = None, device: str = "auto",
          **settings: Any) -> dict[str, Any]:
    """Prefill and decode speed, peak memory, weight bytes and load time of ``models``, each in a
    fresh process, with ratios to ``against``. ``settings``: fields of
    :class:`~svdcompress.bench.BenchSettings` (runs, rounds, batch_sizes, kernel, threads, ...)."""
    from svdcompress.bench import BenchSettings, run_bench
    from svdcompress.devices import resolve_device

    config = BenchSettings(device=str(resolve_device(device)), **settings)
    return run_bench(list(models), against, config)
