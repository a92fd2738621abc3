"""experiments/train_big_then_compress.py: the parameter matching and the factored embedding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from svdcompress.modules import stored_numbers

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "train_big_then_compress.py"


@pytest.fixture(scope="module")
def tb():
    spec = importlib.util.spec_from_file_location("train_big_then_compress", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_facts_are_distinct_deterministic_and_in_their_token_ranges(tb):
    facts = tb.make_facts(500, seed=3)
    assert torch.equal(facts, tb.make_facts(500, seed=3)) and facts.shape == (500, 4)
    assert len({tuple(row[:3]) for row in facts.tolist()}) == 500
    assert facts[:, :3].min() >= 2 and facts[:, :3].max() < 2 + tb.N_KEYS
    assert facts[:, 3].min() >= 2 + tb.N_KEYS and facts[:, 3].max() < tb.VOCAB


@pytest.mark.parametrize("width", [128, 160, 256])
def test_matched_ranks_are_the_largest_within_the_small_models_count(tb, width):
    small, layers = 64, 2
    ranks = tb.matched_ranks(width, small, layers)
    r, e = ranks["decoder_rank"], ranks["embedding_rank"]
    total = tb.model_numbers(small, layers)
    assert tb.model_numbers(width, layers, rank=r, emb_rank=e) <= total
    assert tb.model_numbers(width, layers, rank=r, emb_rank=e + 1) > total
    small_linears = sum(m * n for m, n in tb.linear_shapes(small, layers))
    assert sum((r + 1) * (m + n) for m, n in tb.linear_shapes(width, layers)) > small_linears


def test_counts_match_the_models_and_full_rank_embedding_factoring_is_exact(tb):
    model = tb.build_model(64, 2, seed=0)
    assert stored_numbers(model) == tb.model_numbers(64, 2)
    ids = tb.make_facts(20, seed=0)[:, :3]
    before = model(input_ids=ids).logits
    tb.factor_embeddings_(model, 64)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)


def test_params_matched_compression_stores_what_the_formula_says(tb):
    model = tb.build_model(128, 2, seed=0)
    ranks = tb.matched_ranks(128, 64, 2)
    tb.compress_matched(model, ranks)
    assert stored_numbers(model) == tb.model_numbers(128, 2, rank=ranks["decoder_rank"],
                                                     emb_rank=ranks["embedding_rank"])
    assert stored_numbers(model) <= tb.model_numbers(64, 2)
    logits = model(input_ids=tb.make_facts(4, seed=0)[:, :3]).logits  # (4, 3, vocab)
    assert logits.shape == (4, 3, tb.VOCAB) and torch.isfinite(logits).all()
