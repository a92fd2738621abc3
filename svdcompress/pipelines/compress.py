"""``svdcompress compress`` as a library call: check, load, calibrate, (allocate,) compress, save."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from svdcompress import distributed
from svdcompress.config import CompressionConfig
from svdcompress.errors import ConfigError
from svdcompress.provenance import command_line
from svdcompress.recipe import check_base_model

__all__ = ["allocation_options", "calibration_windows", "run_compress"]

logger = logging.getLogger(__name__)


def calibration_windows(tokenizer, model, config, calib: str, samples: int, seq_len: int, seed: int):
    """``samples`` windows of ``seq_len`` tokens from ``calib``'s calibration split, as a Calibration."""
    from svdcompress.calibration import Calibration
    from svdcompress.datasets import token_windows

    windows = token_windows(
        tokenizer, calib, "calib", seq_len=seq_len, n_samples=samples, seed=seed,
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )
    return Calibration(windows, source=f"{calib}:calib seq_len={seq_len} n={samples} seed={seed}")


def _importance(model, tokenizer, config, n_facts: int, seed: int):
    from svdcompress.datasets import load_facts
    from svdcompress.methods.importance import compute_importance

    facts = load_facts(n_facts, seed=seed, split="calib")
    return compute_importance(
        model, tokenizer, facts, targets=config.targets, exclude=config.exclude,
        source=f"bigbench qa_wikidata calib split: {n_facts} facts seed={seed}",
    )


def _wants_windows(config: CompressionConfig, error_report: bool) -> bool:
    """Data-aware settings need calibration text; plain svd is data-free and reads text only to
    report each layer's output error (--error-report: a calibration pass through every block)."""
    return config.uses_calibration or (config.method == "svd" and error_report)


def _check_before_loading(config: CompressionConfig, out: Path, *, overwrite: bool, calib: str,
                          calib_samples: int, seq_len: int, n_facts: int,
                          allocation: dict | None, error_report: bool = False) -> None:
    """Everything that needs no model is checked first: fail before minutes of loading."""
    from svdcompress.datasets import check_window_request

    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    if _wants_windows(config, error_report) or allocation is not None:
        check_window_request(seq_len, calib_samples, source=calib)
    if config.method == "importance" and n_facts < 1:
        raise ConfigError(f"--facts {n_facts}: the importance method needs at least 1 fact prompt.")


def run_compress(model_spec: str, config: CompressionConfig, out: Path, *, calib: str,
                 calib_samples: int, seq_len: int, n_facts: int, overwrite: bool,
                 allocation: dict | None = None, error_report: bool = False,
                 stream: bool | None = None, max_memory: str | None = None,
                 device: str = "cpu", recipe: Path | None = None) -> dict:
    """``recipe``: the file ``config`` came from; one recorded for another base model is refused."""
    from svdcompress.checkpoint import save
    from svdcompress.compress import compress_
    from svdcompress.devices import resolve_device
    from svdcompress.zoo import load_model

    distributed.init_from_env()  # under torchrun: join the other ranks (distributed.py)
    _check_before_loading(config, out, overwrite=overwrite, calib=calib, calib_samples=calib_samples,
                          seq_len=seq_len, n_facts=n_facts, allocation=allocation,
                          error_report=error_report)
    device = resolve_device(device)  # a missing GPU fails here, before anything loads
    device = distributed.local_device(device)  # under torchrun: each rank its own GPU
    windows = (calib_samples, seq_len) if _wants_windows(config, error_report) else None
    folder = _streaming_folder(model_spec, config, windows, stream, max_memory, allocation)
    if folder is not None and distributed.is_distributed():
        raise ConfigError("streaming compression runs in one process: launch it without torchrun, "
                          "or pass --no-stream when the model fits in memory.")
    if folder is not None:
        data = {"source": calib, "windows": calib_samples, "seq_len": seq_len, "facts": n_facts}
        return _run_streaming(model_spec, folder, config, out, calib=calib, windows=windows, data=data,
                              overwrite=overwrite, max_memory=max_memory)
    model, tokenizer = load_model(model_spec, device=device)
    if recipe is not None:
        check_base_model(recipe, model, model_spec)
    calibration = None
    if windows is not None:
        calibration = calibration_windows(tokenizer, model, config, calib, calib_samples, seq_len, config.seed)
    if allocation is not None:
        config, calibration = _allocate(model, tokenizer, config, calibration, allocation,
                                        calib, calib_samples, seq_len)
    importance = _importance(model, tokenizer, config, n_facts, config.seed) if config.method == "importance" else None
    report = compress_(model, config, calibration, importance=importance)
    model.config.compression_config["base_model"] = model_spec
    report_json = json.dumps(report.to_dict(), indent=2)
    if distributed.is_main():  # every rank holds the same model; one writes it
        save(model, out, tokenizer=tokenizer, overwrite=overwrite,
             extra_files={"compression_report.json": report_json}, command=command_line(),
             data={"source": calib, "windows": calib_samples, "seq_len": seq_len, "facts": n_facts})
    distributed.barrier()
    return report.summary()


