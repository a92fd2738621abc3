"""Checkpoints are ordinary Hugging Face folders: safetensors + config.json + tokenizer.

``config.json`` carries a ``compression_config`` entry with the settings and, per replaced module,
what ``LowRankLinear`` needs to be rebuilt (shape, rank, storage, layout). Loading builds the model
with empty weights, swaps those modules in, and loads the tensors strictly — no pickles.
Writes go to a temporary sibling folder that is renamed into place only when complete.

Format 2 (:data:`CHECKPOINT_FORMAT`) adds what lets stock transformers take part:
``quantization_config`` (:class:`SvdCompressQuantizationConfig`: ``quant_method: svdcompress``,
the module specs), read by ``AutoModelForCausalLM.from_pretrained`` once ``import svdcompress``
registered the quantizer (:mod:`svdcompress.hf_integration`), and *guard tensors*
(:func:`guard_names`) that make transformers without svdcompress refuse the folder instead of
filling the compressed layers with random weights. Every folder also holds a model card
(``README.md``, :mod:`svdcompress.modelcard`) and the settings that made it (``recipe.yaml``,
:mod:`svdcompress.recipe`). Format-1 folders (``compression_config`` only) still load here.
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
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils.quantization_config import QuantizationConfigMixin

from svdcompress.errors import CheckpointError
from svdcompress.linalg import SUPPORTED_QUANT_BITS
from svdcompress.modules import (
    LowRankLinear,
    fused_specs,
    merge_dense_slices_,
    split_fused_,
    tensor_layout,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "OLDER_FORMATS",
    "QUANT_METHOD",
    "SvdCompressQuantizationConfig",
    "check_tensors",
    "checkpoint_format",
    "clear_stale_temporaries",
    "conv1d_weights",
    "densify_",
    "export_dense",
    "guard_names",
    "guard_tensors",
    "install_empty_modules_",
    "is_compressed_checkpoint",
    "load",
    "migrate",
    "push_to_hub",
    "save",
    "state_to_save",
    "tensor_headers",
    "transpose_conv1d_weights",
]

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


QUANT_METHOD = "svdcompress"  # quantization_config.quant_method: how transformers finds our loader
# 1: compression_config only; 2: + quantization_config and guard tensors; 3: float dense layers that
# replaced a Conv1D are stored as Conv1D stores its weight (conv1d_weights).
CHECKPOINT_FORMAT = 3
OLDER_FORMATS = (1, 2)  # load reads them as they are; migrate rewrites them as CHECKPOINT_FORMAT


def _other_format(version) -> str:
    if version in OLDER_FORMATS:
        return (
            f"this checkpoint is svdcompress checkpoint format {version}, written by an earlier "
            f"version, and from_pretrained reads format {CHECKPOINT_FORMAT}: rewrite it once with "
            "`svdcompress migrate DIR` (add `--out NEW` to keep the original folder); "
            "svdcompress.load(DIR) reads it as it is."
        )
    return (
        f"this checkpoint is svdcompress checkpoint format {version!r} "
        f"(quantization_config.format_version) and this version reads format "
        f"{CHECKPOINT_FORMAT}: load it with the svdcompress version that wrote it "
        "(compression_config.library_version in its config.json), or rebuild it from its "
        "recipe.yaml with this one (svdcompress compress BASE --recipe DIR/recipe.yaml)."
    )


class SvdCompressQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config``: what a loader builds before the tensors arrive.

    ``modules``: name -> ``LowRankLinear.spec()`` (rank, storage, int8 or float, layout);
    ``fused``: name -> ``SlicedLinear.spec()`` (fused projections split per slice). Settings and
    provenance stay in ``compression_config``; this is only the layout. A format this version does
    not read is refused here, before any model is built.
    """

    def __init__(self, modules: dict | None = None, fused: dict | None = None,
                 format_version: int = CHECKPOINT_FORMAT, quant_method: str = QUANT_METHOD,
                 **unknown) -> None:
        if format_version != CHECKPOINT_FORMAT:
            raise CheckpointError(_other_format(format_version))
        if unknown:
            raise CheckpointError(
                f"quantization_config holds {sorted(unknown)}, which svdcompress format "
                f"{CHECKPOINT_FORMAT} does not have; the config.json was edited or written by "
                "another version."
            )
        self.quant_method = quant_method
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.fused = dict(fused or {})

    @classmethod
    def from_model(cls, model: nn.Module) -> SvdCompressQuantizationConfig | None:
        """The layout of ``model``'s live modules (``None`` for a plain model)."""
        modules = {name: m.spec() for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
        fused = fused_specs(model)
        return cls(modules=modules, fused=fused) if modules or fused else None

    @classmethod
    def of_config(cls, config) -> SvdCompressQuantizationConfig:
        """The layout :func:`load` rebuilds: ``compression_config``'s module specs, the record every
        format holds (:func:`checkpoint_format` refuses one this version does not read).

        Both loaders check the tensors against the copy they read, so an edit of either copy that
        no longer matches the tensors is refused by the loader that reads it.
        """
        checkpoint_format(config)
        compression = getattr(config, "compression_config", None) or {}
        return cls(modules=compression.get("modules"), fused=compression.get("fused"))

    @property
    def float_factors(self) -> bool:
        """Every low-rank matrix is a float parameter (not int8 codes): gradients can train them."""
        return all(spec.get("quant_bits") is None for spec in self.modules.values())


def checkpoint_format(config) -> int:
    """The format a compressed checkpoint's config was written in: 1 without ``quantization_config``,
    else its ``format_version``; one this version does not read is refused with what to do."""
    entry = getattr(config, "quantization_config", None)
    if entry is None:
        return 1
    entry = entry if isinstance(entry, dict) else entry.to_dict()
    if entry.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"config.json's quantization_config is {entry.get('quant_method')!r}, not "
            f"{QUANT_METHOD!r}: not a checkpoint svdcompress wrote."
        )
    if entry.get("format_version") in OLDER_FORMATS:
        return entry["format_version"]
    SvdCompressQuantizationConfig.from_dict(entry)  # refuses a newer format and unknown keys
    return CHECKPOINT_FORMAT


