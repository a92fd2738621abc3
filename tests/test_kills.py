"""Kills (issue 15): SIGKILL ``compress`` (and the ``save`` inside it) and ``recover`` at random
points; afterwards the output folder is either absent, the complete old one or the complete new
one — never a partial folder — the next run clears what the killed one left, and a resumed run
ends bitwise where an uninterrupted one does.

Each run is a real process (``tests/kill_driver.py``) that kills itself at a point drawn, with a
fixed seed, from the places where a write can be cut short. Tiny model, fake corpus in an
isolated cache; about ten processes in all.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_tiny_model

from svdcompress import SVDConfig, compress_, save
from svdcompress.checkpoint import load

DRIVER = Path(__file__).with_name("kill_driver.py")
CORPUS = [{"title": f"t{i}", "text": "plain words for a tiny model " * 20} for i in range(12)]
RNG = random.Random(15)  # the kill points are random, and the same on every run of the suite


@pytest.fixture
def env(tmp_path):
    """An isolated cache holding a fake 'wiki' corpus, one torch thread, for the child processes."""
    cache = tmp_path / "cache"
    (cache / "datasets").mkdir(parents=True)
    (cache / "datasets" / "wiki-v3.json").write_text(json.dumps({"meta": {}, "documents": CORPUS}))
    return {**os.environ, "SVDCOMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(DRIVER.parent.parent)}


def run(env, point: str, *args: str) -> int:
    done = subprocess.run([sys.executable, str(DRIVER), point, "--threads", "1", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    if point == "none":
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-3000:])
    return done.returncode


def tensors(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_whole_or_absent(out: Path, *complete: dict[str, bytes]) -> None:
    """``out`` is absent, or loads and holds exactly one of the complete outputs."""
    if out.exists():
        load(out)  # strict: a partial folder would not load
        assert tensors(out) in complete, f"{out} holds a folder that is neither old nor new"


def test_killed_compress_leaves_old_or_new_and_the_next_run_cleans_up(tmp_path, env):
    base = tmp_path / "base"
    make_tiny_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    compress = ["compress", str(base), "--method", "whiten", "--param-ratio", "0.5",
                "--windows", "4", "--seq-len", "16"]
    reference = tmp_path / "reference"
    run(env, "none", *compress, "--out", str(reference))
    new = tensors(reference)

    out = tmp_path / "out"
    n_modules = len(json.loads((reference / "config.json").read_text())["compression_config"]["modules"])
    # A fresh --out, killed while compressing, while writing weights, and at the final rename.
    for point in (f"module:{RNG.randint(1, n_modules)}", "weights:1", "rename:1"):
        run(env, point, *compress, "--out", str(out))
        assert_whole_or_absent(out, new)
        assert not out.exists()
        # The killed write's temporary folder, at most: each write clears dead writers' first.
        assert len(leftovers(out)) <= 1
    run(env, "none", *compress, "--out", str(out))
    assert tensors(out) == new and leftovers(out) == []  # same result; stale temporaries cleared

    # --overwrite of an existing, different output, killed between moving the old one aside and
    # moving the new one in (the one moment when no NAME exists), or at a random earlier point.
    old_model = make_tiny_model("llama", seed=3)
    compress_(old_model, SVDConfig(param_ratio=0.5))
    for point in ("rename:2", RNG.choice(["rename:1", "weights:1", f"module:{RNG.randint(1, n_modules)}"])):
        save(old_model, out, tokenizer=make_char_tokenizer(), overwrite=True)
        old = tensors(out)
        run(env, point, *compress, "--out", str(out), "--overwrite")
        assert_whole_or_absent(out, old, new)
        run(env, "none", *compress, "--out", str(out), "--overwrite")
        assert tensors(out) == new and leftovers(out) == []


def test_killed_recover_resumes_to_the_uninterrupted_result(tmp_path, env):
    base = tmp_path / "base"
    make_tiny_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    student = make_tiny_model("llama")
    compress_(student, SVDConfig(param_ratio=0.5))
    student.config.compression_config["base_model"] = str(base)
    checkpoint = save(student, tmp_path / "ckpt", tokenizer=make_char_tokenizer())
    recover = ["recover", str(checkpoint), "--steps", "6", "--lr", "1e-2", "--batch-size", "2",
               "--seq-len", "16", "--checkpoint-every", "2", "--device", "cpu"]
    reference = tmp_path / "reference"
    run(env, "none", *recover, "--out", str(reference))

    out = tmp_path / "out"
    state = out.with_name("out.recovery-state")
    # Killed at a random step after the first saved state (step 2), then while the next state
    # (step 4) is written.
    run(env, f"step:{RNG.choice([2, 3])}", *recover, "--out", str(out))
    assert not out.exists() and json.loads((state / "state.json").read_text())["step"] == 2
    run(env, "state:1", *recover, "--out", str(out), "--resume")
    assert not out.exists() and json.loads((state / "state.json").read_text())["step"] == 2
    assert leftovers(state)  # the state write that was cut short
    run(env, "none", *recover, "--out", str(out), "--resume")
    assert tensors(out) == tensors(reference)  # bitwise the uninterrupted result
    assert not state.exists() and leftovers(state) == [] and leftovers(out) == []


def test_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path, env):
    base = tmp_path / "base"
    make_tiny_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"item {i} is", "completion": " red"}) + "\n"
                            for i in range(16)))
    finetune = ["finetune", str(base), "--data", str(data), "--epochs", "2", "--lr", "1e-2",
                "--freeze", "0.5", "--checkpoint-every", "2", "--device", "cpu"]
    reference = tmp_path / "reference"
    run(env, "none", *finetune, "--out", str(reference))

    out = tmp_path / "out"
    state = out.with_name("out.finetune-state")
    # 8 steps: killed at a random step after the first saved state (step 2), then while the
    # state of a later step is being written, then resumed to the end.
    run(env, f"ftstep:{RNG.choice([4, 5])}", *finetune, "--out", str(out))
    assert not out.exists() and (state / "checkpoint-2" / "trainer_state.json").is_file()
    run(env, "ftstate:1", *finetune, "--out", str(out), "--resume")
    assert not out.exists()
    run(env, "none", *finetune, "--out", str(out), "--resume")
    assert tensors(out) == tensors(reference)  # bitwise the uninterrupted result
    assert not state.exists() and leftovers(out) == []
