"""``AutoModelForCausalLM.from_pretrained`` reads svdcompress checkpoints after ``import svdcompress``
(hf_integration's quantizer), and stock transformers without it refuses them."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_ARCHS, make_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import svdcompress as sc
from svdcompress.checkpoint import CHECKPOINT_FORMAT, QUANT_METHOD
from svdcompress.errors import CheckpointError
from svdcompress.modules import LowRankLinear

SETTINGS = {  # name -> (storage, quant_bits)
    "factored": ("factored", None),
    "factored-int8": ("factored", 8),
    "dense-int8": ("dense", 8),
}


def _logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


def _checkpoint(tmp_path, arch="llama", storage="factored", quant_bits=None, name="ckpt"):
    model = make_tiny_model(arch)
    sc.compress_(model, sc.SVDConfig(rank=8, storage=storage, quant_bits=quant_bits))
    return model, sc.save(model, tmp_path / name)


def _stock_load(folders, out_dir):
    """Load each folder in one fresh Python that never imports svdcompress: name -> the error's
    first line, or None when it loaded (its logits on the tiny windows are then in out_dir)."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
        outcome = {{}}
        for folder in {[str(f) for f in folders]!r}:
            try:
                model = AutoModelForCausalLM.from_pretrained(folder)
            except Exception as err:
                outcome[folder] = str(err).splitlines()[0]
                continue
            outcome[folder] = None
            with torch.no_grad():
                save_file({{"logits": model(windows).logits}}, folder + ".logits")
        assert "svdcompress" not in sys.modules
        print(json.dumps(outcome))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_from_pretrained_equals_svdcompress_load(tmp_path, tiny_windows, arch, setting):
    storage, bits = SETTINGS[setting]
    model, folder = _checkpoint(tmp_path, arch, storage, bits)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == QUANT_METHOD and config["format_version"] == CHECKPOINT_FORMAT
    assert config["modules"] == {n: m.spec() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}

    ours, _ = sc.load(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder)  # garbage buffers would differ between loads
    assert sum(isinstance(m, LowRankLinear) for m in theirs.modules()) == len(config["modules"])
    assert {(n, b.dtype) for n, b in theirs.named_buffers() if b.dtype == torch.int8} == {
        (n, b.dtype) for n, b in ours.named_buffers() if b.dtype == torch.int8}
    expected = _logits(model, tiny_windows)
    assert torch.equal(_logits(ours, tiny_windows), expected)
    assert torch.equal(_logits(theirs, tiny_windows), expected)
    assert torch.equal(_logits(again, tiny_windows), expected)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_pretrained_round_trips_and_dequantize_gives_the_dense_model(tmp_path, tiny_windows, setting):
    storage, bits = SETTINGS[setting]
    _, folder = _checkpoint(tmp_path, "gpt2", storage, bits)  # Conv1D layers and a fused c_attn
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    expected = _logits(loaded, tiny_windows)
    # What the Trainer writes (push_to_hub: test_push_to_hub_uploads_our_model_card_and_recipe).
    loaded.save_pretrained(tmp_path / "pushed")
    pushed = {p.name for p in (tmp_path / "pushed").iterdir()}
    assert pushed == {"config.json", "generation_config.json", "model.safetensors"}
    assert load_file(tmp_path / "pushed" / "model.safetensors").keys() == load_file(
        folder / "model.safetensors").keys()
    assert json.loads((tmp_path / "pushed" / "config.json").read_text())["quantization_config"] == \
        json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {"svdcompress", "low-rank"} <= set(loaded.model_tags)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pushed")
    assert torch.equal(_logits(reloaded, tiny_windows), expected)
    assert torch.equal(_logits(sc.load(tmp_path / "pushed")[0], tiny_windows), expected)

    dense = reloaded.dequantize()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert not hasattr(dense.config, "quantization_config") and not hasattr(dense.config, "compression_config")
    torch.testing.assert_close(_logits(dense, tiny_windows), expected, rtol=1e-5, atol=1e-5)


