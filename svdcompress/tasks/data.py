"""Builders of the local JSONL files behind our lm-evaluation-harness tasks.

Each task's items are built once from real sources into ``cache_dir()/datasets/tasks-v<N>/``:
BIG-bench task files (:func:`svdcompress.datasets.bigbench_file`, from the ``bigbench==1.0.0``
source package) and MMLU's 282 chain-of-thought exemplar questions shipped in the ``lm-eval``
wheel (``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``). Next to each ``<task>.jsonl``
a ``<task>.meta.json`` records its source, row count and sha256; a file that is missing, changed
or unreadable is rebuilt (and a source that cannot be parsed is a :class:`DatasetError`).

Rows keep the source's fields, lightly normalised; the prompt format lives in the task YAMLs next to
this file. Items are shuffled once with ``random.Random(0)`` so that ``--limit N`` (lm-eval takes
the first N) is a random, fixed subset rather than the first topic of the source; each row keeps
``id``, its position in the source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Callable
from difflib import SequenceMatcher
from itertools import pairwise
from pathlib import Path
from typing import Any

from svdcompress.datasets import bigbench_file
from svdcompress.errors import DatasetError
from svdcompress.fetch import atomic_write_json, atomic_write_text, cache_subdir

__all__ = ["BUILDERS", "load_rows", "task_data_path"]

logger = logging.getLogger(__name__)

_VERSION = 1  # bump when a builder changes, so stale files are not reused
_SHUFFLE_SEED = 0
Row = dict[str, Any]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"task source {path} is unreadable ({err}); delete it so it is extracted again"
        ) from err


def _bigbench_examples(relative: str) -> list[dict[str, Any]]:
    return _read_json(bigbench_file(relative))["examples"]


def _scored_choices(example: dict[str, Any]) -> tuple[list[str], list[int]]:
    """(choices, indices of the correct ones) from a BIG-bench ``target_scores`` map."""
    choices = [c.strip() for c in example["target_scores"]]
    correct = [i for i, score in enumerate(example["target_scores"].values()) if score == 1]
    return choices, correct


# --------------------------------------------------------------------------------------------------
# Builders: source files -> rows


def _truthfulqa_mc1() -> list[Row]:
    rows = []
    for i, example in enumerate(_bigbench_examples("truthful_qa/task_mc.json")):
        choices, correct = _scored_choices(example)
        rows.append({"id": i, "question": example["input"].strip(), "choices": choices,
                     "label": correct[0]})
    return rows


def _truthfulqa_mc2() -> list[Row]:
    questions = _read_json(bigbench_file("truthful_qa/questions.json"))["examples"]
    return [
        {"id": i, "question": q["Question"].strip(), "category": q["Category"],
         "choices": [a.strip() for a in q["True answers"] + q["False answers"]],
         "n_true": len(q["True answers"]), "label": 0}
        for i, q in enumerate(questions)
    ]


def _split_options(text: str, letters: str = "ABCDE") -> tuple[str, list[str]]:
    """("stem", [option texts]) from "stem (A) x (B) y ...", taking options A, B, ... in order."""
    start = text.find("(A) ")
    if start < 0:
        raise ValueError(f"no options in {text[:80]!r}")
    cuts = [start]
    for letter in letters[1:]:
        at = text.find(f"({letter}) ", cuts[-1] + 4)
        if at < 0:
            break
        cuts.append(at)
    cuts.append(len(text))
    options = [text[a + 4 : b].strip() for a, b in pairwise(cuts)]
    if len(options) < 2 or not all(options):
        raise ValueError(f"fewer than two options in {text[:80]!r}")
    return text[:start].strip(), options


def _arc_style() -> list[Row]:
    relative = "natural_instructions/subtask047_misc_answering_science_questions/task.json"
    rows = []
    for i, example in enumerate(_bigbench_examples(relative)):
        stem, options = _split_options(example["input"].removeprefix("Question:").strip())
        # The source replaced the last character of every input with "?": drop it.
        options[-1] = options[-1].removesuffix("?").strip()
        label = "ABCDE".index(example["target"][0].strip().rstrip(".").strip())
        rows.append({"id": i, "question": stem, "choices": options, "label": label})
    return rows


def _winogrande_item(example: dict[str, Any]) -> tuple[str, str, str]:
    context, sentence = example["input"].split("\nQuestion:", 1)
    word = context.removeprefix("Context Word:").strip().rstrip(".").lower()
    return word, " ".join(sentence.split()), example["target"][0].strip().rstrip(".").strip()


def _are_twins(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """Twin Winogrande sentences: same context word, different answers each found in both."""
    (_, sa, ta), (_, sb, tb) = a, b
    if ta.lower() == tb.lower() or sa.count("_") != 1 or sb.count("_") != 1:
        return False
    if not all(t.lower() in s.lower() for t in (ta, tb) for s in (sa, sb)):
        return False
    return SequenceMatcher(None, sa, sb).ratio() >= 0.8


def _winogrande_row(i: int, sentence: str, options: list[str], label: int) -> Row:
    """Partial scoring as lm-eval's winogrande: each option fills the blank; the rest is scored."""
    blank = sentence.index("_")
    return {"id": i, "sentence": sentence, "options": options, "label": label,
            "contexts": [sentence[:blank] + option for option in options],
            "continuation": sentence[blank + 1 :].strip()}


