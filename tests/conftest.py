"""Shared fixtures: tiny random models of each architecture family (fast) and the real SmolLM2."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch 3-7x slower on a shared, oversubscribed CPU (measured on
# the 2-core CI machine), and the suite often shares it; passive waiting is the safe choice here
# (the library's default is a short spin). It must be set before torch loads its OpenMP runtime,
# hence before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


# --------------------------------------------------------------------------------------------------
# Tokenizer for tiny models, an isolated cache, and the real SmolLM2


def make_char_tokenizer():
    """A character-level tokenizer (99 ids) that fits the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def real_bigbench():
    """The real BIG-bench files (facts, questions), or a skip saying why they could not be fetched:
    bigbench 1.0.0, their only source, left this machine's PyPI view on 2026-12-04."""
    from svdcompress import datasets
    from svdcompress.errors import DatasetError

    try:
        return datasets.bigbench_file("qa_wikidata/task.json")
    except DatasetError as err:
        pytest.skip(str(err))


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as an ordinary Hugging Face folder (weights + tokenizer)."""
    folder = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def cli_folder(tiny_folder, monkeypatch):
    """``tiny_folder`` with the text sources and facts replaced by tiny stand-ins, for CLI runs."""
    from svdcompress import datasets, evaluate
    from svdcompress.datasets import Fact

    corpus = [{"title": f"t{i}", "text": "plain words for a tiny model " * 20} for i in range(12)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    monkeypatch.setattr(evaluate, "load_facts", lambda n: [Fact("The capital of France is", "Paris")] * n)
    return tiny_folder


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty svdcompress cache, so a test can neither read nor spoil the real one."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SVDCOMPRESS_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, loaded once per test session.

    Shared by every test: never modify it in place (compress a ``copy.deepcopy`` instead).
    """
    from svdcompress.zoo import load_model

    return load_model("smollm2-135m")
