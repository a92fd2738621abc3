"""Results files name the command and code version that wrote them; only scripts write them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from svdcompress.provenance import provenance, stamp_results, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
RESULT_FILES = sorted(RESULTS.rglob("*.json"))


def _problem(path: Path) -> str | None:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return f"{path}: a bare {type(data).__name__}, no room for a provenance entry"
    block = data.get("provenance")
    if not isinstance(block, dict):
        return f"{path}: no provenance entry"
    if not (isinstance(block.get("command"), str) and block["command"].strip()):
        return f"{path}: provenance names no command"
    version = block.get("code_version")
    if not (isinstance(version, dict) and (version.get("commit") or version.get("package"))):
        return f"{path}: provenance names no code version"
    return None


def test_there_are_results_files_to_check():
    assert len(RESULT_FILES) >= 10


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_file_names_its_command_and_code_version(path):
    problem = _problem(path)
    assert problem is None, (
        f"{problem}. Write results with svdcompress.provenance.write_results; for a file that "
        "predates it, run experiments/backfill_provenance.py"
    )


def test_write_results_passes_the_check_and_replaces_an_old_provenance(tmp_path):
    path = write_results(tmp_path / "sub" / "r.json", {"x": 1, "provenance": {"stale": True}},
                         argv=["experiments/demo.py", "--out", "a b"])
    assert _problem(path) is None
    data = json.loads(path.read_text())
    assert data["x"] == 1 and data["provenance"]["command"] == "experiments/demo.py --out 'a b'"
    assert "stale" not in data["provenance"] and not list(tmp_path.rglob("*.tmp*"))
    stamp_results(path, argv=["again.py"])
    assert json.loads(path.read_text())["provenance"]["command"] == "again.py"


def test_provenance_records_the_commit_of_this_checkout():
    version = provenance(["x"])["code_version"]
    assert re.fullmatch(r"[0-9a-f]{40}", version["commit"] or "") and isinstance(version["dirty"], bool)


_RAW_WRITE = re.compile(r"json\.dump\(|atomic_write_json\(|write_text\(\s*json\.dumps")


@pytest.mark.parametrize("script", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_experiment_scripts_that_write_json_write_results_through_write_results(script):
    """A script may keep caches of its own as plain JSON, but its results go through
    write_results (the per-file check above catches a results file written any other way)."""
    if script.name == "backfill_provenance.py":  # adds a backfilled block; must not claim to be the writer
        return
    text = script.read_text()
    if _RAW_WRITE.search(text):
        assert "write_results" in text or "stamp_results" in text, (
            f"{script.name} writes JSON but never through svdcompress.provenance.write_results")


def test_issue6_ratios_are_named_by_what_they_measure():
    data = json.loads((RESULTS / "issue6" / "results.json").read_text())
    runs = [*data["runs"].values(), *data["superseded"].values()]
    assert not any("target_param_ratio" in run for run in runs)  # one name, two meanings: gone
    allocated = data["runs"]["allocated p80"]
    assert allocated["param_ratio_factored_modules"] == 0.5212  # what the script first wrote
    assert allocated["param_ratio_all_linears"] == 0.8  # what the hand edit put in
    assert {c["field"] for c in data["corrections"]} == {"ratios", "superseded"}
    assert all(len(c["reason"]) > 80 for c in data["corrections"])
    assert data["provenance"]["command"].endswith("record_corrections.py")


def test_allocation_ratios_are_named_by_what_they_measure():
    data = json.loads((RESULTS / "allocation" / "results.json").read_text())
    for name, run in data["runs"].items():
        assert "target_param_ratio" not in run, name
        assert run["param_ratio_factored_modules"] <= run["param_ratio_all_linears"] + 1e-4, name
    assert data["runs"]["allocated@0.8"]["param_ratio_factored_modules"] == 0.5212  # as in issue6
