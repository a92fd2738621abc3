"""The README's Python examples run as written.

Every ```python block of README.md is executed in order, in a fresh folder. The fast test runs them
against a tiny stand-in world: "smollm2-135m" resolves to a tiny random Llama with a character
tokenizer, the text sources and facts are synthetic — so the calls, names and signatures are
checked in seconds. Blocks marked ``<!-- readme-example: real model only (...) -->`` need what a
random tiny model cannot give (facts it recalls, task data) and run only in the ``slow`` test,
which executes every block on the real SmolLM2-135M and real data.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, make_char_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from svdcompress import datasets, evaluate, zoo
from svdcompress.datasets import Fact

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-example: ([^>]*?) -->\n)?```python\n(.*?)```", re.S)


def readme_examples() -> list[tuple[str, str | None]]:
    """(code, marker or None) of every python block, in README order."""
    return [(code, marker or None) for marker, code in _BLOCK.findall(README.read_text())]


def _run(blocks: list[str]) -> None:
    for index, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.fixture
def tiny_world(tmp_path, monkeypatch, isolated_cache):
    """'smollm2-135m' is a tiny Llama (1024 positions: the examples' 512-token windows fit)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    stand_in = tmp_path / "stand-in"
    AutoModelForCausalLM.from_config(config).save_pretrained(stand_in)
    make_char_tokenizer().save_pretrained(stand_in)
    resolve = zoo.resolve_model_spec
    monkeypatch.setattr(zoo, "resolve_model_spec",
                        lambda spec: str(stand_in) if spec == "smollm2-135m" else resolve(spec))
    words = "the river runs past the old mill and on to the sea while the town sleeps "
    corpus = [{"title": f"doc {i}", "text": f"{i} {words * 40}"} for i in range(48)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    facts = [Fact("The capital of France is", "Paris"), Fact("Water is made of", "hydrogen")]

    def load_facts(n=300, seed=0, *, split="eval"):
        return [facts[i % 2] for i in range(n)]

    monkeypatch.setattr(datasets, "load_facts", load_facts)
    monkeypatch.setattr(evaluate, "load_facts", load_facts)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_readme_has_examples_of_each_kind():
    examples = readme_examples()
    assert len(examples) >= 5
    assert sum(marker is None for _, marker in examples) >= 3
    assert any("api.compress(" in code for code, _ in examples)


def test_readme_examples_run_on_a_tiny_stand_in(tiny_world):
    _run([code for code, marker in readme_examples() if marker is None])
    # What the examples wrote is really there: the api example's checkpoint and the library one's.
    for folder in ("runs/api-p08", "runs/p08"):
        assert (tiny_world / folder / "config.json").is_file()


@pytest.mark.slow
def test_readme_examples_run_on_the_real_model(tmp_path, monkeypatch, real_bigbench):
    """Every example as written, facts and task examples included: skipped, saying why, where the
    BIG-bench files cannot be fetched (the quick start's ``load_facts``)."""
    monkeypatch.chdir(tmp_path)
    _run([code for code, _ in readme_examples()])
