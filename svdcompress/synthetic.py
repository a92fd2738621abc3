"""Synthetic Llama-shaped models with random weights, for memory and time benchmarks.

Quality is meaningless (the weights are random); what is real is the size of every matrix, so
peak memory and time per block are those of the real architecture. The model is written shard by
shard (one decoder block per shard), so building the 7B shape never holds more than one block.
The tokenizer is SmolLM2's (from the svdcompress cache) and the vocabulary matches it, so
calibration text tokenizes as for any other model. Never commit the output: write it under
``runs/`` (ignored by git) or the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from svdcompress.checkpoint import atomic_folder, write_error
from svdcompress.errors import ConfigError

__all__ = ["SHAPES", "make_synthetic", "synthetic_config"]

logger = logging.getLogger(__name__)

# Published shapes; the vocabulary is replaced by the tokenizer's (SmolLM2: 49,152 tokens).
SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
    },
    "llama-7b": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
    },
}
TOKENIZER_MODEL = "smollm2-135m"


def synthetic_config(shape: str, vocab_size: int, *, dtype: torch.dtype = torch.float32,
                     **overrides) -> LlamaConfig:
    if shape not in SHAPES:
        raise ConfigError(f"unknown synthetic shape {shape!r}; known: {sorted(SHAPES)}")
    settings = {**SHAPES[shape], **overrides}
    return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, dtype=dtype, **settings)


def _seeded_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Random weights that depend on the tensor's name and the seed only, not on write order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator) * std


def _tensor(name: str, shape: tuple[int, ...], config: LlamaConfig, seed: int,
            dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm scales: ones, as a freshly initialised model has them
        return torch.ones(shape, dtype=dtype)
    return _seeded_normal(name, shape, config.initializer_range, seed).to(dtype)


def _shard_groups(model) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensor names and shapes grouped by shard: what precedes the blocks, one block each, the rest."""
    groups: dict[str, list] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        key = f"block{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else (
            "head" if name.startswith("model.embed") else "tail")
        groups.setdefault(key, []).append((name, tuple(tensor.shape)))
    return [groups["head"], *(groups[k] for k in sorted(k for k in groups if k.startswith("block"))),
            groups["tail"]]


def make_synthetic(shape: str, out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, tokenizer_model: str = TOKENIZER_MODEL,
                   **overrides) -> Path:
    """Write a ``shape`` model with random weights as a sharded Hugging Face folder at ``out``.

    ``overrides`` change config fields (e.g. ``num_hidden_layers=2`` for a test).
    """
    from svdcompress.zoo import resolve_model_spec

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_spec(tokenizer_model))
    config = synthetic_config(shape, len(tokenizer), dtype=dtype, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, **overrides)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    groups = _shard_groups(skeleton)
    weight_map, total = {}, 0
    try:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            for index, group in enumerate(groups):
                file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
                tensors = {name: _tensor(name, s, config, seed, dtype) for name, s in group}
                save_file(tensors, tmp / file, metadata={"format": "pt"})
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                weight_map.update(dict.fromkeys(tensors, file))
                del tensors  # one shard in memory at a time
                logger.info("wrote %s (%d of %d)", file, index + 1, len(groups))
            index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
            config.architectures = ["LlamaForCausalLM"]
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as err:
        raise write_error(out, err) from err
    logger.info("synthetic %s: %.2f GB of %s weights in %s", shape, total / 1e9, dtype, out)
    return Path(out)
