"""Loading never runs code (issue 15): no pickle anywhere, no remote code, strict tensor sets."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_tiny_model

from svdcompress import SVDConfig, compress_, save
from svdcompress.checkpoint import load
from svdcompress.errors import SvdCompressError
from svdcompress.zoo import load_model

PACKAGE = Path(__file__).resolve().parent.parent / "svdcompress"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Each pattern is a way to unpickle, or to run code that came with a model.
FORBIDDEN = {
    "pickle module": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b", re.M),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "trust_remote_code set": re.compile(r"trust_remote_code\s*=\s*(?!False)"),
    "eval/exec of text": re.compile(r"(?<![\w.])(eval|exec)\("),
    "unsafe YAML": re.compile(r"yaml\.(load|unsafe_load)\((?![^)]*SafeLoader)"),
}


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 20 and any(p.name == "checkpoint.py" for p in SOURCES)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_source_file_can_unpickle_or_run_remote_code(source):
    text = source.read_text()
    found = [what for what, pattern in FORBIDDEN.items() if pattern.search(text)]
    assert not found, f"{source.name}: {found}"


def test_the_scan_would_catch_each_pattern():
    samples = ["import pickle", "torch.load(path)", "np.load(f, allow_pickle=True)",
               "from_pretrained(x, trust_remote_code=True)", "eval(text)", "yaml.load(text)"]
    for sample, (what, pattern) in zip(samples, FORBIDDEN.items(), strict=True):
        assert pattern.search(sample), what
    assert not FORBIDDEN["torch.load without weights_only=True"].search("torch.load(p, weights_only=True)")
    assert not FORBIDDEN["eval/exec of text"].search("model.eval()")


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _pickled_weights(folder: Path, marker: Path) -> None:
    for file in folder.glob("*.safetensors"):
        file.unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, handle)


def test_a_plain_folder_with_pickled_weights_is_refused_unopened(tmp_path):
    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    make_tiny_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    _pickled_weights(folder, marker)
    with pytest.raises(SvdCompressError, match="never opens"):
        load_model(str(folder))
    assert not marker.exists()


def test_a_checkpoint_with_pickled_weights_is_refused_unopened(tmp_path):
    model, marker = make_tiny_model("llama"), tmp_path / "code-ran"
    compress_(model, SVDConfig(param_ratio=0.5))
    folder = save(model, tmp_path / "ckpt", tokenizer=make_char_tokenizer())
    _pickled_weights(folder, marker)
    with pytest.raises(SvdCompressError, match=r"no \.safetensors"):
        load(folder)
    assert not marker.exists()
