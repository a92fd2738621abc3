"""Evaluation metrics on tiny random models: exact math, self-consistency, and loop detection."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, make_tiny_model

from svdcompress import datasets, evaluate
from svdcompress.datasets import Fact


def _zero_output_head(model):
    """Every logit 0: a uniform next-token distribution, and greedy decoding repeats token 0."""
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias.zero_()
    return model


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary(tiny_windows):
    model = _zero_output_head(make_tiny_model("llama"))
    result = evaluate.perplexity(model, tiny_windows, batch_size=3)
    assert result.perplexity == pytest.approx(TINY_VOCAB, rel=1e-5)
    assert (result.n_tokens, result.n_windows, result.seq_len) == (4 * 31, 4, 32)


def test_perplexity_matches_a_direct_computation(tiny_model, tiny_windows):
    result = evaluate.perplexity(tiny_model, tiny_windows, batch_size=3)
    with torch.inference_mode():
        logits = tiny_model(input_ids=tiny_windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, TINY_VOCAB), tiny_windows[:, 1:].reshape(-1))
    assert result.nll == pytest.approx(float(nll), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_a_model_agrees_perfectly_with_itself(tiny_model, tiny_windows):
    result = evaluate.logits_fidelity(tiny_model, tiny_model, tiny_windows, batch_size=3)
    assert result.cosine == pytest.approx(1.0, abs=1e-6)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.mse == 0.0 and result.top1_agreement == 1.0
    assert result.n_tokens == tiny_windows.numel()


def test_fidelity_sees_a_different_model(tiny_windows):
    model, other = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    result = evaluate.logits_fidelity(other, model, tiny_windows)
    assert result.kl > 1e-4 and result.mse > 0 and result.cosine < 0.999


def test_fidelity_kl_matches_torch(tiny_windows, monkeypatch):
    monkeypatch.setattr(evaluate, "_ROW_CHUNK", 7)  # exercise the chunked path
    model, reference = make_tiny_model("qwen2", seed=0), make_tiny_model("qwen2", seed=1)
    result = evaluate.logits_fidelity(model, reference, tiny_windows)
    with torch.inference_mode():
        out = model(input_ids=tiny_windows).logits.reshape(-1, TINY_VOCAB)
        ref = reference(input_ids=tiny_windows).logits.reshape(-1, TINY_VOCAB)
    expected = F.kl_div(
        out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert result.kl == pytest.approx(float(expected), rel=1e-4)


def test_bad_windows_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="shape"):
        evaluate.perplexity(tiny_llama, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate.perplexity(tiny_llama, torch.full((1, 4), TINY_VOCAB))


def test_repetition_metrics_on_synthetic_text():
    fresh = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "birds",
        "sing",
    ]
    loop = "I am here . " * 10
    assert evaluate.repetition_rate(fresh) == 0.0
    assert evaluate.repetition_rate(loop.split()) > 0.8
    assert evaluate.distinct_n([fresh], 1) == 1.0
    assert evaluate.distinct_n([loop.split()], 2) < 0.15
    assert evaluate.repetition_rate(["a", "b"]) == 0.0 and evaluate.distinct_n([[]], 1) == 0.0


def test_a_looping_model_scores_clearly_worse(char_tokenizer):
    prompts = ["Hello there", "Once upon a time", "The river"]
    looping = _zero_output_head(make_tiny_model("llama"))
    result = evaluate.generation_quality(looping, char_tokenizer, prompts, max_new_tokens=24)
    assert result.repetition_rate > 0.9 and result.distinct_1 < 0.1
    assert result.mean_new_tokens == 24 and len(result.continuations) == 3
    healthy = evaluate.repetition_rate(list("a healthy continuation has fresh words"))
    assert healthy < result.repetition_rate - 0.5


def test_batched_left_padded_generation_matches_one_at_a_time(char_tokenizer):
    model = make_tiny_model("llama", seed=3)
    prompts = ["a", "a much longer prompt than the first", "mid length"]
    batched = evaluate.greedy_continuations(model, char_tokenizer, prompts, max_new_tokens=6)
    single = [
        evaluate.greedy_continuations(model, char_tokenizer, [p], max_new_tokens=6)[0]
        for p in prompts
    ]
    assert batched == single


@pytest.mark.parametrize(
    ("output", "answers", "expected"),
    [
        (" Kabul, the capital", ["Kabul"], True),
        (" kabul", ["Kabul"], True),
        (" Kabulistan", ["Kabul"], False),
        (" the city of Kabul", ["Kabul"], False),
        (" parody film", ["comedy", "parody"], True),
        ("", ["Kabul"], False),
        (" New York City", ["New York"], True),
        (" the Netherlands, and", ["Netherlands"], True),
        (" Netherlands", ["the Netherlands"], True),
        (" theater", ["the"], False),
        (" an apple", ["apple"], True),
    ],
)
def test_answer_matching(output, answers, expected):
    assert evaluate.answer_matches(output, answers) is expected


def test_fact_recall_counts_hits(char_tokenizer):
    model = make_tiny_model("gpt2", seed=2)
    prompts = ["The capital of A is", "B is located in", "The river C flows"]
    outputs = evaluate.greedy_continuations(model, char_tokenizer, prompts, max_new_tokens=8)
    truth = [char_tokenizer.decode(o).strip().split(" ")[0] or "x" for o in outputs]
    facts = [
        Fact(prompts[0], truth[0]),
        Fact(prompts[1], "zzz", (truth[1],)),
        Fact(prompts[2], "zzz"),
    ]
    result = evaluate.fact_recall(model, char_tokenizer, facts, batch_size=2)
    assert [h["correct"] for h in result.hits] == [truth[0] != "x", truth[1] != "x", False]
    assert result.n == 3 and result.accuracy == result.n_correct / 3


def test_evaluate_model_bundle_is_json_serialisable(monkeypatch, char_tokenizer, tiny_llama):
    corpus = [{"title": f"t{i}", "text": "some plain words here " * 30} for i in range(20)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    facts = [Fact("The capital of France is", "Paris")]
    result = evaluate.evaluate_model(
        tiny_llama,
        char_tokenizer,
        seq_len=32,
        n_samples=3,
        reference=copy.deepcopy(tiny_llama),
        facts=facts,
        generation=True,
        second_domain="sotu",
    )
    assert set(result) >= {"perplexity", "second_domain", "fidelity", "facts", "generation"}
    assert result["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["perplexity"]["n_tokens"] == 3 * 31
    json.dumps(result)


def test_evaluate_model_refuses_a_context_longer_than_the_model(
    monkeypatch, char_tokenizer, tiny_llama
):
    monkeypatch.setattr(datasets, "load_corpus", lambda name: [{"title": "t", "text": "x" * 5000}])
    with pytest.raises(datasets.DatasetError, match="context of 256"):
        evaluate.evaluate_model(tiny_llama, char_tokenizer, seq_len=512, n_samples=1, facts=None)