def conv1d_weights(layout: SvdCompressQuantizationConfig) -> list[str]:
    """Tensors a checkpoint stores transposed, as ``Conv1D`` stores its weight (in, out), since format 3.

    A float dense-storage module that replaced GPT-2's ``Conv1D`` holds a plain ``weight`` under the
    stock name, so it gets no guard tensor; stored (out, in) as formats 1 and 2 did, stock
    transformers refused it when non-square but loaded a square one (``attn.c_proj``) transposed,
    silently wrong. In Conv1D's orientation stock transformers loads the rank-r weight correctly.
    """
    return sorted(f"{name}.weight" for name, spec in layout.modules.items()
                  if spec["layout"] == "conv1d" and "weight" in tensor_layout(spec))


def transpose_conv1d_weights(layout: SvdCompressQuantizationConfig, state: dict) -> dict:
    """``state`` (name -> tensor, or -> (shape, dtype) headers) with :func:`conv1d_weights`
    transposed: the module's orientation to the file's and back (its own inverse)."""
    names = set(conv1d_weights(layout))
    flipped = {}
    for key, value in state.items():
        if key in names and isinstance(value, torch.Tensor):
            value = value.T.contiguous()
        elif key in names:  # (shape, dtype) from tensor_headers
            value = (tuple(reversed(value[0])), value[1])
        flipped[key] = value
    return flipped


def guard_names(layout: SvdCompressQuantizationConfig) -> list[str]:
    """Stock weight names that the checkpoint's modules no longer hold, one guard tensor each.

    transformers without ``import svdcompress`` skips an unknown ``quant_method`` with a warning
    and would fill such a layer's missing ``weight`` with random numbers. A one-number tensor under
    that name turns it into a size-mismatch error. A float dense rank-r module keeps a real
    ``weight``, which stock transformers loads as it is (a Conv1D one: :func:`conv1d_weights`).
    """
    names = [f"{name}.weight" for name, spec in layout.modules.items()
             if "weight" not in tensor_layout(spec)]
    return sorted([*names, *(f"{name}.weight" for name in layout.fused)])


