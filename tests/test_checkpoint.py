"""Checkpoints: ordinary HF folders that reload exactly, and dense exports stock transformers reads."""

import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import svdcompress as sc
from svdcompress.errors import CheckpointError, ConfigError
from svdcompress.modules import LowRankLinear


def _logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


@pytest.mark.parametrize("storage", ["factored", "dense"])
def test_save_load_is_exact(tiny_model, tiny_windows, tmp_path, storage):
    config = sc.SVDConfig(rank=8, storage=storage, targets=("attention", "mlp"))
    sc.compress_(tiny_model, config)
    sc.save(tiny_model, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["compression_config"]
    assert saved["config"]["method"] == "svd" and saved["library_version"] == sc.__version__

    loaded, _ = sc.load(tmp_path / "ckpt")
    original_state, loaded_state = tiny_model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, loaded_state[key]), key
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(saved["modules"])
    assert torch.equal(_logits(tiny_model, tiny_windows), _logits(loaded, tiny_windows))


def test_compressing_twice_keeps_both_in_the_checkpoint(tiny_llama, tiny_windows, tmp_path):
    sc.compress_(tiny_llama, sc.SVDConfig(rank=8, targets=("q_proj",)))
    sc.compress_(tiny_llama, sc.SVDConfig(rank=4, targets=("attention", "mlp")))  # the rest
    saved = tiny_llama.config.compression_config
    assert saved["history"][0]["config"]["targets"] == ["q_proj"]
    assert {spec["rank"] for name, spec in saved["modules"].items() if "q_proj" in name} == {8}
    sc.save(tiny_llama, tmp_path / "ckpt")
    loaded, _ = sc.load(tmp_path / "ckpt")
    assert torch.equal(_logits(tiny_llama, tiny_windows), _logits(loaded, tiny_windows))
    with pytest.raises(ConfigError, match="already compressed"):
        sc.compress_(loaded, sc.SVDConfig(rank=4))


def test_tied_embeddings_stay_tied_after_load(tiny_llama, tmp_path):
    sc.compress_(tiny_llama, sc.SVDConfig(rank=8))
    sc.save(tiny_llama, tmp_path / "ckpt")
    loaded, _ = sc.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_export_dense_loads_in_stock_transformers(tiny_model, tiny_windows, tmp_path):
    sc.compress_(tiny_model, sc.SVDConfig(param_ratio=0.5))
    expected = _logits(tiny_model, tiny_windows)
    sc.export_dense(tiny_model, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "compression_config" not in config
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, LowRankLinear) for m in stock.modules())
    torch.testing.assert_close(_logits(stock, tiny_windows), expected, rtol=1e-4, atol=1e-4)


def test_existing_folder_is_refused_unless_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        sc.save(tiny_llama, out)
    assert (out / "keep.txt").read_text() == "mine"
    sc.save(tiny_llama, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind


def test_failed_save_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_llama), "save_pretrained", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        sc.save(tiny_llama, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def _compressed_checkpoint(tmp_path):
    model = make_tiny_model("llama")
    sc.compress_(model, sc.SVDConfig(rank=8))
    return sc.save(model, tmp_path / "ckpt")


def test_config_that_does_not_match_the_tensors_is_refused(tmp_path):
    path = _compressed_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["compression_config"]["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 9
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not belong together"):
        sc.load(path)


def test_missing_tensor_is_refused(tmp_path):
    path = _compressed_checkpoint(tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.right"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lack"):
        sc.load(path)


def test_corrupt_file_is_refused(tmp_path):
    path = _compressed_checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        sc.load(path)


def test_plain_folder_is_not_a_compressed_checkpoint(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no compression_config"):
        sc.load(tmp_path / "plain")


def test_a_tensor_writer_folder_stores_conv1d_dense_weights_like_save(tmp_path, tiny_windows):
    """Streaming writes module state through tensor_writer (hard links to its work folder): the
    Conv1D-layout dense weights end in the file's orientation there too, the linked file untouched."""
    import os

    model = make_tiny_model("gpt2")
    sc.compress_(model, sc.SVDConfig(rank=8, storage="dense", targets=("c_proj",)))
    work = tmp_path / "work.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, work)
    before = load_file(work)

    def writer(folder):
        os.link(work, folder / "model-00001-of-00001.safetensors")
        return dict.fromkeys(before, "model-00001-of-00001.safetensors")

    streamed = sc.save(model, tmp_path / "streamed", tensor_writer=writer)
    in_memory = sc.save(model, tmp_path / "memory")
    assert all(torch.equal(before[k], v) for k, v in load_file(work).items())
    written = load_file(streamed / "model-00001-of-00001.safetensors")
    expected = load_file(in_memory / "model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert written["transformer.h.0.attn.c_proj.weight"].shape == (64, 64)
    assert written["transformer.h.0.mlp.c_proj.weight"].shape == (256, 64)  # (in, out), as Conv1D
    assert torch.equal(_logits(sc.load(streamed)[0], tiny_windows), _logits(model, tiny_windows))
