"""Shared fixtures: tiny random models of each architecture family (fast) and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

TINY_VOCAB = 128


def tiny_config(arch: str):
    """A config small enough that a forward pass takes milliseconds, with every layer type present."""
    if arch == "llama":
        return LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256)
    if arch == "gpt_neo":
        return GPTNeoConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, num_layers=3, num_heads=4,
            attention_types=[[["global", "local"], 1], [["global"], 1]], max_position_embeddings=256,
            window_size=32,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
        )
    raise ValueError(f"no tiny config for {arch!r}")


TINY_ARCHS = ["llama", "qwen2", "gpt2", "gpt_neo", "opt"]


def make_tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def tiny_windows():
    """Token windows (batch 4, length 32) for tiny models; random but fixed."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY_VOCAB, (4, 32), generator=generator)