def guard_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The guard tensors to save beside ``model``'s own (see :func:`guard_names`)."""
    layout = SvdCompressQuantizationConfig.from_model(model)
    return {} if layout is None else {name: torch.zeros(1) for name in guard_names(layout)}


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint of ``model`` holds, as the file holds it: what ``save`` and
    ``save_pretrained`` (the quantizer) write."""
    layout = SvdCompressQuantizationConfig.from_model(model)
    if layout is None:
        return model.state_dict()
    return {**transpose_conv1d_weights(layout, model.state_dict()), **guard_tensors(model)}


def install_empty_modules_(model: nn.Module, layout: SvdCompressQuantizationConfig) -> None:
    """Swap the modules ``layout`` lists into ``model``, on the meta device, before tensors load.

    Both loaders do this: :func:`load` and transformers' ``from_pretrained`` (through the quantizer).
    """
    # Fused projections compressed per slice (GPT-2's c_attn) are split again before their slices load.
    split_fused_(model, layout.fused)
    for name, spec in layout.modules.items():
        module = LowRankLinear(
            spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"],
            storage=spec["storage"], layout=spec["layout"], quant_bits=spec.get("quant_bits"),
            device="meta",
        )
        model.set_submodule(name, module)


_SAFETENSORS_DTYPES = {"I8": torch.int8, "I64": torch.int64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "F64": torch.float64}


def tensor_headers(files: list[str | Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Name -> (shape, dtype) of every tensor in safetensors ``files``, read from headers only."""
    headers = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = handle.get_slice(key)
                    headers[key] = (tuple(tensor.get_shape()), _SAFETENSORS_DTYPES.get(tensor.get_dtype()))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {file}: {err}. The file is corrupt or truncated.") from err
    return headers


def check_tensors(layout: SvdCompressQuantizationConfig, headers: dict) -> None:
    """Every module's tensors are present with the shape and dtype its spec says."""
    for name, spec in layout.modules.items():
        _check_spec(name, spec, headers)


def save(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False,
         max_shard_size: str = "2GB", extra_files: dict[str, str] | None = None,
         command: str | None = None, data: dict | None = None,
         tensor_writer: Callable[[Path], dict[str, str]] | None = None) -> Path:
    """Write a compressed (or plain) model as a Hugging Face folder with safetensors.

    A compressed model's folder also gets its model card (``README.md``) and, where one set of
    settings made it, ``recipe.yaml``. ``command`` (the command line that made it) and ``data``
    (the text settings the CLI chose its windows with: source, windows, seq_len, facts) are
    recorded in ``compression_config`` for both. ``extra_files`` (name -> text, e.g. a report) are
    written into the folder before it appears. ``tensor_writer(folder) -> weight map`` writes the
    model's tensors itself, for a model whose tensors were never all in memory (streaming: ``model``
    is then on the meta device); everything else is written as for any model.
    """
    compression = getattr(model.config, "compression_config", None)
    if not compression:
        # A plain model whose fused projections were split (LoRA on GPT-2's q/k) is saved fused,
        # so stock transformers finds the weights it expects.
        merge_dense_slices_(model)
    documents = {}
    if compression:
        compression.update({k: v for k, v in (("command", command), ("data", data)) if v is not None})
        documents = folder_documents(compression)
    _record_layout(model)
    try:
        with atomic_folder(out_dir, overwrite=overwrite) as tmp:
            if tensor_writer is None:
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size,
                                      state_dict=state_to_save(model))
            else:
                _save_streamed(model, tmp, tensor_writer)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in {**documents, **(extra_files or {})}.items():
                (tmp / name).write_text(text)
    except OSError as err:  # the temporary folder is gone already (atomic_folder's cleanup)
        raise write_error(out_dir, err) from err
    return Path(out_dir)


