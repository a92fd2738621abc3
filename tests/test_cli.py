"""The command line: a readable table on success, one clean line and exit status 2 on bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from svdcompress import zoo
from svdcompress.cli import app

runner = CliRunner()


def test_eval_prints_a_table_and_writes_json(cli_folder, tmp_path):
    out = tmp_path / "result.json"
    args = [
        "eval",
        str(cli_folder),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--facts",
        "2",
        "--json",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in (
        "perplexity (held-out)",
        "perplexity (second domain)",
        "fact recall",
        "2 windows × 32",
    ):
        assert text in result.output
    saved = json.loads(out.read_text())
    assert saved["perplexity"]["n_windows"] == 2 and saved["facts"]["n"] == 2
    assert saved["run"]["model_spec"] == str(cli_folder)


def test_optional_sections_can_be_switched(cli_folder):
    args = [
        "eval",
        str(cli_folder),
        "--seq-len",
        "16",
        "--windows",
        "1",
        "--facts",
        "0",
        "--second-domain",
        "none",
        "--reference",
        str(cli_folder),
        "--generation",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "second domain" not in result.output and "fact recall" not in result.output
    assert "KL(ref‖model)" in result.output and "repetition rate" in result.output
    assert "× reference" in result.output  # the original is measured side by side
    [ppl_row] = [line for line in result.output.splitlines() if "perplexity (held-out)" in line]
    assert "1.000" in ppl_row  # the model against itself


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "no-such-model"], "cannot be reached"),
        (["eval", "./missing"], "no such file or folder"),
        (["eval", "TINY", "--windows", "0"], "must be at least 1"),
        (["eval", "TINY", "--seq-len", "4096"], "longer than the model's context of 256"),
        (["compress", "TINY", "--out", "OUT", "--method", "svd", "--error-blend", "0.3"],
         "unknown settings for method 'svd': ['error_blend']"),
        (["compress", "TINY", "--out", "OUT", "--error-blend", "0.3", "--calibration-stream", "original"],
         "calibration_stream='compressed' (the default) with it"),
        (["compress", "TINY", "--out", "OUT", "--calibration-stream", "both"], "calibration_stream='both'"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(cli_folder, monkeypatch, args, message, tmp_path):
    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: False)
    names = {"TINY": str(cli_folder), "OUT": str(tmp_path / "out")}
    args = [names.get(a, a) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]


def test_compress_one_pass_and_error_blend_flags_reach_the_config(cli_folder, tmp_path):
    for flags, expected in [(["--calibration-stream", "original"], ("original", 0.0)),
                            (["--error-blend", "0.25"], ("compressed", 0.25))]:
        out = tmp_path / flags[0].strip("-")
        result = runner.invoke(app, ["compress", str(cli_folder), "--out", str(out), "--windows", "4",
                                     "--seq-len", "32", "--facts", "0", *flags])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "config.json").read_text())["compression_config"]["config"]
        assert (config["calibration_stream"], config["error_blend"]) == expected


def test_help_lists_eval():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "eval" in result.output