def _winogrande_style() -> list[Row]:
    """Twin pairs of subtask033; the twin's answer is each sentence's second option."""
    relative = "natural_instructions/subtask033_winogrande_answer_generation/task.json"
    items = [_winogrande_item(e) for e in _bigbench_examples(relative)]
    by_word: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_word[item[0]].append(i)
    rows, used = [], set()
    for indices in by_word.values():
        for a in indices:
            twin = next((b for b in indices if b > a and b not in used and a not in used
                         and _are_twins(items[a], items[b])), None)
            if twin is None:
                continue
            used |= {a, twin}
            options = [items[a][2], items[twin][2]]
            rows.append(_winogrande_row(a, items[a][1], options, 0))
            rows.append(_winogrande_row(twin, items[twin][1], options, 1))
    return sorted(rows, key=lambda r: r["id"])


def _hellaswag_style() -> list[Row]:
    rows = []
    for i, example in enumerate(_bigbench_examples("goal_step_wikihow/step_inference/task.json")):
        choices, correct = _scored_choices(example)
        goal = re.search(r"'(.*)'", example["input"])
        if goal is None:
            raise ValueError(f"no quoted goal in {example['input'][:80]!r}")
        rows.append({"id": i, "goal": goal.group(1), "choices": choices, "label": correct[0]})
    return rows


def _mmlu_prompts_file() -> Path:
    try:
        import lm_eval
    except ImportError as err:
        raise DatasetError(
            "the mmlu task reads its questions from the lm-eval package; "
            "install it with: pip install 'svdcompress[tasks]'"
        ) from err
    return Path(lm_eval.__file__).parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"


def _mmlu() -> list[Row]:
    rows = []
    for subject, text in sorted(_read_json(_mmlu_prompts_file()).items()):
        for block in text.split("\n\nQ: ")[1:]:
            question, _, answer = block.partition("\nA: ")
            letter = re.search(r"answer is \(([A-E])\)", answer)
            if letter is None:
                raise ValueError(f"no answer in mmlu {subject} item {question[:60]!r}")
            stem, options = _split_options(question)
            rows.append({"id": len(rows), "subject": subject.replace("_", " "),
                         "question": stem, "choices": options,
                         "label": "ABCDE".index(letter.group(1))})
    return rows


def _general_knowledge() -> list[Row]:
    rows = []
    for i, example in enumerate(_bigbench_examples("general_knowledge/task.json")):
        choices, correct = _scored_choices(example)
        rows.append({"id": i, "question": example["input"].strip(), "choices": choices,
                     "labels": correct})  # one item accepts two answers: always a list
    return rows


def _misconceptions() -> list[Row]:
    rows = []
    for i, example in enumerate(_bigbench_examples("misconceptions/task.json")):
        true = example["target_scores"]["T"] == 1
        rows.append({"id": i, "statement": example["input"].strip(), "label": 0 if true else 1})
    return rows


# task -> (builder, source description)
BUILDERS: dict[str, tuple[Callable[[], list[Row]], str]] = {
    "truthfulqa_mc1": (_truthfulqa_mc1, "bigbench==1.0.0 truthful_qa/task_mc.json"),
    "truthfulqa_mc2": (_truthfulqa_mc2, "bigbench==1.0.0 truthful_qa/questions.json"),
    "arc_style": (_arc_style, "bigbench==1.0.0 natural_instructions/subtask047"),
    "winogrande_style": (_winogrande_style, "bigbench==1.0.0 natural_instructions/subtask033"),
    "hellaswag_style": (_hellaswag_style, "bigbench==1.0.0 goal_step_wikihow/step_inference"),
    "mmlu": (_mmlu, "lm-eval==0.4.13 tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"),
    "general_knowledge": (_general_knowledge, "bigbench==1.0.0 general_knowledge"),
    "misconceptions": (_misconceptions, "bigbench==1.0.0 misconceptions"),
}


# --------------------------------------------------------------------------------------------------
# The cached JSONL files


def task_data_path(task: str) -> Path:
    """Where the JSONL file of ``task`` lives (it may not be built yet)."""
    return cache_subdir("datasets", f"tasks-v{_VERSION}") / f"{task}.jsonl"


def _build(task: str, path: Path) -> None:
    builder, source = BUILDERS[task]
    logger.info("building task data %s from %s (once)", task, source)
    try:
        rows = builder()
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as err:
        raise DatasetError(f"could not build task {task!r} from {source}: {err!r}") from err
    random.Random(_SHUFFLE_SEED).shuffle(rows)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)
    meta = {"task": task, "source": source, "rows": len(rows), "builder_version": _VERSION,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    atomic_write_json(path.with_suffix(".meta.json"), meta)


def _read_checked(path: Path) -> list[Row] | None:
    """The rows of a built file, or None when it is missing or does not match its meta."""
    meta_path = path.with_suffix(".meta.json")
    try:
        raw = path.read_bytes()
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise ValueError("sha256 differs from its meta file")
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
        if len(rows) != meta["rows"]:
            raise ValueError("row count differs from its meta file")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("task data %s is corrupt (%s); rebuilding it", path, err)
        return None
    return rows


def load_rows(task: str) -> list[Row]:
    """The items of one task (built into the cache on first use, rebuilt if corrupt)."""
    if task not in BUILDERS:
        raise DatasetError(f"unknown task {task!r}; known tasks: {', '.join(BUILDERS)}")
    path = task_data_path(task)
    rows = _read_checked(path)
    if rows is None:
        _build(task, path)
        rows = _read_checked(path)
        if rows is None:
            raise DatasetError(f"task data {path} could not be written; check the cache folder")
    return rows