def _save_streamed(model: nn.Module, folder: Path, tensor_writer: Callable[[Path], dict[str, str]]) -> None:
    """Config and generation config by ``save_pretrained`` (so they are exactly what it writes for
    any model), the guard tensors in ``model.safetensors``, the tensors by ``tensor_writer``, all
    listed in one shard index."""
    guards = guard_tensors(model)
    # transformers 5 empties the dict it is given as it writes, and takes the state from an attached
    # quantizer in place of it: a streamed checkpoint held no guard until 2026-12-07. It gets a copy,
    # and whatever tensors it wrote go; ours come.
    model.save_pretrained(folder, safe_serialization=True, state_dict=dict(guards))
    for written in folder.glob("model*.safetensors*"):
        written.unlink()
    single = folder / "model.safetensors"
    if guards:
        save_file(guards, single, metadata={"format": "pt"})
    weight_map = dict.fromkeys(guards, single.name)
    weight_map.update(tensor_writer(folder))
    _transpose_in_shards(model, folder, weight_map)
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def push_to_hub(model: nn.Module, repo_id: str, *, tokenizer=None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None,
                token: str | bool | None = None, create_pr: bool = False, revision: str | None = None,
                max_shard_size: str = "2GB"):
    """Upload the folder :func:`save` writes — the model card and recipe with the tensors — to the
    hub repository ``repo_id`` (created if missing); returns the commit.

    transformers' own ``push_to_hub`` saves with ``save_pretrained`` and then writes its generic
    card (or the repository's old one) as ``README.md``: the settings, calibration and command in
    ours would never reach the hub. :func:`svdcompress.hf_integration.attach_quantizer` makes
    ``model.push_to_hub`` this function for every model svdcompress compressed or loaded.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = save(model, Path(tmp) / "upload", tokenizer=tokenizer, max_shard_size=max_shard_size)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload svdcompress model",
            commit_description=commit_description, create_pr=create_pr, revision=revision,
        )


def _transpose_in_shards(model: nn.Module, folder: Path, weight_map: dict[str, str]) -> None:
    """Put :func:`conv1d_weights` in the file's orientation in shards a ``tensor_writer`` wrote from
    module state. Each shard is written anew and renamed over the old: a hard-linked shard's
    other name (streaming's work folder) keeps its tensors."""
    layout = SvdCompressQuantizationConfig.from_model(model)
    names = set(conv1d_weights(layout)) if layout is not None else set()
    for shard in sorted({weight_map[name] for name in names if name in weight_map}):
        tensors = load_file(folder / shard)
        tensors = {k: (v.T.contiguous() if k in names else v) for k, v in tensors.items()}
        save_file(tensors, folder / f"{shard}.partial", metadata={"format": "pt"})
        os.replace(folder / f"{shard}.partial", folder / shard)


def _record_layout(model: nn.Module) -> None:
    """Set ``config.quantization_config`` from the live modules (quantize_factors_ and friends change
    them after loading), or drop ours from a model that is plain again."""
    layout = SvdCompressQuantizationConfig.from_model(model)
    if layout is not None:
        model.config.quantization_config = layout
    elif isinstance(getattr(model.config, "quantization_config", None), SvdCompressQuantizationConfig):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None and layout is not None:
        model.hf_quantizer.quantization_config = layout


def folder_documents(compression: dict) -> dict[str, str]:
    """File name -> text of the model card and (where one set of settings made it) the recipe."""
    from svdcompress.modelcard import CARD_FILE, render_card
    from svdcompress.recipe import RECIPE_FILE, recipe_text

    recipe = recipe_text(compression)
    documents = {CARD_FILE: render_card(compression, has_recipe=recipe is not None)}
    if recipe is not None:
        documents[RECIPE_FILE] = recipe
    return documents


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


def _check_spec(name: str, spec: dict, headers: dict[str, tuple[tuple[int, ...], torch.dtype | None]]) -> None:
    """``headers``: tensor name -> (shape, dtype), from a state dict or :func:`tensor_headers`."""
    bits = spec.get("quant_bits")  # absent in checkpoints written before int8 factors existed
    if bits is not None and bits not in SUPPORTED_QUANT_BITS:
        raise CheckpointError(
            f"{name}: compression_config says quant_bits={bits!r}; this version of svdcompress "
            f"reads {list(SUPPORTED_QUANT_BITS)} (or float factors)."
        )
    for suffix, (shape, dtype) in tensor_layout(spec).items():
        key = f"{name}.{suffix}"
        if key not in headers:
            what = "its int8 scales" if suffix.endswith("_scale") else key
            raise CheckpointError(f"compression_config lists {name} but the tensors lack {what} ({key}).")
        found_shape, found_dtype = headers[key]
        if tuple(found_shape) != shape:
            raise CheckpointError(
                f"{key} has shape {tuple(found_shape)} but compression_config says {shape}: "
                "the checkpoint's tensors and its config.json do not belong together."
            )
        if dtype is not None and found_dtype != dtype:
            raise CheckpointError(f"{key} is {found_dtype}, expected {dtype} for {spec['storage']} "
                                  f"storage with quant_bits={bits}.")


def load(path: str | Path, *, device: str | torch.device = "cpu", tokenizer: bool = True):
    """Rebuild a compressed model from its folder: ``(model, tokenizer or None)``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a model folder.")
    config = AutoConfig.from_pretrained(path)
    compression = getattr(config, "compression_config", None)
    if not compression:
        raise CheckpointError(f"{path}/config.json has no compression_config; load it as a plain model.")
    version = checkpoint_format(config)
    layout = SvdCompressQuantizationConfig.of_config(config)
    state = _read_state_dict(path, device)
    for name in guard_names(layout):  # only there to stop stock transformers (guard_names)
        state.pop(name, None)
    if version >= 3:
        state = transpose_conv1d_weights(layout, state)
    check_tensors(layout, {key: (tuple(t.shape), t.dtype) for key, t in state.items()})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    install_empty_modules_(model, layout)
    _load_strict(model, state, path)
    from svdcompress.hf_integration import attach_quantizer  # lazy: it builds on this module

    attach_quantizer(model)
    model.to(device).eval()
    tok = None
    if tokenizer and any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    return model, tok


# What save writes itself; anything else in a folder (reports, the evaluated card) goes along.
_REWRITTEN = ("config.json", "generation_config.json", "model.safetensors.index.json")


def migrate(path: str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Rewrite a checkpoint of an older format (:data:`OLDER_FORMATS`) as :data:`CHECKPOINT_FORMAT`,
    which ``AutoModelForCausalLM.from_pretrained`` reads: in place, or into ``out`` (an existing
    ``out`` only with ``overwrite``).

    The tensors are the same numbers (read by :func:`load`, written by :func:`save`); the folder's
    other files (model card, recipe, reports) are kept as they are, and a folder without a card or
    recipe gets them. A folder already in this format is left alone (copied when ``out`` is given).
    """
    path = Path(path)
    model, tokenizer = load(path)
    version = checkpoint_format(model.config)
    if version == CHECKPOINT_FORMAT and out is None:
        logger.info("%s is already svdcompress checkpoint format %d; nothing to do", path, version)
        return path
    kept = {}
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix != ".safetensors" and file.name not in _REWRITTEN \
                and not file.name.startswith("tokenizer"):
            try:
                kept[file.name] = file.read_text()
            except UnicodeDecodeError:
                logger.warning("%s: not text, so not carried into the migrated folder", file)
    saved = save(model, out if out is not None else path, tokenizer=tokenizer, overwrite=overwrite or out is None,
                 extra_files=kept)
    logger.info("migrated %s from format %d to format %d: %s", path, version, CHECKPOINT_FORMAT, saved)
    return saved


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
    return save(densify_(model), out_dir, tokenizer=tokenizer, overwrite=overwrite)


def densify_(model: nn.Module) -> nn.Module:
    """Replace every low-rank module by the plain layer it computes (fused projections fused
    again), in place, and forget the compression: ``model`` is then an ordinary transformers model.

    What ``export_dense`` writes and what ``model.dequantize()`` gives after ``from_pretrained``.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            model.set_submodule(name, module.to_dense())
    merge_dense_slices_(model)
    if hasattr(model.config, "compression_config"):
        del model.config.compression_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
