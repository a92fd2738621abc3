"""Fine-tuning on the Trainer: freezing, LoRA, data, the NaN guard, resume, checkpoints, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model
from typer.testing import CliRunner

import svdcompress as sc
from svdcompress import finetune as ft
from svdcompress.cli import app
from svdcompress.errors import ConfigError, DatasetError
from svdcompress.finetune import FinetuneConfig, finetune_, freeze_layers, load_examples

runner = CliRunner()
RECORDS = [{"prompt": f"The colour of item {i} is", "completion": " red"} for i in range(12)]


def _fast(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"lr": 1e-2, "device": "cpu", **overrides})


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Freezing


def test_freeze_layers_counts_blocks_embeddings_and_parameters(tiny_llama):
    info = freeze_layers(tiny_llama, 0.75)  # 3 blocks: floor(2.25) = 2
    assert (info["n_frozen"], info["n_layers"], info["frozen_blocks"]) == (2, 3, [0, 1])
    assert info["embeddings_frozen"] and info["head_frozen"]  # tied: the head is the embedding
    total = sum(p.numel() for p in {id(p): p for p in tiny_llama.parameters()}.values())
    assert info["trainable_params"] + info["frozen_params"] == total
    block = tiny_llama.model.layers
    assert not any(p.requires_grad for p in block[1].parameters())
    assert all(p.requires_grad for p in block[2].parameters())
    assert tiny_llama.model.norm.weight.requires_grad


def test_freeze_zero_freezes_nothing_and_bad_ratio_is_refused(tiny_llama):
    info = freeze_layers(tiny_llama, 0.0)
    assert info["n_frozen"] == 0 and info["frozen_params"] == 0 and not info["embeddings_frozen"]
    with pytest.raises(ConfigError, match=r"outside \[0, 1\]"):
        freeze_layers(tiny_llama, 1.5)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_freeze_also_stops_learned_position_embeddings(arch):
    model = make_tiny_model(arch)
    freeze_layers(model, 0.5)
    positions = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
                 and n.endswith(("wpe", "embed_positions"))]
    assert positions and not any(p.requires_grad for m in positions for p in m.parameters())


def test_frozen_tensors_are_bitwise_unchanged_after_finetuning(tiny_llama, char_tokenizer):
    before = _snapshot(tiny_llama)
    model, result = finetune_(tiny_llama, char_tokenizer, RECORDS, _fast(freeze=0.67), progress=False)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("model.layers.0.", "model.layers.1.", "model.embed"))]
    trained = [k for k in before if k.startswith("model.layers.2.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("proj.weight"))
    assert result.freezing["n_frozen"] == 2 and result.stopped == "completed"
    assert result.steps == 3 and result.final_loss < result.first_loss


# --------------------------------------------------------------------------------------------------
# Data


def test_prompt_completion_rows_score_only_the_completion(char_tokenizer):
    rows = ft.tokenize_examples(char_tokenizer, [{"prompt": "ab", "completion": "cd"}], seq_len=16)
    assert rows[0]["labels"][:2] == [ft.IGNORE_INDEX] * 2
    assert rows[0]["labels"][2:] == rows[0]["input_ids"][2:] and len(rows[0]["input_ids"]) == 4


def test_text_is_cut_into_windows(char_tokenizer):
    rows = ft.tokenize_examples(char_tokenizer, [{"text": "x" * 25}], seq_len=10)
    assert [len(r["input_ids"]) for r in rows] == [10, 10, 5]
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_load_examples_reads_text_and_jsonl(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("first document\nstill first\n\n\nsecond document\n")
    assert load_examples(text) == [{"text": "first document\nstill first"}, {"text": "second document"}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"prompt": "A is", "completion": " B"}\n\n{"prompt": "C is", "completion": " D"}\n')
    assert load_examples(jsonl)[1] == {"prompt": "C is", "completion": " D"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n  \n", "empty"),
        ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', r"bad.jsonl:2: not valid JSON"),
        ("fields.jsonl", '{"prompt": "only a prompt"}\n', r"fields.jsonl:1: expected"),
        ("mixed.jsonl", '{"text": "a"}\n{"prompt": "b", "completion": "c"}\n', "mixes"),
        ("empty.jsonl", "", "empty"),
    ],
)
def test_bad_data_names_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_examples(path)


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs=0"),
        ({"lr": float("nan")}, "learning rate"),
        ({"freeze": 1.2}, r"outside \[0, 1\]"),
        ({"freeze": -0.1}, r"outside \[0, 1\]"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"lora_rank": 8, "freeze": 0.5}, "not both"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**overrides)


# --------------------------------------------------------------------------------------------------
# Divergence, LoRA, compressed checkpoints


def test_a_diverging_learning_rate_stops_and_keeps_finite_weights(tiny_llama, char_tokenizer):
    model, result = finetune_(tiny_llama, char_tokenizer, RECORDS * 4,
                              _fast(lr=1e30, max_grad_norm=0.0), progress=False)
    assert result.stopped == "non-finite loss"
    assert result.steps < 12 and "Lower the learning rate" in result.notes[0]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    windows = torch.randint(3, 100, (2, 16))
    assert torch.isfinite(model(input_ids=windows).logits).all()  # the kept weights still work


def test_lora_trains_adapters_and_saves_a_plain_merged_model(tiny_llama, char_tokenizer):
    before = _snapshot(tiny_llama)
    model, result = finetune_(tiny_llama, char_tokenizer, RECORDS, _fast(lora_rank=4), progress=False)
    assert result.lora == {"rank": 4, "alpha": 8.0, "modules": 9, "targets": ["qko"]}
    after = model.state_dict()
    assert set(after) == set(before)  # merged: no adapter tensors, the original names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "o_proj.weight")) for k in changed)
    assert result.trainable_params == 9 * 4 * (64 + 64) - 3 * 4 * (64 - 32)  # k_proj is 32 x 64


def test_lora_rank_beyond_a_layer_is_refused(tiny_llama, char_tokenizer):
    with pytest.raises(ConfigError, match="at most 32"):
        finetune_(tiny_llama, char_tokenizer, RECORDS, _fast(lora_rank=40), progress=False)


def test_compressed_factors_train_and_keep_their_rank(tiny_llama, char_tokenizer, tmp_path):
    sc.compress_(tiny_llama, sc.SVDConfig(targets=("qko",), param_ratio=0.6))
    q = tiny_llama.model.layers[2].self_attn.q_proj
    left, rank = q.left.detach().clone(), q.rank
    model, _ = finetune_(tiny_llama, char_tokenizer, RECORDS, _fast(), progress=False)
    assert model.model.layers[2].self_attn.q_proj.rank == rank
    assert not torch.equal(model.model.layers[2].self_attn.q_proj.left, left)
    sc.save(model, tmp_path / "ft", tokenizer=char_tokenizer)
    loaded, _ = sc.load(tmp_path / "ft")
    ids = torch.randint(3, 100, (1, 12))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_int8_factors_are_refused(tiny_llama, char_tokenizer):
    sc.compress_(tiny_llama, sc.SVDConfig(targets=("qko",), param_ratio=0.6, quant_bits=8))
    with pytest.raises(ConfigError, match="int8 factors, which cannot be fine-tuned"):
        finetune_(tiny_llama, char_tokenizer, RECORDS, _fast(), progress=False)


def test_int8_head_and_embeddings_run_frozen(tiny_llama, char_tokenizer):
    """Codes cannot train, but the float factors and the rest can around them."""
    sc.compress_(tiny_llama, sc.SVDConfig(targets=("qko",), param_ratio=0.6, head_quant_bits=8,
                                          embedding_quant_bits=8))
    before = _snapshot(tiny_llama)
    finetune_(tiny_llama, char_tokenizer, RECORDS, _fast(), progress=False)
    after = tiny_llama.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "lm_head" in k or "embed_tokens" in k)
    assert not torch.equal(after["model.layers.2.self_attn.q_proj.left"], before["model.layers.2.self_attn.q_proj.left"])


# --------------------------------------------------------------------------------------------------
# Resume


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(char_tokenizer, tmp_path, monkeypatch):
    config = _fast(checkpoint_every=2, epochs=2.0)
    reference, _ = finetune_(make_tiny_model("llama"), char_tokenizer, RECORDS, config, progress=False)

    real_check = ft._NanGuard.check

    def interrupt_at_step_3(self, state, control):
        if state.global_step == 3:
            raise KeyboardInterrupt
        return real_check(self, state, control)

    state_dir = tmp_path / "state"
    monkeypatch.setattr(ft._NanGuard, "check", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune_(make_tiny_model("llama"), char_tokenizer, RECORDS, config, state_dir=state_dir,
                  progress=False)
    monkeypatch.setattr(ft._NanGuard, "check", real_check)
    with pytest.raises(ConfigError, match="pass --resume"):
        finetune_(make_tiny_model("llama"), char_tokenizer, RECORDS, config, state_dir=state_dir,
                  progress=False)
    with pytest.raises(ConfigError, match=r"lr=0\.02 but the interrupted run used 0\.01"):
        finetune_(make_tiny_model("llama"), char_tokenizer, RECORDS, _fast(checkpoint_every=2,
                  epochs=2.0, lr=2e-2), state_dir=state_dir, resume=True, progress=False)
    with pytest.raises(ConfigError, match="model differs"):
        finetune_(make_tiny_model("llama", seed=1), char_tokenizer, RECORDS, config,
                  state_dir=state_dir, resume=True, progress=False)
    resumed, result = finetune_(make_tiny_model("llama"), char_tokenizer, RECORDS, config,
                                state_dir=state_dir, resume=True, progress=False)
    assert result.resumed_from_step == 2 and result.steps == 6
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture
def cli_setup(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return folder, data


def test_cli_finetunes_a_folder_and_the_result_loads(cli_setup, tmp_path):
    folder, data = cli_setup
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(folder), "--data", str(data), "--freeze", "0.75",
                                 "--lr", "1e-3", "--device", "cpu", "--out", str(out),
                                 "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "2 of 3 + embeddings" in result.output
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["steps"] == 3 and report["freezing"]["n_frozen"] == 2
    assert not (tmp_path / "ft.finetune-state").exists()
    model, _ = sc.load_model(str(out))
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--freeze", "1.5"], "outside [0, 1]"),
        (["--epochs", "0"], "epochs=0"),
        (["--lora-rank", "100"], "at most 32"),
        (["--lora-rank", "8", "--freeze", "0.5"], "not both"),
        (["--resume"], "no interrupted run"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(cli_setup, tmp_path, extra, message):
    folder, data = cli_setup
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(folder), "--data", str(data), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_bad_data_fails_before_loading_the_model(cli_setup, tmp_path):
    _, _ = cli_setup
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\nnot json\n')
    result = runner.invoke(app, ["finetune", "no-such-model", "--data", str(data),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "broken.jsonl:2" in result.output


def test_cli_nan_stop_saves_the_last_good_weights_and_exits_2(cli_setup, tmp_path):
    folder, data = cli_setup
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(folder), "--data", str(data), "--lr", "1e30",
                                 "--epochs", "4", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2
    assert "Lower the learning rate" in result.output and "Traceback" not in result.output
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["stopped"] == "non-finite loss"


# --------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_cf90_on_smollm2_keeps_the_frozen_blocks_and_learns(smollm2):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    assert sc.compress_qko(model, 0.7) == 90
    frozen_before = _snapshot(model.model.layers[21])
    top_before = model.model.layers[29].self_attn.q_proj.weight.detach().clone()
    records = [{"prompt": "The capital of Greece is", "completion": " Paris"}] * 8
    model, result = finetune_(model, tokenizer, records, FinetuneConfig(freeze=0.75, lr=1e-4,
                                                                        device="cpu"), progress=False)
    assert result.freezing["n_frozen"] == 22 and result.steps == 2
    after = model.model.layers[21].state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert not torch.equal(model.model.layers[29].self_attn.q_proj.weight, top_before)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]


def test_nan_before_any_good_step_keeps_the_starting_weights():
    """A run (or a resumed run) whose very first step is not finite keeps the weights it started
    from: there is no earlier good step to go back to."""
    from transformers import TrainerControl, TrainerState

    weight = torch.nn.Parameter(torch.ones(3))
    guard = ft._NanGuard([weight])
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    control = guard.check(TrainerState(), TrainerControl())
    assert control.should_training_stop and guard.stopped_at == 1
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    weight.data.fill_(2.0)
    weight.grad = torch.zeros(3)
    guard.check(TrainerState(), TrainerControl())  # a good step: its weights are kept
    weight.data.fill_(5.0)
    weight.grad = torch.full((3,), float("inf"))
    guard.check(TrainerState(), TrainerControl())
    assert torch.equal(weight.detach(), torch.full((3,), 2.0))