def _streaming_folder(model_spec: str, config: CompressionConfig, windows, stream: bool | None,
                      max_memory: str | None, allocation: dict | None) -> Path | None:
    """The model folder to stream from, or None to compress in memory. ``stream=None``: stream
    when the in-memory path would not fit ``max_memory`` (default: the machine's available memory)."""
    from svdcompress.streaming import needs_streaming
    from svdcompress.zoo import resolve_model_spec

    if stream is False:
        return None
    folder = Path(resolve_model_spec(model_spec))
    if not (folder.is_dir() and any(folder.glob("*.safetensors"))):
        if stream:
            raise ConfigError(f"--stream reads a local folder of safetensors shards; {model_spec} is not one.")
        return None
    if not stream:
        stream, reason = needs_streaming(folder, config, windows=windows, max_memory=max_memory)
        if not stream:
            return None
        logger.warning("streaming block by block: %s", reason)
    if allocation is not None:
        raise ConfigError("--allocate measures sensitivity on the whole model in memory; it does "
                          "not stream. Run `svdcompress analyze` where the model fits, or drop --allocate.")
    return folder


def _run_streaming(model_spec: str, folder: Path, config: CompressionConfig, out: Path, *, calib: str,
                   windows, data: dict, overwrite: bool, max_memory: str | None) -> dict:
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from svdcompress.streaming import compress_streaming

    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = None
    if windows is not None:
        shell = SimpleNamespace(config=AutoConfig.from_pretrained(folder))  # max_position_embeddings
        calibration = calibration_windows(tokenizer, shell, config, calib, *windows, config.seed)
    # The same command and data record as the in-memory path's save (model card, recipe).
    report = compress_streaming(folder, config, out, calibration=calibration, tokenizer=tokenizer,
                                max_memory=max_memory, overwrite=overwrite, base_model=model_spec,
                                save_options={"command": command_line(), "data": data})
    return report.summary()


def _allocate(model, tokenizer, config, calibration, allocation: dict, calib, samples, seq_len):
    from svdcompress.allocation import allocate_config

    if calibration is None:  # sensitivity is measured on calibration text whatever the method
        calibration = calibration_windows(tokenizer, model, config, calib, samples, seq_len, config.seed)
    return allocate_config(model, config, calibration, **allocation), calibration


def allocation_options(allocate: bool, analysis_dir: Path | None, byte_budget: int | None,
                        int8_options: bool = False, speed_caps: Path | None = None):
    if not allocate:
        if analysis_dir is not None or byte_budget is not None or int8_options or speed_caps is not None:
            raise ConfigError("--analysis-dir, --byte-budget, --int8-options and --speed-caps only "
                              "apply with --allocate.")
        return None
    if int8_options and byte_budget is None:
        raise ConfigError("--int8-options trades bytes: give --byte-budget with it.")
    return {"analysis_dir": analysis_dir, "byte_budget": byte_budget, "int8_options": int8_options,
            "speed_caps": speed_caps}
