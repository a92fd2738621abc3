"""``svdcompress recover`` as a library call: load the checkpoint and its original, distil, save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from svdcompress import distributed
from svdcompress.devices import resolve_device
from svdcompress.errors import CheckpointError, ConfigError
from svdcompress.provenance import command_line

__all__ = ["run_recover", "state_folder"]


def state_folder(out: Path) -> Path:
    """Where a run writing ``out`` keeps its periodic checkpoints until it completes."""
    return out.with_name(f"{out.name}.recovery-state")


def _base_spec(student, base: str | None) -> str:
    if base is not None:
        return base
    spec = (getattr(student.config, "compression_config", None) or {}).get("base_model")
    if not spec:
        raise ConfigError(
            "the checkpoint does not record its original model (compression_config.base_model); "
            "pass --base with the model it was compressed from."
        )
    return spec


def _check_pair(student, teacher, base: str) -> None:
    """The teacher must be the model the checkpoint was compressed from: by its weights when the
    checkpoint recorded their fingerprint, else (older checkpoints) by type, vocabulary and depth."""
    from svdcompress.analysis import model_fingerprint

    recorded = (getattr(student.config, "compression_config", None) or {}).get("base_fingerprint")
    if recorded is not None:
        if model_fingerprint(teacher, strict=False) != recorded:
            raise ConfigError(
                f"the base model {base!r} is not the model this checkpoint was compressed from: its "
                f"weights fingerprint differs from the recorded {recorded}. Pass --base with the "
                "original model."
            )
        return
    s, t = student.config, teacher.config
    if (s.model_type, s.vocab_size, s.num_hidden_layers) != (t.model_type, t.vocab_size, t.num_hidden_layers):
        raise ConfigError(
            f"the base model {base!r} ({t.model_type}, vocab {t.vocab_size}, {t.num_hidden_layers} "
            f"layers) is not the model this checkpoint was compressed from ({s.model_type}, vocab "
            f"{s.vocab_size}, {s.num_hidden_layers} layers)."
        )


def _training_windows(tokenizer, student, data: str, seq_len: int, n_windows: int, seed: int):
    from svdcompress.datasets import token_windows

    return token_windows(
        tokenizer, data, "calib", seq_len=seq_len, n_samples=n_windows, seed=seed,
        max_positions=getattr(student.config, "max_position_embeddings", None),
    )


def _check_folders(checkpoint: Path, out: Path, state: Path, resume: bool, overwrite: bool) -> None:
    """Refuse early, before minutes of loading and training."""
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    if resume and not state.is_dir():
        raise CheckpointError(f"--resume: no interrupted run to resume (no {state}).")
    if not resume and state.exists():
        raise CheckpointError(
            f"{state} holds an interrupted recovery run; pass --resume to continue it, or delete "
            "the folder to start afresh."
        )
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a folder; pass a compressed checkpoint folder.")


def _extra_files(checkpoint: Path, result_dict: dict) -> dict[str, str]:
    files = {"recovery_report.json": json.dumps(result_dict, indent=2)}
    report = checkpoint / "compression_report.json"
    if report.is_file():  # keep the compression report beside the recovered weights
        files["compression_report.json"] = report.read_text()
    return files


def run_recover(checkpoint: Path, settings, *, out: Path, base: str | None, data: str, seq_len: int,
                n_windows: int | None, resume: bool, overwrite: bool, device: str) -> dict:
    """Load, distil, save; returns the summary written to ``recovery_report.json``."""
    from svdcompress.checkpoint import load, save
    from svdcompress.datasets import check_window_request
    from svdcompress.recover import recover_
    from svdcompress.zoo import load_model

    state = state_folder(out)
    _check_folders(checkpoint, out, state, resume, overwrite)
    device = resolve_device(device)  # everything that needs no model is checked before one loads
    device = distributed.local_device(device)  # under torchrun: each rank its own GPU
    check_window_request(seq_len, n_windows or settings.steps * settings.batch_size, source=data)
    student, tokenizer = load(checkpoint, device=device)
    base = _base_spec(student, base)
    teacher, _ = load_model(base, device=device)
    _check_pair(student, teacher, base)
    n_windows = n_windows or settings.steps * settings.batch_size
    windows = _training_windows(tokenizer, student, data, seq_len, n_windows, settings.seed)
    result = recover_(student, teacher, windows, settings, tokenizer=tokenizer, state_dir=state,
                      resume=resume)
    summary = {
        "base_model": base, "source_checkpoint": str(checkpoint),
        "data": f"{data}:calib seq_len={seq_len} n={len(windows)} seed={settings.seed}",
        "settings": settings.fingerprinted(), **result.to_dict(),
    }
    compression = dict(student.config.compression_config)
    compression["recovery"] = {k: v for k, v in summary.items() if k != "losses"}
    student.config.compression_config = compression
    if distributed.is_main():  # under torchrun every rank holds the same student; one writes it
        save(student, out, tokenizer=tokenizer, overwrite=overwrite, command=command_line(),
             extra_files=_extra_files(checkpoint, summary))
        if result.stopped == "completed":
            shutil.rmtree(state, ignore_errors=True)  # the run is complete: its checkpoints are spent
    distributed.barrier()
    if result.stopped != "completed" and state.is_dir():  # keep the states to inspect or resume
        summary["notes"].append(
            f"stopped early ({result.stopped}); the last periodic state is kept in {state} to "
            "inspect, or to continue from with --resume (same settings) and --overwrite"
        )
    return summary
