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
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(cli_folder, monkeypatch, args, message):
    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: False)
    args = [str(cli_folder) if a == "TINY" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]


def test_help_lists_eval():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "eval" in result.output
