"""Model cards: ``README.md`` in the hub's format in every saved folder, updated by ``eval``."""

import re
import sys
from unittest import mock

import pytest
import yaml
from conftest import make_char_tokenizer, make_tiny_model
from typer.testing import CliRunner

import svdcompress as sc
from svdcompress import datasets, evaluate
from svdcompress.cli import app
from svdcompress.datasets import Fact
from svdcompress.modelcard import render_card

runner = CliRunner()


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _compression(**changes):
    modules = {f"model.layers.{i}.self_attn.{r}": {"in_features": 576, "out_features": 576, "rank": 100 + i,
                                                   "bias": False, "storage": "factored", "layout": "linear",
                                                   "quant_bits": 8}
               for i in range(3) for r in ("q_proj", "k_proj")}
    return {"config": {"method": "whiten", "param_ratio": 0.8, "targets": ["qko"], "seed": 7,
                       "exclude": [r"layers\.0\.self_attn\.o_proj"], "update": True},
            "modules": modules, "calibration": "wiki:calib seq_len=512 n=64 seed=7",
            "base_model": "smollm2-135m", "library_version": sc.__version__,
            "command": "svdcompress compress smollm2-135m --param-ratio 0.8 --targets qko --out runs/x",
            **changes}


def test_card_says_what_was_done_in_the_hub_format():
    card = render_card(_compression(), has_recipe=True)
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and {"svdcompress", "whiten", "int8"} <= set(meta["tags"])
    for text in ("| method | `whiten`: SVD-LLM truncation-aware whitening |",
                 "| ratio | param_ratio 0.8 (parameters kept / before, per targeted matrix) |",
                 "| modules replaced | 6, rank 100–102 (median 101) |",
                 "| factors | INT8 (per-row float32 scales) in 6 of 6 modules |",
                 "excluded: `layers\\.0\\.self_attn\\.o_proj`",
                 "| calibration data | `wiki:calib seq_len=512 n=64 seed=7` |", "| seed | 7 |",
                 "least-squares update of the left factor",
                 "```bash\nsvdcompress compress smollm2-135m --param-ratio 0.8 --targets qko --out runs/x\n```",
                 "svdcompress compress smollm2-135m --recipe recipe.yaml --out NEW",
                 "transformers refuses this folder", "Not measured yet"):
        assert text in card, text


def test_card_of_a_recovered_model_is_a_finetune_of_a_local_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a local model\n")
    card = render_card(_compression(base_model=str(base), recovery={"steps": 10}), has_recipe=False)
    meta = _front_matter(card)
    assert "base_model" not in meta and meta["license"] == "mit"  # a local path is no hub id
    assert f"`{base}`" in card and "No `recipe.yaml`" in card and "Then: recovery" in card


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A tiny base folder, its compressed checkpoint made by the CLI, and a fixed small corpus."""
    corpus = [{"title": f"t{i}", "text": f"plain words number {i} for a tiny model " * 20} for i in range(12)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    monkeypatch.setattr(evaluate, "load_facts", lambda n: [Fact("The capital of France is", "Paris")] * n)
    base = tmp_path / "base"
    make_tiny_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    argv = ["compress", str(base), "--out", str(tmp_path / "ckpt"), "--method", "svd", "--rank", "8",
            "--quant-bits", "8"]
    with mock.patch.object(sys, "argv", ["svdcompress", *argv]):
        result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    return base, tmp_path / "ckpt"


def test_cli_checkpoint_card_names_the_command(checkpoint):
    base, folder = checkpoint
    card = (folder / "README.md").read_text()
    assert f"svdcompress compress {base} --out {folder} --method svd --rank 8 --quant-bits 8" in card
    assert "| modules replaced | 21, rank 8 |" in card and (folder / "recipe.yaml").is_file()


def test_eval_with_reference_puts_its_table_in_the_card_and_nothing_else_changes(checkpoint):
    base, folder = checkpoint
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"}
    args = ["eval", str(folder), "--reference", str(base), "--seq-len", "32", "--windows", "2",
            "--facts", "2", "--second-domain", "none"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = (folder / "README.md").read_text()
    assert "Not measured yet" not in card and f"beside the original `{base}`" in card
    assert "| metric | value | reference | × reference | measured on |" in card
    row = re.search(r"\| perplexity \(held-out\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card)
    assert row and abs(float(row[1]) / float(row[2]) - float(row[3])) < 2e-3
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"} == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_plain_models_get_no_card(tiny_llama, tmp_path):
    folder = sc.save(tiny_llama, tmp_path / "plain")
    assert not (folder / "README.md").exists() and not (folder / "recipe.yaml").exists()
    sc.compress_(tiny_llama, sc.SVDConfig(rank=8))
    exported = sc.export_dense(tiny_llama, tmp_path / "dense")
    assert not (exported / "README.md").exists()
