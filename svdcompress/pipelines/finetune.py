"""``svdcompress finetune`` as a library call: check, load, fine-tune on the Trainer, save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from svdcompress import distributed
from svdcompress.errors import ConfigError
from svdcompress.provenance import command_line

__all__ = ["run_finetune", "state_folder"]


def state_folder(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable Trainer states until it completes."""
    return out.with_name(f"{out.name}.finetune-state")


def run_finetune(model_spec: str, data: Path, config, *, out: Path, resume: bool,
                 overwrite: bool) -> dict:
    """Check, load, fine-tune, save; returns the summary written to ``finetune_report.json``."""
    from svdcompress.checkpoint import save
    from svdcompress.devices import resolve_device
    from svdcompress.finetune import finetune_, load_examples
    from svdcompress.zoo import load_model

    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    state = state_folder(out)
    if resume and not state.is_dir():
        raise ConfigError(f"--resume: no interrupted run to resume (no {state}).")
    resolve_device(config.device)  # a missing GPU or bad data fails here, before the model loads
    records = load_examples(data)
    model, tokenizer = load_model(model_spec)
    model, result = finetune_(model, tokenizer, records, config, state_dir=state, resume=resume)
    summary = {"base_model": model_spec, "data": str(data), **result.to_dict()}
    compression = getattr(model.config, "compression_config", None)
    if compression:
        compression = dict(compression)
        compression["finetune"] = {k: v for k, v in summary.items() if k != "losses"}
        model.config.compression_config = compression
    if distributed.is_main():  # under torchrun every rank holds the same model; one writes it
        save(model, out, tokenizer=tokenizer, overwrite=overwrite, command=command_line(),
             extra_files={"finetune_report.json": json.dumps(summary, indent=2)})
        shutil.rmtree(state, ignore_errors=True)  # complete: the resumable states are spent
    distributed.barrier()
    return summary
