"""The bad-input table (issue 15): every row is one thing a user can get wrong.

Each CLI row must end with exactly one ``error:`` line that contains the expected words (the
problem, and where the row says it, the fix), exit status 2, no traceback, and leave the working
folder exactly as it was. Each API row must raise a :class:`SvdCompressError` whose message is one
line. Everything runs on tiny random models, so the whole table takes seconds.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from svdcompress import SVDConfig, WhitenConfig, compress_, save
from svdcompress.errors import SvdCompressError

CORPUS = [{"title": f"t{i}", "text": "plain words for a tiny model " * 20} for i in range(12)]


# --------------------------------------------------------------------------------------------------
# Inputs: built once, copied into each test's folder


def _plain(folder: Path, seed: int = 0) -> None:
    make_tiny_model("llama", seed).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)


def _compressed(folder: Path, base: Path, quant_bits=None) -> None:
    model = make_tiny_model("llama")
    compress_(model, SVDConfig(param_ratio=0.5, quant_bits=quant_bits))
    model.config.compression_config["base_model"] = str(base)
    save(model, folder, tokenizer=make_char_tokenizer())


def _weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def _edit_tensors(folder: Path, edit) -> None:
    path = _weights(folder)
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


LEFT = "model.layers.0.self_attn.q_proj.left"


def _damage(kind: str, folder: Path) -> None:
    """Turn a good compressed checkpoint into a bad one."""
    if kind == "truncated":
        path = _weights(folder)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        _weights(folder).write_bytes(b"\x00not a safetensors file")
    elif kind == "no-weights":
        _weights(folder).unlink()
    elif kind == "shape":
        _edit_config(folder, lambda c: c["compression_config"]["modules"][
            "model.layers.0.self_attn.q_proj"].update(rank=5))
    elif kind == "missing":
        _edit_tensors(folder, lambda t: t.pop(LEFT))
    elif kind == "extra":
        _edit_tensors(folder, lambda t: t.update({"model.layers.0.smuggled": torch.zeros(3)}))
    elif kind == "dtype":  # int8 codes stored as float
        key = "model.layers.0.self_attn.q_proj.left_q"
        _edit_tensors(folder, lambda t: t.update({key: t[key].float()}))
    elif kind == "bits":
        _edit_config(folder, lambda c: c["compression_config"]["modules"][
            "model.layers.0.self_attn.q_proj"].update(quant_bits=4))
    elif kind == "config-json":
        (folder / "config.json").write_text("{ not json")
    elif kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "nan":  # a plain model with a NaN weight
        _edit_tensors(folder, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    elif kind == "state":  # an interrupted recovery run's state, written with other settings
        state = folder.with_name(f"{folder.name}-recovered.recovery-state")
        state.mkdir()
        fingerprint = {"student": "0", "teacher": "0", "windows": "0", "settings": {"lr": 0.5}}
        (state / "state.json").write_text(json.dumps({"fingerprint": fingerprint, "step": 1}))
    elif kind == "no-base":
        _edit_config(folder, lambda c: c["compression_config"].pop("base_model"))
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    _plain(root / "tiny")
    _plain(root / "other", seed=5)
    _compressed(root / "ckpt", root / "tiny")
    _compressed(root / "int8", root / "tiny", quant_bits=8)
    (root / "empty").mkdir()
    (root / "recipe-list.json").write_text("[1, 2]")
    (root / "recipe-unknown.json").write_text(json.dumps({"method": "svd", "colour": "red"}))
    (root / "recipe-broken.json").write_text('{"method": "svd", ')
    (root / "caps-factored.json").write_text(  # a break-even file as kernel_bench.py writes it (factored)
        '{"rows": [{"shape": [64, 64], "threads": 1, "break_even_float": 16, "break_even_int8": 24}]}')
    (root / "not-a-model.txt").write_text("hello")
    return root


@pytest.fixture
def work(pristine, tmp_path, monkeypatch):
    """A copy of the inputs, the fake corpora, no hub: (folder, runner)."""
    from svdcompress import datasets, zoo

    shutil.copytree(pristine, tmp_path / "w")
    monkeypatch.setattr(datasets, "load_corpus", lambda name: [] if name == "news" else CORPUS)
    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------------------------------
# The CLI table: (id, arguments, words the one error line must contain, damage to apply first)

COMPRESS = ["compress", "tiny", "--out", "new", "--windows", "2", "--seq-len", "16"]
RECOVER = ["recover", "ckpt", "--steps", "2", "--seq-len", "16", "--batch-size", "1", "--device", "cpu"]

CLI_ROWS = [
    # ratios and ranks
    ("param-ratio-zero", [*COMPRESS, "--param-ratio", "0"], "outside (0, 1]", None),
    ("param-ratio-above-one", [*COMPRESS, "--param-ratio", "1.5"], "outside (0, 1]", None),
    ("param-ratio-nan", [*COMPRESS, "--param-ratio", "nan"], "param_ratio", None),
    ("rank-ratio-above-one", [*COMPRESS, "--rank-ratio", "1.2"], "outside (0, 1]", None),
    ("rank-zero", [*COMPRESS, "--rank", "0"], "positive integer", None),
    ("rank-beyond-matrix", [*COMPRESS, "--rank", "500"], "exceeds min(out, in)", None),
    ("rank-saves-nothing", [*COMPRESS, "--rank", "40", "--storage", "factored"], "storage='dense'", None),
    ("two-ratios", [*COMPRESS, "--rank", "4", "--param-ratio", "0.5"], "one of", None),
    # targets and patterns
    ("unknown-method", [*COMPRESS, "--method", "magic"], "unknown method 'magic'", None),
    ("target-matches-nothing", [*COMPRESS, "--targets", "nosuchlayer"], "nosuchlayer", None),
    ("exclude-everything", [*COMPRESS, "--targets", "q_proj", "--exclude", "q_proj"], "q_proj", None),
    ("rank-pattern-no-equals", [*COMPRESS, "--rank-pattern", "layers"], "REGEX=RANK", None),
    ("rank-pattern-not-a-number", [*COMPRESS, "--rank-pattern", "layers=abc"], "neither a rank nor a ratio", None),
    ("rank-pattern-matches-nothing", [*COMPRESS, "--rank-pattern", "nowhere=4"], "matches none", None),
    ("unknown-storage", [*COMPRESS, "--storage", "zip"], "use one of factored, pivoted, dense", None),
    ("quant-bits-4", [*COMPRESS, "--quant-bits", "4"], "8", None),
    ("refine-iters-negative", [*COMPRESS, "--refine-iters", "-1"], "refine_iters", None),
    ("refine-lr-zero", [*COMPRESS, "--refine-lr", "0"], "refine_lr", None),
    # recipes and presets
    ("recipe-missing", [*COMPRESS, "--recipe", "nope.json"], "does not exist", None),
    ("recipe-not-a-mapping", [*COMPRESS, "--recipe", "recipe-list.json"], "mapping of settings", None),
    ("recipe-unknown-field", [*COMPRESS, "--recipe", "recipe-unknown.json"], "colour", None),
    ("recipe-broken-json", [*COMPRESS, "--recipe", "recipe-broken.json"], "not valid JSON", None),
    ("recipe-and-preset", [*COMPRESS, "--recipe", "recipe-list.json", "--preset", "cf90"], "not both", None),
    ("unknown-preset", [*COMPRESS, "--preset", "turbo"], "unknown preset", None),
    ("allocate-options-alone", [*COMPRESS, "--analysis-dir", "a"], "only apply with --allocate", None),
    ("speed-caps-alone", [*COMPRESS, "--speed-caps", "b.json"], "only apply with --allocate", None),
    ("speed-caps-missing", [*COMPRESS, "--allocate", "--param-ratio", "0.6", "--storage", "factored",
                            "--speed-caps", "b.json"], "no file b.json", None),
    ("speed-caps-pivoted", [*COMPRESS, "--allocate", "--param-ratio", "0.6", "--storage", "pivoted",
                            "--speed-caps", "caps-factored.json"], "measured for factored storage", None),
    # data (checked before the model loads)
    ("windows-zero", [*COMPRESS, "--windows", "0"], "at least 1 window", None),
    ("seq-len-zero", [*COMPRESS, "--seq-len", "0"], "positive number of tokens", None),
    ("unknown-data-source", [*COMPRESS, "--data", "poems"], "unknown text dataset 'poems'", None),
    ("too-many-windows", [*COMPRESS, "--windows", "100000"], "ask for at most", None),
    ("empty-corpus", [*COMPRESS, "--data", "news"], "0 tokens", None),
    ("seq-len-beyond-context", ["eval", "tiny", "--seq-len", "4096", "--facts", "0"], "context of 256", None),
    ("eval-windows-zero", ["eval", "tiny", "--windows", "0"], "at least 1 window", None),
    ("eval-unknown-data", ["eval", "tiny", "--data", "poems", "--facts", "0"], "unknown text dataset", None),
    # models and folders
    ("missing-model-path", ["eval", "./missing"], "no such file or folder", None),
    ("unreachable-hub-id", ["eval", "someone/some-model"], "cannot be reached", None),
    ("folder-without-config", ["eval", "empty"], "without a config.json", None),
    ("file-not-a-model", ["eval", "not-a-model.txt"], "not a .gguf model", None),
    ("out-exists", [*COMPRESS[:3], "ckpt", *COMPRESS[4:]], "already exists", None),
    ("nan-weights", [*COMPRESS[:1], "other", *COMPRESS[2:]], "model.layers.1.mlp.up_proj", "nan:other"),
    ("plain-folder-export", ["export-dense", "tiny", "--out", "plain"], "no compression_config", None),
    ("missing-checkpoint-export", ["export-dense", "nothing", "--out", "plain"], "config.json", None),
    # damaged or inconsistent checkpoints
    ("truncated-safetensors", ["export-dense", "ckpt", "--out", "plain"], "corrupt or truncated", "truncated"),
    ("garbage-safetensors", ["export-dense", "ckpt", "--out", "plain"], "corrupt or truncated", "garbage"),
    ("no-safetensors", ["export-dense", "ckpt", "--out", "plain"], "no .safetensors files", "no-weights"),
    ("config-tensor-shape-mismatch", ["export-dense", "ckpt", "--out", "plain"], "do not belong together", "shape"),
    ("missing-tensor", ["export-dense", "ckpt", "--out", "plain"], "lack", "missing"),
    ("extra-tensor", ["export-dense", "ckpt", "--out", "plain"], "unexpected", "extra"),
    ("int8-codes-wrong-dtype", ["export-dense", "int8", "--out", "plain"], "expected torch.int8", "dtype:int8"),
    ("unsupported-quant-bits", ["export-dense", "int8", "--out", "plain"], "quant_bits=4", "bits:int8"),
    ("config-json-corrupt", ["eval", "ckpt"], "config.json", "config-json"),
    # recovery
    ("recover-steps-zero", [*RECOVER, "--steps", "0"], "at least 1 training step", None),
    ("recover-lr-negative", [*RECOVER, "--lr", "-1"], "not a usable learning rate", None),
    ("recover-resume-nothing", [*RECOVER, "--resume"], "no interrupted run", None),
    ("recover-unknown-device", [*RECOVER, "--device", "tpu9"], "unknown device 'tpu9'", None),
    ("recover-plain-folder", ["recover", "tiny", "--steps", "2", "--device", "cpu"], "no compression_config", None),
    ("recover-int8", ["recover", "int8", "--steps", "2", "--seq-len", "16", "--device", "cpu",
                      "--base", "tiny"], "quantize afterwards", None),
    ("recover-other-teacher", [*RECOVER, "--base", "other"], "fingerprint differs", None),
    ("recover-no-base", RECOVER, "pass --base", "no-base"),
    ("recover-state-without-resume", RECOVER, "pass --resume to continue it", "state"),
    ("recover-resume-other-settings", [*RECOVER, "--resume"], "refusing to resume", "state"),
    ("recover-seq-len-zero", [*RECOVER, "--seq-len", "0"], "positive number of tokens", None),
    # other commands
    ("quantize-bits-4", ["quantize", "tiny", "--out", "q", "--bits", "4"], "8", None),
    ("bench-unknown-kernel", ["bench", "ckpt", "--kernel", "warp"], "--kernel 'warp'", None),
    ("bench-bad-batch-sizes", ["bench", "ckpt", "--batch-sizes", "one"], "--batch-sizes", None),
    ("analyze-bad-fractions", ["analyze", "tiny", "--out", "an", "--fractions", "a,b"], "comma-separated", None),
    ("analyze-bad-budget", ["analyze", "tiny", "--out", "an", "--param-ratio", "1.5"], "outside (0, 1]", None),
    ("analyze-seq-len-zero", ["analyze", "tiny", "--out", "an", "--seq-len", "0"], "positive number", None),
]


@pytest.mark.parametrize(("args", "words", "damage"), [r[1:] for r in CLI_ROWS],
                         ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input(work, args, words, damage):
    from svdcompress.cli import app

    if damage is not None:
        kind, _, target = damage.partition(":")
        _damage(kind, work / (target or "ckpt"))
    before = _tree(work)
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and not isinstance(result.exception, (AssertionError, TypeError))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert words in errors[0], errors[0]
    assert _tree(work) == before, "the command left something behind"


# --------------------------------------------------------------------------------------------------
# The Python API table


def _api_rows():
    from svdcompress import load, load_model
    from svdcompress.calibration import Calibration
    from svdcompress.datasets import token_windows
    from svdcompress.quantize import quantize_weights_
    from svdcompress.recover import RecoverySettings, recover_

    tiny = make_tiny_model

    def nan_model():
        model = tiny("llama")
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
        return model

    return [
        ("whiten-without-calibration", lambda w: compress_(tiny("llama"), WhitenConfig(param_ratio=0.5)),
         "needs calibration windows"),
        ("negative-param-ratio", lambda w: SVDConfig(param_ratio=-0.1), "outside (0, 1]"),
        ("rank-ratio-string", lambda w: SVDConfig(rank_ratio="0.5"), "rank_ratio"),
        ("inf-weight", lambda w: compress_(nan_model(), SVDConfig(param_ratio=0.5)), "k_proj"),
        ("calibration-of-wrong-shape", lambda w: compress_(
            tiny("llama"), WhitenConfig(param_ratio=0.5), Calibration(torch.zeros(3, dtype=torch.long), "x")),
         "calibration"),
        ("calibration-beyond-vocab", lambda w: compress_(
            tiny("llama"), WhitenConfig(param_ratio=0.5), torch.full((2, 8), 10_000)), "vocab"),
        ("windows-too-many", lambda w: token_windows(make_char_tokenizer(), "wiki", "calib",
                                                     seq_len=16, n_samples=10**6), "ask for at most"),
        ("load-missing-folder", lambda w: load(w / "nowhere"), "no config.json"),
        ("load-model-empty-spec", lambda w: load_model("  "), "empty model spec"),
        ("recovery-batch-zero", lambda w: RecoverySettings(steps=1, batch_size=0), "batch_size"),
        ("recover-empty-windows", lambda w: recover_(tiny("llama"), tiny("llama"), torch.zeros(0, 8, dtype=torch.long),
                                                     RecoverySettings(steps=1), progress=False), "non-empty"),
        ("quantize-inf-weights", lambda w: quantize_weights_(nan_model()), "NaN/inf values"),
        ("quantize-compressed-as-plain", lambda w: quantize_weights_(_compressed_model()), "quantize_factors_"),
    ]


def _compressed_model():
    model = make_tiny_model("llama")
    compress_(model, SVDConfig(param_ratio=0.5))
    return model


API_ROWS = _api_rows()


@pytest.mark.parametrize("call, words", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_api_bad_input(work, call, words):
    before = _tree(work)
    with pytest.raises(SvdCompressError) as info:
        call(work)
    message = str(info.value)
    assert "\n" not in message and words in message, message
    assert _tree(work) == before


def test_the_table_has_at_least_forty_distinct_rows():
    ids = [r[0] for r in CLI_ROWS] + [r[0] for r in API_ROWS]
    assert len(ids) == len(set(ids)) >= 40


# --------------------------------------------------------------------------------------------------
# Write failures: no permission, a full disk. Simulated (the tests may run as root, where
# permissions do not bite, and no test should fill a real disk).


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission"), (errno.ENOSPC, "no space")])
def test_a_failed_write_is_one_line_and_leaves_nothing(work, monkeypatch, code, words):
    from transformers import PreTrainedModel

    from svdcompress.cli import app

    def fail(self, *args, **kwargs):
        raise OSError(code, "simulated")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    before = _tree(work)
    result = CliRunner().invoke(app, [*COMPRESS, "--method", "svd"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and words in errors[0].lower(), result.output
    assert "--out" in errors[0]
    assert _tree(work) == before


# --------------------------------------------------------------------------------------------------
# Fix 5: what needs no model is refused before a model loads (minutes, on a real one)

EARLY_ROWS = [
    [*COMPRESS, "--windows", "0"],
    [*COMPRESS, "--seq-len", "-4"],
    [*COMPRESS, "--data", "poems"],
    [*COMPRESS[:3], "ckpt", *COMPRESS[4:]],
    [*RECOVER, "--seq-len", "0"],
    [*RECOVER, "--device", "tpu9"],
    [*RECOVER, "--data", "poems"],
    ["analyze", "tiny", "--out", "an", "--param-ratio", "1.5"],
    ["analyze", "tiny", "--out", "an", "--fractions", "x"],
    ["analyze", "tiny", "--out", "an", "--windows", "0"],
    ["eval", "tiny", "--windows", "0"],
    ["eval", "tiny", "--data", "poems"],
    ["finetune", "tiny", "--data", "missing.jsonl", "--out", "ft"],
    ["finetune", "tiny", "--data", "missing.jsonl", "--out", "ft", "--device", "tpu9"],
]


@pytest.mark.parametrize("args", EARLY_ROWS, ids=[" ".join(a[:1] + a[-2:]) for a in EARLY_ROWS])
def test_bad_input_is_refused_before_any_model_loads(work, monkeypatch, args):
    from svdcompress import checkpoint, zoo
    from svdcompress.cli import app

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(zoo, "load_model", no_load)
    monkeypatch.setattr(checkpoint, "load", no_load)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "error:" in result.output, result.output
