"""The conflicting-facts benchmark and the brief's API names (compress_qko, freeze_layers, ...)."""

from __future__ import annotations

import random

import pytest
import torch

import svdcompress as sc
from svdcompress import protect
from svdcompress.datasets import Fact
from svdcompress.modules import LowRankLinear
from svdcompress.protect import ConflictBenchmark, ConflictFact, measure_knowledge, relation_of


def test_relation_cuts_the_subject_and_prefers_known_relations():
    assert relation_of("The capital of Afghanistan is") == "The capital of … is"
    assert relation_of("The sport played by Javy López is") == "The sport played by … is"
    known = {"The country of … is", "The country of citizenship of … is", "The official language of … is"}
    assert relation_of("The country of citizenship of An Jung-geun is", known) == \
        "The country of citizenship of … is"
    # the subject's own "of" is not part of the relation when that longer prefix is unknown
    assert relation_of("The official language of Confederation of the Rhine is", known) == \
        "The official language of … is"


def test_relations_group_real_looking_prompts():
    facts = [Fact(f"The capital of Country{i} is", f"City{i}") for i in range(6)]
    facts += [Fact(f"The capital of Kingdom of Land{i} is", f"Town{i}") for i in range(2)]
    groups = protect._relations(facts)
    assert len(groups["The capital of … is"]) == 8  # "Kingdom of" is shared by too few prompts


def test_contradiction_is_never_an_accepted_answer():
    fact = Fact("The colour of the flag of X is", "red", ("white",))
    same = [Fact(f"The colour of the flag of Y{i} is", answer) for i, answer in
            enumerate(["red", "white", "Red", "blue", "green"])]
    rng = random.Random(0)
    answers = {protect._contradiction(fact, same, rng) for _ in range(30)}
    assert answers == {"blue", "green"}
    assert protect._contradiction(fact, same[:3], rng) is None


def _tiny_benchmark() -> ConflictBenchmark:
    retention = [ConflictFact("The capital of A is", ("Kabul",), "Lima", "The capital of … is"),
                 ConflictFact("The capital of B is", ("Rome",), "Oslo", "The capital of … is")]
    control = [Fact("The language of C is", "French")]
    return ConflictBenchmark(retention, control, n_scanned=10, n_recalled=3, seed=0, base_model="x")


def test_benchmark_round_trips_and_writes_training_data(tmp_path):
    bench = _tiny_benchmark()
    again = ConflictBenchmark.from_dict(bench.to_dict())
    assert again == bench and again.digest() == bench.digest()
    assert bench.training_records()[0] == {"prompt": "The capital of A is", "completion": " Lima"}
    path = bench.write_training_data(tmp_path / "data.jsonl")
    assert sc.finetune.load_examples(path) == bench.training_records()


def test_measure_knowledge_scores_retention_learning_and_control(monkeypatch, char_tokenizer):
    outputs = [" Kabul, the city", " Oslo.", " french and more"]  # kept, learned, control kept
    ids = [char_tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    monkeypatch.setattr(protect, "greedy_continuations", lambda *a, **k: ids)
    result = measure_knowledge(None, char_tokenizer, _tiny_benchmark(), generation_tokens=0,
                               progress=False)
    assert (result.retained, result.learned, result.control_retained) == ("10", "01", "1")
    assert (result.retention, result.learning, result.collateral_retention) == (0.5, 0.5, 1.0)
    assert result.perplexity is None and result.repetition_rate is None


def test_build_benchmark_keeps_recalled_facts_and_alternates_sets(monkeypatch):
    facts = [(Fact(f"The capital of Land{i} is", f"City{i}"), "eval") for i in range(40)]
    monkeypatch.setattr(protect, "all_facts", lambda: facts)
    monkeypatch.setattr(protect, "load_facts", lambda n, seed: [facts[0][0]])  # "standard": excluded

    class Recall:  # the base model "knows" the even-numbered lands
        def __init__(self, hits):
            self.hits = hits

    def fake_recall(model, tokenizer, chosen, **kwargs):
        return Recall([{"correct": int(f.prompt.split("Land")[1].split()[0]) % 2 == 0} for f in chosen])

    monkeypatch.setattr(protect, "fact_recall", fake_recall)
    bench = protect.build_conflict_benchmark(None, None, n_retention=4, n_control=3, chunk=8)
    prompts = [f.prompt for f in bench.retention] + [f.prompt for f in bench.control]
    assert len(bench.retention) == 4 and len(bench.control) == 3 and len(set(prompts)) == 7
    assert "The capital of Land0 is" not in prompts
    assert all(int(p.split("Land")[1].split()[0]) % 2 == 0 for p in prompts)
    assert all(f.new_answer not in f.answers for f in bench.retention)
    with pytest.raises(sc.errors.DatasetError, match="Ask for fewer"):
        protect.build_conflict_benchmark(None, None, n_retention=30, n_control=30)


def test_compress_qko_is_cf90s_compression_step(tiny_llama):
    assert sc.compress_qko(tiny_llama, 0.7) == 9  # 3 blocks x (q, k, o)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.storage == "dense" and q.rank == round(0.7 * 64)
    assert not isinstance(tiny_llama.model.layers[0].self_attn.v_proj, LowRankLinear)


def test_importance_wrappers_keep_the_directions_the_facts_need(tiny_llama, char_tokenizer):
    facts = [Fact("ab is", "cd"), Fact("ef is", "gh")]
    scores = sc.compute_importance(tiny_llama, char_tokenizer, facts)
    assert len(scores.taylor) == 9 and scores.n_items == 2
    assert sc.compress_qko_importance(tiny_llama, scores, ratio=0.5) == 9
    assert tiny_llama.model.layers[2].self_attn.o_proj.rank == 32
    assert torch.isfinite(tiny_llama(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
