"""Benchmark tasks through lm-evaluation-harness: data builders, cache repair, scoring, CLI errors.

Builders run on small hand-made copies of the BIG-bench files (same structure as the real ones) in
an isolated cache; MMLU reads the real file shipped in the lm-eval wheel. Models are the tiny random
ones; one ``real`` test scores SmolLM2 on a few items.
"""

from __future__ import annotations

import builtins
import io
import json
import tarfile

import pytest
from conftest import make_char_tokenizer, make_tiny_model
from typer.testing import CliRunner

from svdcompress import datasets
from svdcompress.cli import app
from svdcompress.errors import DatasetError, TaskError
from svdcompress.tasks import (
    compare_task_results,
    data,
    evaluate_tasks,
    known_tasks,
    parse_task_list,
)

ALL_TASKS = ["arc_style", "general_knowledge", "hellaswag_style", "misconceptions", "mmlu",
             "mmlu_cloze", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande_style"]

FAKE_BIGBENCH = {
    "truthful_qa/task_mc.json": {"examples": [
        {"input": f"Question {i}?", "target_scores": {"Right.": 1, "Wrong.": 0, "Also wrong.": 0}}
        for i in range(4)]},
    "truthful_qa/questions.json": {"prefix": "", "examples": [
        {"Question": f"Question {i}?", "Category": "Misc", "True answers": ["Yes.", "Indeed."],
         "False answers": ["No.", "Never.", "Maybe."], "Best answer": "Yes."} for i in range(4)]},
    "natural_instructions/subtask047_misc_answering_science_questions/task.json": {"examples": [
        {"input": "Question: What does species A do?  (A) live with species (A) (B) leave "
                  "(C) fight (D) sleep?", "target": ["B."]},
        {"input": "Question: Water boils at  (A) 10 C (B) 50 C (C) 100 C (D) 1000 ?",
         "target": ["C."]}]},
    "natural_instructions/subtask033_winogrande_answer_generation/task.json": {"examples": [
        {"input": "Context Word: box. \nQuestion: The ball did not fit in the box because the _ "
                  "was too big.", "target": ["ball."]},
        {"input": "Context Word: lone. \nQuestion: A lone sentence has a _ only.",
         "target": ["blank."]},
        {"input": "Context Word: box. \nQuestion: The ball did not fit in the box because the _ "
                  "was too small.", "target": ["box."]}]},
    "goal_step_wikihow/step_inference/task.json": {"examples": [
        {"input": f"The most reasonable step of 'Goal {i}' is ",
         "target_scores": {"Do a": 0, "Do b": 1, "Do c": 0, "Do d": 0}} for i in range(3)]},
    "general_knowledge/task.json": {"examples": [
        {"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1}},
        {"input": "Name a color.", "target_scores": {"red": 1, "blue": 1, "dog": 0}}]},
    "misconceptions/task.json": {"examples": [
        {"input": "Bulls are enraged by red.", "target_scores": {"T": 0, "F": 1}},
        {"input": "Bulls are colour-blind to red.", "target_scores": {"T": 1, "F": 0}}]},
}


@pytest.fixture
def fake_sources(tmp_path, isolated_cache, monkeypatch):
    """Small BIG-bench files in place of the real ones; an empty cache for the built JSONL."""
    root = tmp_path / "bigbench"
    for relative, content in FAKE_BIGBENCH.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(json.dumps(content))
    monkeypatch.setattr(data, "bigbench_file", lambda relative: root / relative)
    return root


def test_known_tasks_and_parsing():
    assert known_tasks() == ALL_TASKS
    assert parse_task_list("mmlu, arc_style,mmlu") == ["mmlu", "arc_style"]
    assert parse_task_list("all") == ALL_TASKS
    with pytest.raises(TaskError, match=r"unknown task 'arc'; known tasks: arc_style, "):
        parse_task_list("arc,mmlu")
    with pytest.raises(TaskError, match="no task given"):
        parse_task_list(" , ")


def test_builders_parse_the_source_formats(fake_sources):
    arc = sorted(data.load_rows("arc_style"), key=lambda r: r["id"])
    assert arc[0]["choices"] == ["live with species (A)", "leave", "fight", "sleep"]
    assert arc[0]["label"] == 1 and arc[1]["choices"][-1] == "1000" and arc[1]["label"] == 2
    wino = sorted(data.load_rows("winogrande_style"), key=lambda r: r["id"])
    assert [r["id"] for r in wino] == [0, 2]  # the sentence without a twin is dropped
    assert wino[0]["options"] == ["ball", "box"] and wino[1]["label"] == 1
    assert wino[0]["contexts"][1] == "The ball did not fit in the box because the box"
    assert wino[0]["continuation"] == "was too big."
    mc2 = data.load_rows("truthfulqa_mc2")[0]
    assert mc2["n_true"] == 2 and mc2["choices"][:2] == ["Yes.", "Indeed."]
    knowledge = {r["id"]: r for r in data.load_rows("general_knowledge")}
    assert knowledge[1]["labels"] == [0, 1]
    assert {r["label"] for r in data.load_rows("misconceptions")} == {0, 1}
    assert data.load_rows("hellaswag_style")[0]["goal"].startswith("Goal ")


def test_mmlu_has_the_282_questions_of_the_lm_eval_wheel(isolated_cache):
    rows = data.load_rows("mmlu")
    assert len(rows) == 282 and len({r["subject"] for r in rows}) == 57
    assert all(len(r["choices"]) in (4, 5) and 0 <= r["label"] < len(r["choices"]) for r in rows)


def test_corrupt_or_missing_task_data_is_rebuilt(fake_sources, caplog):
    rows = data.load_rows("misconceptions")
    path = data.task_data_path("misconceptions")
    path.write_text(path.read_text()[:-5])  # truncated
    assert data.load_rows("misconceptions") == rows
    assert "corrupt" in caplog.text
    path.with_suffix(".meta.json").unlink()
    assert data.load_rows("misconceptions") == rows


def test_unreadable_source_is_a_clear_error(fake_sources):
    (fake_sources / "misconceptions/task.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"unreadable .* delete it so it is extracted again"):
        data.load_rows("misconceptions")


def _fake_archive(path, names):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            payload = json.dumps({"examples": []}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_bigbench_folder_missing_new_files_is_extracted_again(tmp_path, isolated_cache, monkeypatch):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    _fake_archive(archive, datasets.BIGBENCH_FILES)
    monkeypatch.setattr(datasets, "fetch_pypi", lambda *a, **k: archive)
    old = isolated_cache / "datasets" / "bigbench-1.0.0" / "qa_wikidata" / "task.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"examples": []}')  # a folder from a version that kept fewer files
    assert datasets.bigbench_file("misconceptions/task.json").is_file()
    assert all(datasets.bigbench_file(name).is_file() for name in datasets.BIGBENCH_FILES)


def test_evaluate_tasks_scores_items_and_compares(fake_sources):
    model, tokenizer = make_tiny_model("llama"), make_char_tokenizer()
    tasks = ["truthfulqa_mc2", "winogrande_style", "general_knowledge", "arc_style"]
    result = evaluate_tasks(model, tokenizer, tasks, limit=2, batch_size=4)
    assert list(result["tasks"]) == tasks
    mc2 = result["tasks"]["truthfulqa_mc2"]
    assert mc2["metric"] == "mc2" and mc2["n"] == 2 and mc2["chance"] == pytest.approx(0.4)
    assert all(0.0 <= item["mc2"] <= 1.0 for item in mc2["items"])
    wino = result["tasks"]["winogrande_style"]
    assert wino["chance"] == 0.5 and {i["id"] for i in wino["items"]} == {0, 2}
    arc = result["tasks"]["arc_style"]
    assert arc["metric"] == "acc_norm" and set(arc["metrics"]) == {"acc", "acc_norm"}
    same = compare_task_results(result, result)
    assert same["winogrande_style"]["test"] == "mcnemar-exact"
    assert same["truthfulqa_mc2"]["test"] == "paired-t"
    assert all(c["difference"] == 0 and c["p_value"] == 1.0 for c in same.values())


def test_limit_must_be_positive():
    with pytest.raises(TaskError, match="at least 1"):
        evaluate_tasks(None, None, "mmlu", limit=0)


# --------------------------------------------------------------------------------------------------
# Command line

runner = CliRunner()


@pytest.fixture
def tiny_folder_for_tasks(tmp_path, fake_sources, monkeypatch):
    from svdcompress import evaluate
    from svdcompress.datasets import Fact

    folder = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    corpus = [{"title": f"t{i}", "text": "plain words for a tiny model " * 20} for i in range(12)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    monkeypatch.setattr(evaluate, "load_facts", lambda n: [Fact("The capital is", "Paris")] * n)
    return folder


def test_cli_tasks_with_reference_show_paired_statistics(tiny_folder_for_tasks, tmp_path):
    out = tmp_path / "r.json"
    folder = str(tiny_folder_for_tasks)
    result = runner.invoke(app, [
        "eval", folder, "--reference", folder, "--seq-len", "32", "--windows", "2", "--facts",
        "2", "--second-domain", "none", "--tasks", "misconceptions,truthfulqa_mc1", "--limit", "2",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "misconceptions (acc)" in result.output and "mcnemar-exact" in result.output
    saved = json.loads(out.read_text())
    assert saved["tasks"]["tasks"]["misconceptions"]["n"] == 2
    assert saved["paired"]["misconceptions"]["difference"] == 0
    assert saved["paired"]["facts"]["test"] == "mcnemar-exact"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "arc,mmlu"], "unknown task 'arc'; known tasks: arc_style"),
        (["--tasks", "mmlu", "--limit", "0"], "--limit must be at least 1"),
        (["--limit", "5"], "--limit applies to --tasks"),
    ],
)
def test_cli_bad_task_input_is_one_line_exit_2(extra, message):
    result = runner.invoke(app, ["eval", "no-model-needed", *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cli_without_lm_eval_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    result = runner.invoke(app, ["eval", "no-model-needed", "--tasks", "mmlu"])
    assert result.exit_code == 2
    assert "pip install 'svdcompress[tasks]'" in result.output


@pytest.mark.real
def test_real_smollm2_tasks_above_chance_on_a_few_items(smollm2, real_bigbench):
    model, tokenizer = smollm2
    result = evaluate_tasks(model, tokenizer, ["general_knowledge", "arc_style"], limit=30)
    for task in result["tasks"].values():
        assert task["n"] == 30
        assert task["score"] > task["chance"], task
