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
    # What push_to_hub uploads is this save_pretrained folder (plus transformers' own README).
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


def test_without_import_stock_transformers_refuses_or_loads_correctly(tmp_path, tiny_windows):
    """Never random weights: every folder whose layers lost their stock weight is refused (size
    mismatch on the guard tensors); float dense rank-r nn.Linear layers are plain weights."""
    refused = [_checkpoint(tmp_path, "llama", *SETTINGS[s], name=s)[1] for s in SETTINGS]
    refused.append(_checkpoint(tmp_path, "gpt2", name="gpt2-fused")[1])  # split c_attn, Conv1D
    refused.append(_saved_by_save_pretrained(tmp_path)[1])  # model.save_pretrained after compress_
    dense_model, dense = _checkpoint(tmp_path, "llama", "dense", name="dense")
    outcome, log = _stock_load([*refused, dense], tmp_path)
    for folder in refused:
        assert "ignore_mismatched_sizes" in outcome[str(folder)], folder
    assert "Unknown quantization type, got svdcompress" in log  # transformers says why it skipped
    assert outcome[str(dense)] is None
    stock_logits = load_file(f"{dense}.logits")["logits"]
    assert torch.equal(stock_logits, _logits(dense_model, tiny_windows))


def test_format_1_checkpoints_still_load(tmp_path, tiny_windows):
    """A folder written before format 2: compression_config only, no guard tensors."""
    model, folder = _checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if v.shape != (1,)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    loaded, _ = sc.load(folder)
    assert torch.equal(_logits(loaded, tiny_windows), _logits(model, tiny_windows))


def test_another_format_version_is_refused_with_what_to_do(tmp_path):
    _, folder = _checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = CHECKPOINT_FORMAT + 1
    (folder / "config.json").write_text(json.dumps(config))
    for load in (AutoModelForCausalLM.from_pretrained, sc.load):
        with pytest.raises(CheckpointError, match=r"format 3 .* reads format 2: load it with the "
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
