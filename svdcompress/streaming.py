"""Compress a model larger than memory: one decoder block at a time, from its safetensors shards.

The model is built on the meta device (no weights). The embeddings are read in to capture what
the first decoder block receives for each calibration batch, then released. Each block in turn is
read from the shards (memory-mapped), its targets' statistics are gathered and it is compressed by
the same code as the in-memory path (``gather_block_stats``, ``Compressor``), its outputs become
the next block's inputs, its tensors are written to their own output shard, and it is released.
Peak memory is about one block + the embeddings + the calibration hidden states + one block's
statistics, whatever the model's size; hidden states that do not fit the budget live on disk, one
file per batch, and only the batch in use is in memory.

Every finished block is committed to a work folder beside the output (``.NAME.streaming``): its
output shard, its report lines, and the hidden states it produced, each file written under a
temporary name and renamed, and a block's marker last. A rerun after an interruption skips the
finished blocks; a half-written block is never used. The output is an ordinary svdcompress
checkpoint (:func:`svdcompress.checkpoint.save` writes everything but the tensors), equal to what
the in-memory path writes for the same model and settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from svdcompress._version import __version__
from svdcompress.analysis import model_fingerprint
from svdcompress.calibration import (
    Calibration,
    capture_block_inputs,
    gather_block_stats,
    run_block,
)
from svdcompress.compress import (
    CompressionReport,
    Compressor,
    ModuleReport,
    as_calibration,
    check_finite,
    check_token_ids,
    compression_record,
    excluded_targets,
    quantize_tables_,
    resolve_ranks,
)
from svdcompress.config import CompressionConfig
from svdcompress.errors import CalibrationError, CheckpointError, ConfigError, ModelLoadError
from svdcompress.linalg import needs_gram_eigen
from svdcompress.methods import get_method
from svdcompress.modules import stored_numbers
from svdcompress.quantize import check_outer
from svdcompress.targets import Target, decoder_blocks, find_targets

__all__ = [
    "MemoryEstimate",
    "ShardReader",
    "available_memory",
    "compress_streaming",
    "estimate_memory",
    "format_bytes",
    "needs_streaming",
    "parse_memory",
    "work_folder",
]

logger = logging.getLogger(__name__)

_GB = 1024**3


# --------------------------------------------------------------------------------------------------
# Memory budget


def parse_memory(text: str | int) -> int:
    """Bytes from ``"1.5GB"``, ``"800MB"``, ``"2GiB"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-memory {text!r}: write a size such as 1.5GB, 800MB or 12GiB.")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def format_bytes(n: float) -> str:
    return f"{n / _GB:.2f} GB" if n >= 0.1 * _GB else f"{n / 1024**2:.0f} MB"


