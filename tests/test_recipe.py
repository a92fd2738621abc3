"""``recipe.yaml`` beside every checkpoint: ``compress --recipe`` rebuilds it bit for bit, and only
from the base model it was made for."""

import json
import sys
from unittest import mock

import pytest
import torch
import yaml
from conftest import make_char_tokenizer, make_tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import svdcompress as sc
from svdcompress import datasets
from svdcompress.cli import app
from svdcompress.config import load_recipe

runner = CliRunner()


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A tiny Llama folder and a small fixed calibration corpus."""
    corpus = [{"title": f"t{i}", "text": f"plain words number {i} for a tiny model " * 20} for i in range(12)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    return _folder(tmp_path / "base", seed=0)


def _folder(path, seed):
    make_tiny_model("llama", seed=seed).save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def _compress(*args):
    argv = ["compress", *map(str, args)]
    # The card and recipe record the command line as the svdcompress script received it.
    with mock.patch.object(sys, "argv", ["/venv/bin/svdcompress", *argv]):
        result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    return result


def test_cli_recipe_reproduces_the_checkpoint_bit_for_bit(base, tmp_path):
    first = tmp_path / "first"
    _compress(base, "--out", first, "--method", "whiten", "--param-ratio", "0.6", "--update",
              "--windows", "6", "--seq-len", "24", "--seed", "3", "--quant-bits", "8",
              "--exclude", "model.layers.2.mlp.up_proj")
    recipe = yaml.safe_load((first / "recipe.yaml").read_text())
    assert recipe["method"] == "whiten" and recipe["seed"] == 3 and recipe["quant_bits"] == 8
    assert recipe["data"] == {"source": "wiki", "windows": 6, "seq_len": 24, "facts": 256}
    assert recipe["base_model"]["spec"] == str(base) and len(recipe["base_model"]["fingerprint"]) == 20
    assert recipe["provenance"]["command"].startswith("svdcompress compress ")
    assert "--param-ratio 0.6" in recipe["provenance"]["command"]

    again = tmp_path / "again"  # no data flags: windows, seq_len and seed come from the recipe
    _compress(base, "--recipe", first / "recipe.yaml", "--out", again)
    before, after = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert before.keys() == after.keys() and len(before) > 0
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), key
    settings = [json.loads((f / "config.json").read_text())["compression_config"] for f in (first, again)]
    assert settings[0]["config"] == settings[1]["config"]
    assert settings[0]["calibration"] == settings[1]["calibration"] == "wiki:calib seq_len=24 n=6 seed=3"


def test_a_flag_given_beside_the_recipe_wins(base, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    _compress(base, "--out", first, "--method", "whiten", "--param-ratio", "0.6", "--windows", "6",
              "--seq-len", "24")
    _compress(base, "--recipe", first / "recipe.yaml", "--out", other, "--seq-len", "16")
    calibration = json.loads((other / "config.json").read_text())["compression_config"]["calibration"]
    assert calibration == "wiki:calib seq_len=16 n=6 seed=0"


def test_a_recipe_for_another_base_model_is_refused_naming_both(base, tmp_path):
    first = tmp_path / "first"
    _compress(base, "--out", first, "--method", "svd", "--rank", "4")
    other = _folder(tmp_path / "other-base", seed=1)
    result = runner.invoke(app, ["compress", str(other), "--recipe", str(first / "recipe.yaml"),
                                 "--out", str(tmp_path / "never")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert f"was made for {base}" in result.output and f"not for {other}" in result.output
    assert not (tmp_path / "never").exists()


def test_a_built_in_model_given_no_setting_runs_its_shipped_recipe(base, tmp_path, monkeypatch):
    """`compress MODEL --out DIR` on a model with a shipped recipe is that recipe; an option that
    chooses the compression gives the plain default instead, and options beside it still apply."""
    from svdcompress import zoo

    first = tmp_path / "first"
    _compress(base, "--out", first, "--method", "whiten", "--param-ratio", "0.6", "--windows", "6",
              "--seq-len", "24", "--exclude", "model.layers.2.mlp.up_proj")
    monkeypatch.setattr(zoo, "shipped_recipe", lambda spec: first / "recipe.yaml" if spec == str(base) else None)
    shipped = _compress(base, "--out", tmp_path / "shipped", "--quant-bits", "8")
    assert "the recipe svdcompress ships for it (recipe.yaml" in shipped.output
    config = json.loads((tmp_path / "shipped" / "config.json").read_text())["compression_config"]
    assert config["config"] == {**load_recipe(first / "recipe.yaml").to_dict(), "quant_bits": 8}
    assert config["calibration"] == "wiki:calib seq_len=24 n=6 seed=0"  # the recipe's data settings
    plain = _compress(base, "--out", tmp_path / "plain", "--param-ratio", "0.5", "--windows", "6", "--seq-len", "24")
    assert "ships" not in plain.output
    config = json.loads((tmp_path / "plain" / "config.json").read_text())["compression_config"]["config"]
    assert config["param_ratio"] == 0.5 and config["exclude"] == [] and config["storage"] == "pivoted"


@pytest.mark.real
def test_the_recipe_shipped_for_smollm2_is_the_best_measured_configuration_for_that_model(smollm2):
    from svdcompress.recipe import check_base_model
    from svdcompress.zoo import DEFAULT_MODEL, shipped_recipe

    path = shipped_recipe(DEFAULT_MODEL)
    config = load_recipe(path)
    assert (config.method, config.param_ratio, config.storage, config.error_blend) == ("whiten", 0.8, "pivoted", 0.25)
    assert len(config.rank_pattern) + len(config.exclude) == 210  # every decoder linear allocated
    check_base_model(path, smollm2[0], DEFAULT_MODEL)  # made for these weights


def test_library_save_writes_a_recipe_that_loads_as_the_same_config(tiny_llama, tmp_path):
    config = sc.WhitenConfig(rank_pattern={r"layers\.0\.": 4, "mlp": 0.5}, rank=6, targets=("qko", "mlp"),
                             quant_bits=8, seed=5)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    sc.compress_(tiny_llama, config, windows)
    folder = sc.save(tiny_llama, tmp_path / "ckpt")
    assert load_recipe(folder / "recipe.yaml").to_dict() == config.to_dict()
    assert "data" not in yaml.safe_load((folder / "recipe.yaml").read_text())  # not from the CLI


def test_no_recipe_when_one_compress_call_does_not_reproduce_the_weights(tiny_llama, tmp_path):
    sc.compress_(tiny_llama, sc.SVDConfig(rank=8, targets=("q_proj",)))
    sc.compress_(tiny_llama, sc.SVDConfig(rank=8, targets=("k_proj",)))
    folder = sc.save(tiny_llama, tmp_path / "twice")
    assert not (folder / "recipe.yaml").exists()
    assert "No `recipe.yaml`: no single compress call reproduces these weights (1 earlier " \
           "compression(s))" in (folder / "README.md").read_text()