def _capture_uploads(monkeypatch):
    """What push_to_hub would upload, with no network: file name -> bytes, per upload."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append({p.name: p.read_bytes() for p in sorted(folder_path.iterdir())})
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_our_model_card_and_recipe(tmp_path, tiny_windows, monkeypatch):
    """transformers' push_to_hub would write its generic README.md over ours after save_pretrained;
    every model svdcompress compressed or loaded uploads the folder save writes instead."""
    uploads = _capture_uploads(monkeypatch)
    model, folder = _checkpoint(tmp_path, "gpt2", "factored", 8)
    expected = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {"README.md", "recipe.yaml"} <= expected.keys()
    for pushed in (model, sc.load(folder)[0], AutoModelForCausalLM.from_pretrained(folder)):
        assert pushed.push_to_hub("someone/tiny-gpt2") == "commit"
    assert len(uploads) == 3
    for upload in uploads:
        assert upload.keys() == expected.keys()
        for name in ("README.md", "recipe.yaml", "config.json", "model.safetensors"):
            assert upload[name] == expected[name], name


def _saved_by_save_pretrained(tmp_path):
    model = make_tiny_model("qwen2")
    sc.compress_(model, sc.SVDConfig(rank=8, quant_bits=8))
    model.save_pretrained(tmp_path / "plain-save")
    return model, tmp_path / "plain-save"


def test_plain_save_pretrained_after_compress_writes_the_same_format(tmp_path, tiny_windows):
    """Users call model.save_pretrained on what compress_ returns: it must not write a folder that
    stock transformers would fill with random weights."""
    model, _ = _saved_by_save_pretrained(tmp_path)
    svdcompress_saved = sc.save(model, tmp_path / "sc-save")
    assert load_file(tmp_path / "plain-save" / "model.safetensors").keys() == load_file(
        svdcompress_saved / "model.safetensors").keys()
    config = json.loads((tmp_path / "plain-save" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain-save")
    assert torch.equal(_logits(loaded, tiny_windows), _logits(model, tiny_windows))


def _gpt2_dense_c_proj(tmp_path, name="gpt2-dense"):
    """Float dense rank-r layers in place of GPT-2's Conv1D c_proj: attn.c_proj is square."""
    model = make_tiny_model("gpt2")
    sc.compress_(model, sc.SVDConfig(rank=8, storage="dense", targets=("c_proj",)))
    return model, sc.save(model, tmp_path / name)


def test_without_import_stock_transformers_refuses_or_loads_correctly(tmp_path, tiny_windows):
    """Never random or transposed weights: every folder whose layers lost their stock weight is
    refused (size mismatch on the guard tensors); float dense rank-r layers are plain weights, the
    Conv1D ones (square attn.c_proj included) in Conv1D's orientation."""
    refused = [_checkpoint(tmp_path, "llama", *SETTINGS[s], name=s)[1] for s in SETTINGS]
    refused.append(_checkpoint(tmp_path, "gpt2", name="gpt2-fused")[1])  # split c_attn, Conv1D
    refused.append(_saved_by_save_pretrained(tmp_path)[1])  # model.save_pretrained after compress_
    tables = make_tiny_model("llama")  # int8 head and input embeddings: guards under both stock names
    sc.compress_(tables, sc.SVDConfig(rank=8, quant_bits=8, head_quant_bits=8, embedding_quant_bits=8))
    refused.append(sc.save(tables, tmp_path / "int8-tables"))
    loaded = [_checkpoint(tmp_path, "llama", "dense", name="dense"), _gpt2_dense_c_proj(tmp_path)]
    outcome, log = _stock_load([*refused, *(folder for _, folder in loaded)], tmp_path)
    for folder in refused:
        assert "ignore_mismatched_sizes" in outcome[str(folder)], folder
    assert "Unknown quantization type, got svdcompress" in log  # transformers says why it skipped
    for model, folder in loaded:
        assert outcome[str(folder)] is None
        stock_logits = load_file(f"{folder}.logits")["logits"]
        torch.testing.assert_close(stock_logits, _logits(model, tiny_windows), rtol=1e-5, atol=1e-5)


def test_conv1d_dense_weights_round_trip_through_from_and_save_pretrained(tmp_path, tiny_windows):
    model, folder = _gpt2_dense_c_proj(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.transformer.h[1].mlp.c_proj.weight.shape == (64, 256)  # the module's (out, in)
    loaded.save_pretrained(tmp_path / "again")
    saved, original = load_file(tmp_path / "again" / "model.safetensors"), load_file(folder / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), tiny_windows),
                       _logits(model, tiny_windows))


