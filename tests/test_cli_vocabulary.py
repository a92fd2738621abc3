"""One vocabulary across the command line: the same option and default for the same concept in
every command; old spellings still work, hidden, with one warning; --device everywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from svdcompress.cli import app
from svdcompress.commands._vocabulary import OLD_SPELLINGS, VOCABULARY, _rewrite

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _option(command_name: str, option: str):
    for param in _commands()[command_name].params:
        if option in param.opts:
            return param
    return None


@pytest.mark.parametrize("concept", VOCABULARY)
def test_each_concept_has_one_option_and_one_default(concept):
    spec = VOCABULARY[concept]
    for command in spec.commands:
        param = _option(command, spec.option)
        assert param is not None, f"{command} lacks {spec.option} ({concept})"
        if command not in spec.exceptions:
            assert param.default == spec.default, (command, spec.option, param.default)


def test_no_command_spells_a_concept_another_way():
    old = {name for renames in OLD_SPELLINGS.values() for name in renames}
    for name, command in _commands().items():
        visible = {opt for param in command.params for opt in param.opts}
        assert not visible & old, (name, visible & old)


def test_every_computing_command_takes_device_and_every_numbers_command_json():
    for name in ("compress", "analyze", "eval", "recover", "finetune", "bench"):
        assert _option(name, "--device").default == "auto"
    for name in ("compress", "analyze", "eval", "recover", "finetune", "bench", "quantize"):
        assert _option(name, "--json") is not None


def test_old_spellings_are_hidden_from_help():
    result = runner.invoke(app, ["analyze", "--help"])
    assert result.exit_code == 0
    for old, new in OLD_SPELLINGS["analyze"].items():
        assert re.search(rf"{re.escape(new)}\b", result.output)
        assert not re.search(rf"{re.escape(old)}\b", result.output)


def test_rewrite_handles_both_forms_and_stops_at_double_dash():
    args = ["m", "--calib=news", "--calib-samples", "3", "--calib-samples", "4", "--", "--calib"]
    rewritten, used = _rewrite(args, OLD_SPELLINGS["compress"])
    assert rewritten == ["m", "--data=news", "--windows", "3", "--windows", "4", "--", "--calib"]
    assert used == ["--calib", "--calib-samples"]  # each once, however often it appears


# --------------------------------------------------------------------------------------------------
# Real runs on a tiny model


def test_old_spelling_works_and_warns_once(cli_folder, tmp_path):
    out = tmp_path / "r.json"
    args = ["eval", str(cli_folder), "--seq-len", "16", "--samples", "2", "--samples", "3",
            "--facts", "0", "--second-domain", "none", "--device", "cpu", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("--samples is the old spelling of --windows") == 1
    assert json.loads(out.read_text())["perplexity"]["n_windows"] == 3  # the last one given, as click does


def test_compress_accepts_the_canonical_names(cli_folder, tmp_path):
    out, summary = tmp_path / "ckpt", tmp_path / "summary.json"
    args = ["compress", str(cli_folder), "--out", str(out), "--data", "wiki", "--windows", "2",
            "--seq-len", "16", "--seed", "3", "--device", "cpu", "--json", str(summary),
            "--param-ratio", "0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "old spelling" not in result.stderr
    numbers = json.loads(summary.read_text())
    assert numbers["modules"] == 21 and numbers["target_param_ratio"] <= 0.5
    config = json.loads((out / "config.json").read_text())["compression_config"]
    assert config["config"]["seed"] == 3 and "n=2 seed=3" in config["calibration"]


def test_compress_seed_default_leaves_a_recipes_seed(cli_folder, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"method": "svd", "rank": 4, "seed": 7}))
    out = tmp_path / "ckpt"
    result = runner.invoke(app, ["compress", str(cli_folder), "--out", str(out), "--recipe",
                                 str(recipe), "--windows", "2", "--seq-len", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["compression_config"]["config"]["seed"] == 7


def test_importance_mode_is_choosable_and_checked(cli_folder, tmp_path):
    result = runner.invoke(app, ["compress", str(cli_folder), "--out", str(tmp_path / "x"),
                                 "--method", "whiten", "--importance-mode", "taylor"])
    assert result.exit_code == 2 and "--importance-mode applies to --method importance" in result.output


# --------------------------------------------------------------------------------------------------
# --device cuda without a GPU: one clear line, exit 2, before any model loads — in every command.
# Each command line also uses the canonical names, so parsing them is checked too.


def _device_commands(tiny: str, tmp: Path) -> dict[str, list[str]]:
    data = tmp / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    return {
        "compress": ["compress", tiny, "--out", str(tmp / "c"), "--data", "wiki", "--windows", "2",
                     "--seq-len", "16", "--seed", "0", "--json", str(tmp / "c.json")],
        "analyze": ["analyze", tiny, "--out", str(tmp / "a"), "--data", "wiki", "--windows", "2",
                    "--seq-len", "16", "--seed", "0", "--probe-windows", "1", "--eval-windows", "1",
                    "--json", str(tmp / "a.json")],
        "eval": ["eval", tiny, "--data", "wiki", "--windows", "2", "--seq-len", "16", "--seed", "0",
                 "--json", str(tmp / "e.json")],
        "recover": ["recover", tiny, "--steps", "1", "--out", str(tmp / "r"), "--data", "wiki",
                    "--windows", "2", "--seq-len", "16", "--seed", "0", "--json", str(tmp / "r.json")],
        "finetune": ["finetune", tiny, "--data", str(data), "--out", str(tmp / "f"), "--seq-len", "16",
                     "--seed", "0", "--json", str(tmp / "f.json")],
        "bench": ["bench", tiny, "--json", str(tmp / "b.json")],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["compress", "analyze", "eval", "recover", "finetune", "bench"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(command, cli_folder, tmp_path):
    args = _device_commands(str(cli_folder), tmp_path)[command]
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --device cuda: this machine has no CUDA device; use cpu or auto."]
    assert not any((tmp_path / name).exists() for name in ("c", "a", "r", "f"))


# --------------------------------------------------------------------------------------------------
# The README's table is this vocabulary


def _readme_table() -> dict[str, tuple[str, str]]:
    after = README.read_text().split("### CLI vocabulary", 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    table = [line for line in after[start:] if line.startswith("|") or not line][: None]
    table = table[: table.index("")] if "" in table else table
    rows = {}
    for line in table[2:]:  # after the header and the |---| line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = (cells[1].strip("`"), cells[3])
    return rows


def test_readme_vocabulary_table_matches_the_code():
    rows = _readme_table()
    assert set(rows) == set(VOCABULARY)
    for concept, spec in VOCABULARY.items():
        option, commands = rows[concept]
        assert option == spec.option
        assert [c.strip("` ") for c in commands.split(",")] == list(spec.commands)
