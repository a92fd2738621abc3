"""Checkpoints are ordinary Hugging Face folders: safetensors + config.json + tokenizer.

``config.json`` carries a ``compression_config`` entry with the settings and, per replaced module,
what ``LowRankLinear`` needs to be rebuilt (shape, rank, storage, layout). Loading builds the model
with empty weights, swaps those modules in, and loads the tensors strictly — no pickles.
Writes go to a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from svdcompress.errors import CheckpointError
from svdcompress.linalg import SUPPORTED_QUANT_BITS
from svdcompress.modules import LowRankLinear, tensor_layout

__all__ = ["clear_stale_temporaries", "export_dense", "is_compressed_checkpoint", "load", "save"]

logger = logging.getLogger(__name__)


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _owner_tag() -> str:
    """Who writes a temporary folder: host and pid, so a later run can tell a dead writer's."""
    return f"{_HOST}.{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clear_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove what killed writers of ``out_dir`` left beside it; returns what was cleared.

    A killed write leaves ``.NAME.tmp-HOST.PID-*`` (never a partial ``NAME``: the folder appears
    only by a rename once complete). Only leftovers of this host whose process is gone are
    touched, so a concurrent writer's folder is safe. A writer killed in the instant between moving
    the old ``NAME`` aside (``.NAME.old-HOST.PID``) and moving the new one in leaves no ``NAME``:
    the complete old folder is then moved back.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-{re.escape(_HOST)}\.(\d+)(-.*)?$")
    cleared = []
    for entry in sorted(out_dir.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out_dir.exists():
            os.replace(entry, out_dir)
            logger.warning("restored %s from %s (a write was killed mid-rename)", out_dir, entry.name)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        cleared.append(entry)
    if cleared:
        logger.info("removed %d leftover(s) of killed writes beside %s", len(cleared), out_dir)
    return cleared


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path, *, overwrite: bool = False):
    """Yield a temporary folder that replaces ``out_dir`` only if the block completes.

    Leftovers of earlier writers of ``out_dir`` that were killed are cleared first.
    """
    out_dir = Path(out_dir)
    clear_stale_temporaries(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; choose another folder or pass overwrite.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{_owner_tag()}-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{_owner_tag()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False,
         max_shard_size: str = "2GB", extra_files: dict[str, str] | None = None) -> Path:
    """Write a compressed (or plain) model as a Hugging Face folder with safetensors.

    ``extra_files`` (name -> text, e.g. a report) are written into the folder before it appears.
    """
    try:
        with atomic_folder(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    except OSError as err:  # the temporary folder is gone already (atomic_folder's cleanup)
        raise write_error(out_dir, err) from err
    return Path(out_dir)


def write_error(out_dir: str | Path, err: OSError) -> CheckpointError:
    """A failed write (no permission, a full disk) as one line that names the folder and the fix."""
    reason = os.strerror(err.errno).lower() if err.errno else str(err)
    return CheckpointError(
        f"could not write {out_dir}: {reason}. Nothing was written; free some space or choose a "
        "writable folder (--out)."
    )


def is_compressed_checkpoint(path: str | Path) -> bool:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return "compression_config" in json.loads(config_file.read_text())
    except (OSError, ValueError):  # unreadable: let the loader report what is wrong with it
        return False


def _tensor_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files; is it a complete checkpoint?")
    return files


def _read_state_dict(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    state = {}
    for file in _tensor_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    state[key] = handle.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {file}: {err}. The file is corrupt or truncated.") from err
    return state


def _check_spec(name: str, spec: dict, state: dict[str, torch.Tensor]) -> None:
    bits = spec.get("quant_bits")  # absent in checkpoints written before int8 factors existed
    if bits is not None and bits not in SUPPORTED_QUANT_BITS:
        raise CheckpointError(
            f"{name}: compression_config says quant_bits={bits!r}; this version of svdcompress "
            f"reads {list(SUPPORTED_QUANT_BITS)} (or float factors)."
        )
    for suffix, (shape, dtype) in tensor_layout(spec).items():
        key = f"{name}.{suffix}"
        if key not in state:
            what = "its int8 scales" if suffix.endswith("_scale") else key
            raise CheckpointError(f"compression_config lists {name} but the tensors lack {what} ({key}).")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{key} has shape {tuple(state[key].shape)} but compression_config says {shape}: "
                "the checkpoint's tensors and its config.json do not belong together."
            )
        if dtype is not None and state[key].dtype != dtype:
            raise CheckpointError(f"{key} is {state[key].dtype}, expected {dtype} for int{bits} storage.")


def load(path: str | Path, *, device: str | torch.device = "cpu", tokenizer: bool = True):
    """Rebuild a compressed model from its folder: ``(model, tokenizer or None)``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a model folder.")
    config = AutoConfig.from_pretrained(path)
    compression = getattr(config, "compression_config", None)
    if not compression:
        raise CheckpointError(f"{path}/config.json has no compression_config; load it as a plain model.")
    state = _read_state_dict(path, device)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, spec in compression["modules"].items():
        _check_spec(name, spec, state)
        module = LowRankLinear(
            spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"],
            storage=spec["storage"], layout=spec["layout"], quant_bits=spec.get("quant_bits"),
            device="meta",
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    _load_strict(model, state, path)
    model.to(device).eval()
    tok = None
    if tokenizer and any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    # int8 codes and scales are buffers: a missing one stays on the meta device like a parameter.
    tensors = [*model.named_parameters(), *model.named_buffers()]
    still_empty = [name for name, t in tensors if t.is_meta]
    if result.unexpected_keys or still_empty:
        raise CheckpointError(
            f"{path}: tensors do not match the model: unexpected {result.unexpected_keys[:5]}, "
            f"missing {still_empty[:5]}."
        )


def export_dense(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a plain model that stock transformers loads (rank-r products as dense weights).

    The low-rank modules of ``model`` are replaced by dense ones in place.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to_dense())
    if hasattr(model.config, "compression_config"):
        del model.config.compression_config
    return save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