def available_memory() -> int:
    """Memory the machine can give this process now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def _process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class MemoryEstimate:
    """What compressing a model needs in memory, by part (bytes); see :func:`estimate_memory`."""

    process: int  # what the process already holds (interpreter, torch, transformers)
    model: int  # every weight, in the working dtype
    block: int  # the largest decoder block
    outer: int  # weights needed before the first block (embeddings)
    hidden: int  # one copy of the calibration hidden states (all windows)
    hidden_batch: int  # one batch of them
    statistics: int  # one block's statistics + the largest factorization's workspace
    streams: int  # 2 when the original model's hidden states are tracked too (update, error_blend)

    @property
    def in_memory(self) -> int:
        return self.process + self.model + 2 * self.streams * self.hidden + self.statistics

    def streaming(self, spill: bool) -> int:
        hidden = self.hidden_batch if spill else self.hidden
        capture = self.outer + (self.hidden_batch if spill else self.streams * self.hidden)
        # the block's old weights and its new factors, the inputs and outputs of the block
        blockwise = 2 * self.block + 2 * self.streams * hidden + self.statistics
        return self.process + max(capture, blockwise)

    def describe(self, spill: bool) -> str:
        return (f"block {format_bytes(2 * self.block)} (weights and factors), embeddings "
                f"{format_bytes(self.outer)}, statistics and factorization "
                f"{format_bytes(self.statistics)}, hidden states "
                f"{format_bytes((self.hidden_batch if spill else self.hidden) * 2 * self.streams)}, "
                f"this process {format_bytes(self.process)}")


def _whitening_bytes(out_features: int, in_features: int) -> int:
    if needs_gram_eigen((out_features, in_features)):
        return 2 * in_features**2 * 8
    return (2 * out_features * in_features + out_features**2) * 8


def _statistics_bytes(config: CompressionConfig, targets: list[Target], data_aware: bool) -> int:
    """One block's Gram matrices (float64) and the float64 workspace of its largest factorization.

    Whitening a tall or square weight decomposes its n×n Gram in place and holds two n×n float64
    matrices more (the eigenvectors and S); a wide (m < n) one never decomposes it and holds W·G
    and W in float64 and the m×m W·G·Wᵀ (``linalg.whitened_svd``); an SVD of an m×n weight about
    three m×n ones.
    """
    per_block: dict[int, list[Target]] = {}
    for target in targets:
        per_block.setdefault(target.block, []).append(target)
    worst = 0
    for block_targets in per_block.values():
        svd = max(3 * t.out_features * t.in_features * 8 for t in block_targets)
        if not data_aware:
            worst = max(worst, svd)
            continue
        copies = 3 if config.tracks_original else 1  # + Σ x x'ᵀ and Σ x xᵀ of the original stream
        grams = sum(copies * t.in_features**2 * 8 for t in block_targets)
        largest = max(_whitening_bytes(t.out_features, t.in_features) for t in block_targets)
        worst = max(worst, grams + largest + svd)
    return worst


def estimate_memory(model: nn.Module, targets: list[Target], config: CompressionConfig,
                    windows: tuple[int, int] | None, dtype: torch.dtype) -> MemoryEstimate:
    """Estimate from a model on the meta device (shapes only), the settings and the calibration
    windows' (count, length), ``None`` without calibration."""
    _, blocks = decoder_blocks(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = max(sum(p.numel() for p in b.parameters()) for b in blocks) * itemsize
    outer = sum(t.numel() for t in _outer_tensors(model).values()) * itemsize
    hidden_size = model.get_input_embeddings().embedding_dim
    hidden = hidden_batch = 0
    if windows is not None:
        hidden = windows[0] * windows[1] * hidden_size * 4  # activations are float32
        hidden_batch = min(config.calib_batch_size, windows[0]) * windows[1] * hidden_size * 4
    return MemoryEstimate(
        process=_process_rss(),
        model=sum(p.numel() for p in model.parameters()) * itemsize,
        block=block_bytes, outer=outer, hidden=hidden, hidden_batch=hidden_batch,
        statistics=_statistics_bytes(config, targets, windows is not None),
        streams=2 if config.tracks_original else 1,
    )


def needs_streaming(folder: str | Path, config: CompressionConfig, *,
                    windows: tuple[int, int] | None, max_memory: int | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """Whether compressing the plain model in ``folder`` whole would exceed ``max_memory`` (default:
    the machine's available memory), and why, in words."""
    from svdcompress.checkpoint import is_compressed_checkpoint

    if is_compressed_checkpoint(folder):
        return False, "a compressed checkpoint is compressed again in memory"
    budget = parse_memory(max_memory) if max_memory is not None else available_memory()
    model = _skeleton(Path(folder), dtype)
    targets = find_targets(model, config.targets, config.exclude)
    need = estimate_memory(model, targets, config, windows, dtype).in_memory
    verdict = "does not fit" if need > budget else "fits"
    return need > budget, (f"the model in memory needs about {format_bytes(need)}, which {verdict} "
                           f"the {format_bytes(budget)} budget")


# --------------------------------------------------------------------------------------------------
# Reading the source shards


class ShardReader:
    """Tensor name -> the safetensors shard that holds it; tensors are read one at a time.

    A shard is opened (memory-mapped) only while its tensors are read, and its size is checked
    against its header first: a missing or truncated shard is a clear error, never a crash.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{self.folder} holds no .safetensors files to stream from.")
            self.weight_map = {key: f.name for f in files for key in self._open(f.name).keys()}  # noqa: SIM118

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def check(self) -> None:
        """Every shard is there and whole: fail before any block is computed."""
        for file in self.files:
            self._open(file)

    def _open(self, file: str):
        path = self.folder / file
        if not path.is_file():
            raise ModelLoadError(
                f"shard {path} is missing. Restore it and rerun: finished blocks are kept."
            )
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as err:  # safetensors' own error types: a bad header, a short file
            raise ModelLoadError(
                f"cannot read shard {path}: {err}. The file is truncated or corrupt; restore it and "
                "rerun: finished blocks are kept."
            ) from err

    def _file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise ModelLoadError(f"{self.folder}: no shard holds the tensor {name}.")
        return self.weight_map[name]

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, converted to ``dtype`` (float tensors only)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of(name), []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            handle = self._open(file)
            for key in keys:
                try:
                    tensor = handle.get_tensor(key)
                except Exception as err:
                    raise ModelLoadError(f"cannot read {key} from shard {self.folder / file}: {err}.") from err
                tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            del handle
        return tensors

    def sample(self, name: str, count: int = 1024) -> tuple[tuple[int, ...], torch.Tensor]:
        """(shape, ``flat[::step][:count]`` as float32) without reading the rest of the tensor."""
        path = self.folder / self._file_of(name)
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        entry = header[name]
        shape = tuple(entry["shape"])
        raw = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}[entry["dtype"]]
        start, end = entry["data_offsets"]
        flat = np.memmap(path, dtype=raw, mode="r", offset=8 + header_len + start,
                         shape=((end - start) // np.dtype(raw).itemsize,))
        numel = int(np.prod(shape)) if shape else 1
        picked = torch.from_numpy(np.array(flat[:: max(1, numel // count)][:count]))
        if entry["dtype"] == "BF16":
            picked = picked.view(torch.bfloat16)
        return shape, picked.float()


def _fingerprint(model: nn.Module, reader: ShardReader, aliases: dict[str, str]) -> str:
    """:func:`svdcompress.analysis.model_fingerprint` (strict=False) of the model in the shards,
    reading ~1024 values per tensor: the same hash as the model loaded whole."""
    samples = ((name, *reader.sample(aliases.get(name, name))) for name in model.state_dict())
    return model_fingerprint(model, strict=False, samples=samples)


# --------------------------------------------------------------------------------------------------
# The model on the meta device


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "compression_config", None):
        raise ConfigError(
            f"{folder} is already a compressed checkpoint; streaming reads plain models only. "
            "Compress the original model, or load this one in memory (--no-stream)."
        )
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Name -> the name it shares its tensor with (tied embeddings), the first name being kept."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _outer_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights outside the decoder blocks that run before the first block (not the LM head)."""
    blocks_name, _ = decoder_blocks(model)
    output = model.get_output_embeddings()
    head = {id(p) for p in output.parameters()} if output is not None else set()
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    return {
        name: p for name, p in model.named_parameters()
        if not name.startswith(blocks_name + ".") and (id(p) not in head or id(p) in tied)
    }


def _materialize(model: nn.Module, names: list[str], reader: ShardReader, dtype: torch.dtype,
                 aliases: dict[str, str]) -> None:
    tensors = reader.read([aliases.get(n, n) for n in names], dtype)
    for name in names:
        set_module_tensor_to_device(model, name, "cpu", value=tensors[aliases.get(name, name)])


def _release(module: nn.Module) -> None:
    """Back to the meta device: the memory goes, the structure (and any new modules) stays."""
    module.to("meta")


# --------------------------------------------------------------------------------------------------
# Hidden states between blocks


class _Stream(Sequence):
    """One stream of hidden states (a tensor per calibration batch) between two blocks.

    Always written to ``folder`` (a finished block's outputs make it resumable); kept in memory
    too unless spilled, in which case only the batch being read is in memory.
    """

    def __init__(self, folder: Path, name: str, count: int, tensors: list | None) -> None:
        self.folder, self.name, self.count, self.tensors = folder, name, count, tensors

    def path(self, index: int) -> Path:
        return self.folder / f"{self.name}-{index:05d}.safetensors"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[index]
        return load_file(self.path(index))["hidden"]

    @classmethod
    def write(cls, folder: Path, name: str, batches: Iterator[torch.Tensor], spill: bool) -> _Stream:
        kept = []
        count = 0
        for index, hidden in enumerate(batches):
            save_file({"hidden": hidden.contiguous()}, folder / f"{name}-{index:05d}.safetensors")
            if not spill:
                kept.append(hidden)
            count += 1
        return cls(folder, name, count, None if spill else kept)

    @classmethod
    def read(cls, folder: Path, name: str, spill: bool) -> _Stream | None:
        files = sorted(folder.glob(f"{name}-*.safetensors"))
        if not files:
            return None
        stream = cls(folder, name, len(files), None)
        if not spill:
            stream.tensors = [stream[i] for i in range(len(files))]
        return stream


# --------------------------------------------------------------------------------------------------
# The work folder: committed blocks


def work_folder(out: str | Path) -> Path:
    """Where a streaming run keeps its finished blocks until the checkpoint is complete."""
    out = Path(out)
    return out.with_name(f".{out.name}.streaming")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class _WorkFolder:
    """``plan.json`` (what is being computed), per block ``block-NNNNN.safetensors`` (its output
    tensors), ``hidden-NNNNN/`` (its outputs for the next block) and ``block-NNNNN.json`` (its
    report lines; written last, so a block counts as finished only once everything is there)."""

    def __init__(self, path: Path, plan: dict) -> None:
        self.path = path
        self.plan = plan
        plan_file = path / "plan.json"
        if path.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
            logger.warning("%s holds a run with other settings or another model; starting over", path)
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        if not plan_file.is_file():
            _atomic_text(plan_file, json.dumps(plan, indent=2, sort_keys=True))
        for leftover in path.glob("*.partial"):  # an interrupted write: never used
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def shard(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.safetensors"

    def marker(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.json"

    def hidden(self, index: int) -> Path:
        return self.path / f"hidden-{index:05d}"

    def finished(self, n_blocks: int, last_fed: int) -> int:
        """How many blocks from the first are finished; a block before ``last_fed`` (the last one
        whose inputs are computed) counts only with its outputs, which the next block reads."""
        done = 0
        while done < n_blocks and self.marker(done).is_file() and self.shard(done).is_file():
            done += 1
        while 0 < done <= last_fed and not self.hidden(done - 1).is_dir():
            done -= 1  # cannot happen (outputs are committed before the marker), but be safe
        return done

    def commit(self, index: int, tensors: dict[str, torch.Tensor], lines: dict) -> None:
        _atomic_save(tensors, self.shard(index))
        _atomic_text(self.marker(index), json.dumps(lines))
        previous = self.hidden(index - 1)
        if previous.is_dir():  # the next block reads this block's outputs, not those before
            shutil.rmtree(previous)

    def lines(self, index: int) -> dict:
        return json.loads(self.marker(index).read_text())


def _plan(source: Path, reader: ShardReader, config: CompressionConfig,
          calibration: Calibration | None, dtype: torch.dtype) -> dict:
    """What identifies a run: model (config and tensor index), settings, windows, dtype, version.
    File times are left out on purpose: a shard restored after a failure resumes the run."""
    windows = None
    if calibration is not None:
        windows = hashlib.sha256(calibration.windows.to(torch.int64).numpy().tobytes()).hexdigest()
    model_id = hashlib.sha256((source / "config.json").read_bytes())
    model_id.update(json.dumps(reader.weight_map, sort_keys=True).encode())
    return {"source": str(source.resolve()), "model": model_id.hexdigest(), "config": config.to_dict(),
            "calibration": windows, "calibration_shape": None if calibration is None
            else list(calibration.windows.shape), "dtype": str(dtype), "library_version": __version__}


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    model: nn.Module
    reader: ShardReader
    config: CompressionConfig
    dtype: torch.dtype
    aliases: dict[str, str]
    work: _WorkFolder
    spill: bool
    compressor: Compressor

    def block_names(self, index: int) -> tuple[str, nn.Module, list[str]]:
        blocks_name, blocks = decoder_blocks(self.model)
        prefix = f"{blocks_name}.{index}."
        names = [prefix + n for n in blocks[index].state_dict()]
        return prefix, blocks[index], names


def _capture(run: _Run, calibration: Calibration) -> tuple[list, _Stream, _Stream | None]:
    """What the first block receives per batch, captured with only the embeddings in memory."""
    model = run.model
    _, blocks = decoder_blocks(model)
    outer = list(_outer_tensors(model))
    _materialize(model, outer, run.reader, run.dtype, run.aliases)
    folder = run.work.path / "hidden-start.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    calls = []
    for batch in calibration.batches(run.config.calib_batch_size):  # one at a time: spillable
        calls.extend(capture_block_inputs(model, blocks[0], [batch]))
        if run.spill:
            save_file({"hidden": calls[-1].hidden.contiguous()}, folder / f"compressed-{len(calls) - 1:05d}.safetensors")
            calls[-1].hidden = None
    for name in outer:
        set_module_tensor_to_device(model, name, "meta")
    compressed = _Stream(folder, "compressed", len(calls), None if run.spill else [c.hidden for c in calls])
    for call in calls:  # the stream holds them now: the first block's inputs go once it has run
        call.hidden = None
    return calls, compressed, compressed if run.config.tracks_original else None


def _resume_streams(run: _Run, index: int) -> tuple[_Stream, _Stream | None]:
    folder = run.work.hidden(index)
    compressed = _Stream.read(folder, "compressed", run.spill)
    original = _Stream.read(folder, "original", run.spill) if run.config.tracks_original else None
    if compressed is None or (run.config.tracks_original and original is None):
        raise CheckpointError(f"{folder} lacks hidden states; delete {run.work.path} and rerun.")
    return compressed, original


def _write_outputs(run: _Run, index: int, batches: Iterator[torch.Tensor],
                   next_original: Iterator[torch.Tensor] | None) -> tuple[_Stream, _Stream | None]:
    """Block ``index``'s output streams, written whole to a partial folder and then renamed."""
    folder = run.work.hidden(index).with_name(run.work.hidden(index).name + ".partial")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    outputs = (_Stream.write(folder, "compressed", batches, run.spill),
               None if next_original is None else _Stream.write(folder, "original", iter(next_original), run.spill))
    shutil.rmtree(run.work.hidden(index), ignore_errors=True)  # a run killed before its marker
    os.replace(folder, run.work.hidden(index))
    for stream in outputs:
        if stream is not None:
            stream.folder = run.work.hidden(index)
    return outputs


def _process_block(run: _Run, index: int, targets: list[Target], calls: list, compressed, original,
                   feeds_next: bool):
    """Read block ``index``, compress its targets, commit it; returns the next block's inputs."""
    prefix, block, names = run.block_names(index)
    _materialize(run.model, names, run.reader, run.dtype, {})
    first_report = len(run.compressor.reports)
    next_original = None
    outputs = None
    one_pass = run.config.calibration_stream == "original" and feeds_next
    with torch.no_grad():
        if targets:
            check_finite(run.model, targets)
            modules = {t.name: run.model.get_submodule(t.name) for t in targets}
            if calls:
                if one_pass and run.spill:  # outputs kept on disk, not in memory: written before compressing
                    outputs = _write_outputs(run, index, (run_block(block, c, compressed[j])
                                                          for j, c in enumerate(calls)), None)
                keep = one_pass and not run.spill
                stats, after = gather_block_stats(block, modules, calls, compressed, original, keep_outputs=keep)
                if keep:  # the dense block's outputs, made by the statistics pass itself
                    outputs = _write_outputs(run, index, iter(after), None)
                    # Its inputs are not read again: released before the factorizations, so the
                    # peak holds one stream, as in the sequential path (the files stay on disk).
                    compressed.tensors = None
                    del after
                else:
                    next_original = after
                for name in list(stats):  # each module's statistics go as soon as it is done
                    run.compressor.compress_module(name, stats.pop(name))
            else:
                for name in modules:
                    run.compressor.compress_module(name, None)
        elif original is not None and feeds_next:
            next_original = (run_block(block, c, h) for c, h in zip(calls, original, strict=True))
        if feeds_next and outputs is None:
            outputs = _write_outputs(run, index, (run_block(block, c, compressed[j]) for j, c in enumerate(calls)),
                                     next_original)
    tensors = {prefix + k: v for k, v in block.state_dict().items()}
    new_reports = run.compressor.reports[first_report:]
    lines = {"reports": [asdict(r) for r in new_reports],
             "specs": {r.name: run.compressor.specs[r.name] for r in new_reports}}
    run.work.commit(index, tensors, lines)
    del tensors
    _release(block)
    return outputs


def compress_streaming(
    source: str | Path,
    config: CompressionConfig,
    out: str | Path,
    *,
    calibration: Calibration | torch.Tensor | None = None,
    tokenizer=None,
    max_memory: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    base_model: str | None = None,
    extra_files: dict[str, str] | None = None,
    save_options: dict | None = None,
    stop_after: int | None = None,
) -> CompressionReport | None:
    """Compress the model in folder ``source`` block by block and write the checkpoint ``out``.

    The same settings and calibration give the same factors as ``compress_`` on the model loaded
    whole in ``dtype``. ``max_memory`` (bytes or "1.5GB"; default: what the machine has available)
    decides whether hidden states stay in memory or go to disk, and a budget too small for one
    block is refused before anything is computed. ``stop_after``: finish at most that many blocks in
    this call and return ``None`` (the run resumes on the next call), for tests and benchmarks.
    ``save_options`` are passed on to :func:`svdcompress.checkpoint.save` (command, data).
    """
    start = time.perf_counter()
    _fix_mmap_threshold()
    source, out = Path(source), Path(out)
    calibration = as_calibration(calibration)
    run, targets, excluded = _start(source, config, out, calibration, dtype, max_memory, overwrite)
    params_before = stored_numbers(run.model)
    if not _run_blocks(run, targets, calibration, out, stop_after):
        return None
    outer = _quantize_outer(run)
    reports = run.compressor.reports
    report = CompressionReport(
        method=config.method, modules=reports, model_params_before=params_before,
        model_params_after=params_before - sum(m.params_before - m.params_after for m in reports)
        + _untied_numbers(run.model, outer.get("head")),
        wall_seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(),
        calibration=None if calibration is None else calibration.source,
        config=config.to_dict(), **excluded, **outer,
    )
    base = {"base_model": base_model or str(source),
            "base_fingerprint": _fingerprint(_skeleton(source, dtype), run.reader, run.aliases)}
    run.model.config.compression_config = compression_record(
        run.model, config, run.compressor.specs, report, None, base)
    files = {"compression_report.json": json.dumps(report.to_dict(), indent=2), **(extra_files or {})}
    _write_checkpoint(run, out, tokenizer, overwrite, files, save_options or {})
    shutil.rmtree(run.work.path, ignore_errors=True)
    logger.info("compressed %d modules streaming: %s", len(targets), report.summary())
    return report


def _start(source: Path, config: CompressionConfig, out: Path, calibration: Calibration | None,
           dtype: torch.dtype, max_memory, overwrite: bool) -> tuple[_Run, list[Target], dict]:
    """Every check that needs no block (shards whole, settings, budget), then the work folder."""
    reader = ShardReader(source)
    reader.check()
    model = _skeleton(source, dtype)
    check_token_ids(model, calibration)
    check_outer(model, config.head_quant_bits, config.embedding_quant_bits)
    method = get_method(config)
    if method.prepare is not None:
        raise ConfigError(
            f"method {config.method!r} needs gradients through the whole model, which streaming "
            "does not hold; use svd, whiten or asvd, or load the model in memory (--no-stream)."
        )
    if config.uses_calibration and calibration is None:
        raise CalibrationError(f"method {config.method!r} needs calibration windows.")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder or pass overwrite.")
    targets = find_targets(model, config.targets, config.exclude)
    excluded = excluded_targets(model, config, targets)
    ranks = resolve_ranks(config, targets)
    spill = _choose_spill(model, targets, config, calibration, dtype, max_memory)
    work = _WorkFolder(work_folder(out), _plan(source, reader, config, calibration, dtype))
    run = _Run(model, reader, config, dtype, _tied_aliases(model), work, spill,
               Compressor(model, config, ranks, method, {}))
    return run, targets, excluded


def _quantize_outer(run: _Run) -> dict[str, dict]:
    """``quantize_tables_`` with only the tables it stores read in: their int8 codes stay in memory
    for ``_link_shards``, the float weights go."""
    model, config = run.model, run.config
    wanted = [(config.head_quant_bits, model.get_output_embeddings()),
              (config.embedding_quant_bits, model.get_input_embeddings())]
    chosen = [module for bits, module in wanted if bits is not None]
    names = [f"{name}.weight" for name, module in model.named_modules() if any(module is m for m in chosen)]
    if not names:
        return {}
    _materialize(model, names, run.reader, run.dtype, run.aliases)
    outer = quantize_tables_(model, config, run.compressor.specs)
    for tensor_name in _outer_tensors(model):  # a tied head brought the embeddings in
        set_module_tensor_to_device(model, tensor_name, "meta")
    return outer


def _untied_numbers(model: nn.Module, head: dict | None) -> int:
    """Numbers an int8 head adds where it no longer shares the embeddings' tensor."""
    return model.get_submodule(head["name"]).num_stored() if head and head["untied"] else 0


def _run_blocks(run: _Run, targets: list[Target], calibration: Calibration | None, out: Path,
                stop_after: int | None) -> bool:
    """Every block not finished before, in order; False when ``stop_after`` ended the run early."""
    _, blocks = decoder_blocks(run.model)
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        by_block.setdefault(target.block, []).append(target)
    last_block = max(by_block)
    done = run.work.finished(len(blocks), last_fed=last_block if calibration is not None else -1)
    if done:
        logger.info("resuming %s: %d of %d blocks already finished", out, done, len(blocks))
    _restore_finished(run, done)
    calls, compressed, original = [], None, None
    if calibration is not None and done <= last_block:
        calls, compressed, original = _capture(run, calibration)
        if done > 0:
            compressed, original = _resume_streams(run, done - 1)
    for index in range(done, len(blocks)):
        if stop_after is not None and index - done >= stop_after:
            return False
        block_start, block_cpu = time.perf_counter(), time.process_time()
        outputs = _process_block(run, index, by_block.get(index, []), calls if index <= last_block else [],
                                 compressed, original, feeds_next=bool(calls) and index < last_block)
        if outputs is not None:
            compressed, original = outputs
        _trim_heap()
        # CPU seconds beside wall: on a shared machine only they say what the block cost.
        logger.info("block %d/%d done in %.1f s, %.1f CPU s (peak RSS %.0f MB, now %.0f MB)",
                    index + 1, len(blocks), time.perf_counter() - block_start,
                    time.process_time() - block_cpu, _peak_rss_mb(), _process_rss() / 2**20)
    shutil.rmtree(run.work.path / "hidden-start.partial", ignore_errors=True)
    return True


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 4 * 2**20


def _fix_mmap_threshold() -> None:
    """Allocations of 4 MiB and more (every hidden-state batch, Gram, factor and weight of a large
    block) get pages of their own, which go back to the system when freed. Otherwise glibc raises its
    mmap threshold to 32 MiB after the first large free and serves such tensors from its heap, where
    their holes make one block's peak exceed what it holds: the peak RSS crept up by ~90 MiB a
    block on TinyLlama's shape (BENCHMARKS.md, issue 12). A fixed threshold ends the adjustment."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _trim_heap() -> None:
    """Give freed heap back to the system after a block. glibc keeps what a block's large
    temporaries freed in its arenas, so without this the process's RSS creeps up block by block
    although nothing is held (BENCHMARKS.md, issue 12); elsewhere there is nothing to do."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _choose_spill(model, targets, config, calibration, dtype, max_memory) -> bool:
    """Hidden states on disk when in memory they would not fit the budget; refuse a budget too
    small for one block."""
    budget = parse_memory(max_memory) if max_memory is not None else available_memory()
    windows = None if calibration is None else tuple(calibration.windows.shape)
    estimate = estimate_memory(model, targets, config, windows, dtype)
    if estimate.streaming(spill=False) <= budget:
        return False
    need = estimate.streaming(spill=True)
    if need > budget:
        raise ConfigError(
            f"a memory budget of {format_bytes(budget)} is too small to compress one decoder block "
            f"of this model: streaming needs about {format_bytes(need)} ({estimate.describe(True)}). "
            "Raise --max-memory, or lower --calib-batch-size."
        )
    logger.info("hidden states go to disk: in memory they would need %s of the %s budget",
                format_bytes(estimate.streaming(spill=False)), format_bytes(budget))
    return True


def _restore_finished(run: _Run, done: int) -> None:
    """Report lines and new modules (on the meta device) of blocks a previous run finished."""
    from svdcompress.checkpoint import SvdCompressQuantizationConfig, install_empty_modules_

    specs = {}
    for index in range(done):
        lines = run.work.lines(index)
        for line in lines["reports"]:
            line["shape"] = tuple(line["shape"])
            run.compressor.reports.append(ModuleReport(**line))
        specs.update(lines["specs"])
    run.compressor.specs.update(specs)
    if specs:
        install_empty_modules_(run.model, SvdCompressQuantizationConfig(modules=specs))


def _write_checkpoint(run: _Run, out: Path, tokenizer, overwrite: bool, files: dict, options: dict) -> None:
    """``checkpoint.save`` with the tensors written block by block from the work folder."""
    from svdcompress.checkpoint import save

    def write_tensors(folder: Path) -> dict[str, str]:
        return _link_shards(run, folder)

    save(run.model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=files,
         tensor_writer=write_tensors, **options)


def _link_shards(run: _Run, folder: Path) -> dict[str, str]:
    """The finished blocks' shards (hard links: the work folder stays whole until the checkpoint
    is complete) and one shard per tensor outside the blocks; returns the weight map."""
    _, blocks = decoder_blocks(run.model)
    blocks_name, _ = decoder_blocks(run.model)
    outer = [n for n in run.model.state_dict() if not n.startswith(blocks_name + ".")
             and n not in run.aliases]
    count = len(blocks) + len(outer)
    weight_map = {}
    for index in range(len(blocks)):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        try:
            os.link(run.work.shard(index), folder / name)
        except OSError:  # another file system: copy
            shutil.copyfile(run.work.shard(index), folder / name)
        with safe_open(folder / name, framework="pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), name))
    state = run.model.state_dict()
    for offset, tensor_name in enumerate(outer):
        name = f"model-{len(blocks) + offset + 1:05d}-of-{count:05d}.safetensors"
        # Computed here (the int8 head or embeddings) or, as read, from the source shards
        tensors = ({tensor_name: state[tensor_name]} if not state[tensor_name].is_meta
                   else run.reader.read([tensor_name], run.dtype))
        _atomic_save(tensors, folder / name)
        weight_map[tensor_name] = name
    return weight_map