def _as_older_format(folder, version):
    """Rewrite a current folder as svdcompress wrote it in format 1 (compression_config only, no
    guard tensors) or 2 (+ quantization_config and guards), both with Conv1D-layout dense weights
    (out, in)."""
    config = json.loads((folder / "config.json").read_text())
    layout = sc.checkpoint.SvdCompressQuantizationConfig.from_dict(config["quantization_config"])
    tensors = sc.checkpoint.transpose_conv1d_weights(layout, load_file(folder / "model.safetensors"))
    if version == 1:
        del config["quantization_config"]
        tensors = {k: v for k, v in tensors.items() if k not in sc.checkpoint.guard_names(layout)}
    else:
        config["quantization_config"]["format_version"] = version
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "report.txt").write_text("kept")


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_load_and_migrate_reads_them_for_from_pretrained(tmp_path, tiny_windows, version):
    from typer.testing import CliRunner

    from svdcompress.cli import app

    model, folder = _gpt2_dense_c_proj(tmp_path)  # the layers whose stored orientation changed
    sc.compress_(factored := make_tiny_model("gpt2"), sc.SVDConfig(rank=8))
    expected = {folder: _logits(model, tiny_windows),
                sc.save(factored, tmp_path / "factored"): _logits(factored, tiny_windows)}
    for old in expected:
        _as_older_format(old, version)
        assert torch.equal(_logits(sc.load(old)[0], tiny_windows), expected[old])
    if version == 2:
        with pytest.raises(CheckpointError, match=r"format 2, written by an earlier version, and "
                                                  r"from_pretrained reads format 3: rewrite it once "
                                                  r"with `svdcompress migrate DIR`"):
            AutoModelForCausalLM.from_pretrained(folder)
    assert sc.checkpoint.migrate(folder, tmp_path / "new") == tmp_path / "new"
    result = CliRunner().invoke(app, ["migrate", str(tmp_path / "factored")])  # in place
    assert result.exit_code == 0, result.output
    for new, old in ((tmp_path / "new", folder), (tmp_path / "factored", tmp_path / "factored")):
        config = json.loads((new / "config.json").read_text())
        assert config["quantization_config"]["format_version"] == CHECKPOINT_FORMAT
        assert (new / "report.txt").read_text() == "kept" and (new / "README.md").is_file()
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(new), tiny_windows), expected[old])
    with pytest.raises(CheckpointError, match="already exists"):
        sc.checkpoint.migrate(folder, tmp_path / "new")


def test_another_format_version_is_refused_with_what_to_do(tmp_path):
    _, folder = _checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = CHECKPOINT_FORMAT + 1
    (folder / "config.json").write_text(json.dumps(config))
    for load in (AutoModelForCausalLM.from_pretrained, sc.load, sc.checkpoint.migrate):
        with pytest.raises(CheckpointError, match=rf"format {CHECKPOINT_FORMAT + 1} .* reads format "
                                                  rf"{CHECKPOINT_FORMAT}: load it with the "
                                                  r"svdcompress version that wrote it"):
            load(folder)


def test_cli_reports_another_format_version_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from svdcompress.cli import app

    _, folder = _checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["export-dense", str(folder), "--out", str(tmp_path / "plain")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "format 7" in result.output


def test_from_pretrained_refuses_a_missing_factor_by_name(tmp_path):
    _, folder = _checkpoint(tmp_path, quant_bits=8)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.right_scale"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj but the tensors lack its int8 scales"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_guard_tensors_are_saved_only_where_the_stock_weight_is_gone(tmp_path):
    def guards(folder):
        with safe_open(folder / "model.safetensors", "pt") as handle:
            return {k for k in handle.keys() if handle.get_slice(k).get_shape() == [1]}  # noqa: SIM118

    _, folder = _checkpoint(tmp_path, "llama", "dense", name="dense")  # float dense: real weights
    assert guards(folder) == set()
    _, folder = _checkpoint(tmp_path, "gpt2", "dense", name="gpt2-dense")  # the split c_attn is gone
    assert guards(folder) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)}
    _, folder = _checkpoint(tmp_path, "llama", "factored", name="factored")
    modules = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    assert guards(folder) == {f"{name}.weight" for name in modules}


def test_trainer_fine_tunes_float_factors_and_int8_is_not_trainable(tmp_path, tiny_windows):
    from transformers import Trainer, TrainingArguments

    _, folder = _checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.hf_quantizer.is_trainable
    before = copy.deepcopy(model.model.layers[0].self_attn.q_proj.left.detach())
    data = [{"input_ids": w, "labels": w} for w in tiny_windows]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    after = model.model.layers[0].self_attn.q_proj.left.detach()
    assert not torch.equal(before, after) and torch.isfinite(after).all()

    _, int8_folder = _checkpoint(tmp_path, quant_bits=8, name="int8")
    assert not AutoModelForCausalLM.from_pretrained(int8_folder).hf_quantizer.is_trainable


@pytest.mark.real
def test_smollm2_from_pretrained_equals_svdcompress_load(smollm2, tmp_path):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    sc.compress_(model, sc.SVDConfig(rank_ratio=0.5, targets=("k_proj",), quant_bits=8))
    folder = sc.save(model, tmp_path / "smol", tokenizer=tokenizer)
    windows = tokenizer(["The capital of France is Paris, and the capital of Italy is"],
                        return_tensors="pt").input_ids
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(isinstance(m, LowRankLinear) for m in theirs.modules()) == 30
    assert torch.equal(_logits(theirs, windows), _logits(sc.load(folder)[0], windows))
