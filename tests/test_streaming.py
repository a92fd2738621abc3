"""Streaming compression (issue 12): block by block from safetensors shards, same result as in
memory, resumable, and clear about memory budgets and broken shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_VOCAB, make_char_tokenizer, make_tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import svdcompress as sc
from svdcompress import streaming
from svdcompress.calibration import ModuleStats
from svdcompress.checkpoint import load, save
from svdcompress.cli import app
from svdcompress.errors import ConfigError, ModelLoadError
from svdcompress.modules import LowRankLinear
from svdcompress.zoo import load_model

WINDOWS = torch.randint(0, TINY_VOCAB, (6, 32), generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "svd": sc.SVDConfig(param_ratio=0.6),
    "whiten": sc.WhitenConfig(param_ratio=0.6, calib_batch_size=2),
    "whiten+update": sc.WhitenConfig(param_ratio=0.6, update=True, calib_batch_size=4),
    "whiten-one-pass": sc.WhitenConfig(param_ratio=0.6, calibration_stream="original", calib_batch_size=2),
    "whiten+blend": sc.WhitenConfig(param_ratio=0.6, storage="pivoted", error_blend=0.25, calib_batch_size=2),
    "asvd-int8": sc.ASVDConfig(param_ratio=0.6, quant_bits=8),
    "whiten-int8+int8-tables": sc.WhitenConfig(param_ratio=0.6, quant_bits=8, head_quant_bits=8,
                                               embedding_quant_bits=8, calib_batch_size=2),
}


def _sharded(folder, arch="llama"):
    """A tiny model saved in several shards (about one per block), with a tokenizer."""
    make_tiny_model(arch).save_pretrained(folder, max_shard_size="60KB")
    make_char_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) >= 4
    return folder


@pytest.fixture
def source(tmp_path):
    return _sharded(tmp_path / "source")


def _in_memory(source, config, out, windows):
    model, tokenizer = load_model(str(source))
    report = sc.compress_(model, config, windows)
    model.config.compression_config["base_model"] = str(source)
    save(model, out, tokenizer=tokenizer, extra_files={"compression_report.json": "{}"})
    return report


def _assert_same_checkpoint(a, b):
    model_a, _ = load(a)
    model_b, _ = load(b)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    config_a = json.loads((a / "config.json").read_text())
    config_b = json.loads((b / "config.json").read_text())
    assert config_a == config_b
    # the files too, not only what load makes of them: guard tensors included
    files_a, files_b = _file_tensors(a), _file_tensors(b)
    assert sorted(files_a) == sorted(files_b), set(files_a) ^ set(files_b)
    assert all(torch.equal(files_a[k], files_b[k]) for k in files_a)
    return model_b


def _file_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _streamed(source, config, out, windows=WINDOWS, **kwargs):
    return streaming.compress_streaming(source, config, out, calibration=windows,
                                        tokenizer=make_char_tokenizer(), base_model=str(source), **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_writes_the_same_checkpoint_as_in_memory(source, tmp_path, name):
    config = CONFIGS[name]
    windows = None if name == "svd" else WINDOWS  # svd is data-free: no calibration at all
    reference = _in_memory(source, config, tmp_path / "memory", windows)
    report = _streamed(source, config, tmp_path / "stream", windows)
    model = _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    tables = (config.head_quant_bits is not None) + (config.embedding_quant_bits is not None)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 3 * 7 + tables
    assert (report.head, report.embeddings) == (reference.head, reference.embeddings)
    assert [m.rank for m in report.modules] == [m.rank for m in reference.modules]
    assert [m.output_error for m in report.modules] == [m.output_error for m in reference.modules]
    assert report.model_params_after == reference.model_params_after
    assert report.model_params_before == reference.model_params_before
    assert not streaming.work_folder(tmp_path / "stream").exists()  # cleaned once complete


def test_untied_qwen2_streams_to_the_same_checkpoint(tmp_path):
    source = _sharded(tmp_path / "qwen", arch="qwen2")
    config = sc.WhitenConfig(param_ratio=0.5, targets=("mlp",), embedding_quant_bits=8)  # untied: on its own
    reference = _in_memory(source, config, tmp_path / "memory", WINDOWS)
    report = _streamed(source, config, tmp_path / "stream")
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert report.embeddings == reference.embeddings and not report.embeddings["untied"] and report.head is None
    assert report.model_params_after == reference.model_params_after


@pytest.mark.parametrize("name", ["whiten+update", "whiten-one-pass", "whiten+blend"])
def test_hidden_states_spilled_to_disk_give_the_same_result(source, tmp_path, monkeypatch, name):
    config = CONFIGS[name]
    _streamed(source, config, tmp_path / "memory-held")
    spilled = []
    original_write = streaming._Stream.write
    monkeypatch.setattr(streaming._Stream, "write", classmethod(
        lambda cls, *args: spilled.append(args[-1]) or original_write(*args)))
    # The process's own RSS grows as the suite runs; a fixed one keeps the budget between the two.
    monkeypatch.setattr(streaming, "_process_rss", lambda: 256 << 20)
    model, _ = load_model(str(source))
    estimate = streaming.estimate_memory(
        streaming._skeleton(source, torch.float32),
        sc.targets.find_targets(model, config.targets), config, tuple(WINDOWS.shape), torch.float32)
    # A budget between what streaming needs with hidden states on disk and in memory.
    budget = (estimate.streaming(spill=True) + estimate.streaming(spill=False)) // 2
    _streamed(source, config, tmp_path / "spilled", max_memory=budget)
    assert spilled and all(spilled)
    _assert_same_checkpoint(tmp_path / "memory-held", tmp_path / "spilled")


@pytest.mark.parametrize(("name", "spill"), [("whiten", False), ("whiten+update", True), ("whiten+blend", True)])
def test_an_interrupted_run_resumes_at_the_first_unfinished_block(source, tmp_path, monkeypatch,
                                                                  name, spill):
    config = CONFIGS[name]
    _streamed(source, config, tmp_path / "whole")
    monkeypatch.setattr(streaming, "_choose_spill", lambda *args: spill)
    out = tmp_path / "resumed"
    assert _streamed(source, config, out, stop_after=2) is None
    assert not out.exists()
    work = streaming.work_folder(out)
    assert sorted(p.name for p in work.glob("block-*.json")) == ["block-00000.json", "block-00001.json"]
    processed = []
    original = streaming._process_block
    monkeypatch.setattr(streaming, "_process_block",
                        lambda run, index, *a, **k: processed.append(index) or original(run, index, *a, **k))
    report = _streamed(source, config, out)
    assert processed == [2]  # blocks 0 and 1 were not computed again
    assert len(report.modules) == 21
    _assert_same_checkpoint(tmp_path / "whole", out)


def test_a_half_written_block_is_never_used(source, tmp_path):
    config = CONFIGS["whiten"]
    _streamed(source, config, tmp_path / "whole")
    out = tmp_path / "out"
    _streamed(source, config, out, stop_after=2)
    work = streaming.work_folder(out)
    # Killed while committing block 1: its marker is gone, its shard half written.
    (work / "block-00001.json").unlink()
    shard = work / "block-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    (work / "block-00002.safetensors.partial").write_bytes(b"junk")
    _streamed(source, config, out)
    _assert_same_checkpoint(tmp_path / "whole", out)


def _shard_of_block(source, index):
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    return source / weight_map[f"model.layers.{index}.mlp.down_proj.weight"]


def test_a_shard_truncated_mid_stream_fails_cleanly_and_resumes_once_fixed(source, tmp_path, monkeypatch):
    config = CONFIGS["whiten"]
    _streamed(source, config, tmp_path / "whole")
    shard = _shard_of_block(source, 2)
    backup = tmp_path / "backup.safetensors"
    shutil.copyfile(shard, backup)
    original = streaming._process_block

    def truncate_after_block_0(run, index, *args, **kwargs):
        if index == 1:  # the disk goes bad while the run is under way
            shard.write_bytes(backup.read_bytes()[:-1000])
        return original(run, index, *args, **kwargs)

    monkeypatch.setattr(streaming, "_process_block", truncate_after_block_0)
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=rf"{shard.name}.*truncated or corrupt.*restore it"):
        _streamed(source, config, out)
    assert not out.exists()
    work = streaming.work_folder(out)
    assert (work / "block-00001.json").is_file() and not (work / "block-00002.json").exists()
    with pytest.raises(ModelLoadError, match="truncated"):  # checked before any block this time
        _streamed(source, config, out)
    monkeypatch.setattr(streaming, "_process_block", original)
    shutil.copyfile(backup, shard)  # fixed: the run resumes at block 2
    _streamed(source, config, out)
    _assert_same_checkpoint(tmp_path / "whole", out)


def test_a_missing_shard_is_named(source, tmp_path):
    shard = _shard_of_block(source, 1)
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"shard .*{shard.name} is missing"):
        _streamed(source, CONFIGS["svd"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_budget_too_small_for_one_block_says_what_is_needed(source, tmp_path):
    with pytest.raises(ConfigError, match=r"budget of 10 MB is too small .* needs about \d"):
        _streamed(source, CONFIGS["whiten"], tmp_path / "out", max_memory="10MB")
    assert not streaming.work_folder(tmp_path / "out").exists()


def test_parse_memory_reads_sizes():
    assert streaming.parse_memory("1.5GB") == int(1.5 * 1024**3)
    assert streaming.parse_memory("800mb") == 800 * 1024**2
    assert streaming.parse_memory("2GiB") == 2 * 1024**3
    assert streaming.parse_memory("4096") == 4096
    with pytest.raises(ConfigError, match=r"1\.5GB"):
        streaming.parse_memory("lots")


def test_memory_estimate_of_the_tinyllama_shape_counts_its_parts():
    from svdcompress.synthetic import synthetic_config

    with streaming.init_empty_weights():
        model = streaming.AutoModelForCausalLM.from_config(synthetic_config("tinyllama-1.1b", 32000))
    config = sc.WhitenConfig(param_ratio=0.8, calib_batch_size=4)
    targets = sc.targets.find_targets(model, config.targets)
    estimate = streaming.estimate_memory(model, targets, config, (16, 512), torch.float32)
    assert estimate.model == 1_100_048_384 * 4  # TinyLlama-1.1B's parameter count
    assert estimate.block == 44_044_288 * 4
    assert estimate.outer == 32000 * 2048 * 4 + 2048 * 4  # embeddings and the final norm
    assert estimate.hidden == 16 * 512 * 2048 * 4
    # Gram matrices: six 2048² (q, k, v, o, gate, up) and one 5632² (down), float64
    grams = (6 * 2048**2 + 5632**2) * 8
    # + the largest whitening workspace: down_proj (wide) holds W·G and W in float64 and W·G·Wᵀ,
    # never an eigendecomposition of its 5632² Gram; + an SVD's three m×n
    down_proj = (2 * 2048 * 5632 + 2048**2) * 8
    assert estimate.statistics == grams + down_proj + 3 * 2048 * 5632 * 8
    assert estimate.streaming(spill=False) < estimate.in_memory - 3 * 1024**3
    # error_blend tracks the original stream too: two streams of hidden states, and beside each Gram
    # the cross product and the original stream's Gram
    blend = streaming.estimate_memory(model, targets, config.replace(error_blend=0.25), (16, 512), torch.float32)
    assert blend.streams == 2 and estimate.streams == 1
    assert blend.statistics == 3 * grams + down_proj + 3 * 2048 * 5632 * 8
    assert blend.streaming(spill=False) - estimate.streaming(spill=False) == 2 * grams + 2 * estimate.hidden


def _cli_source(tmp_path, monkeypatch):
    from svdcompress import datasets

    corpus = [{"title": f"t{i}", "text": "plain words for a tiny model " * 20} for i in range(12)]
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    return _sharded(tmp_path / "source")


def test_cli_streams_when_asked_and_refuses_a_tiny_budget_in_one_line(tmp_path, monkeypatch):
    source = _cli_source(tmp_path, monkeypatch)
    runner = CliRunner()
    args = ["compress", str(source), "--method", "whiten", "--windows", "4", "--seq-len", "32"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--stream"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--no-stream"])
    assert result.exit_code == 0, result.output
    model = _assert_same_checkpoint(tmp_path / "m", tmp_path / "a")  # same record, same tensors
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 21
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--max-memory", "10MB"])
    assert result.exit_code == 2
    assert "too small to compress one decoder block" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "c"), "--max-memory", "lots"])
    assert result.exit_code == 2 and "--max-memory 'lots'" in result.output


def test_cli_svd_is_data_free_unless_the_error_report_is_asked_for(tmp_path, monkeypatch):
    from svdcompress import calibration

    source = _cli_source(tmp_path, monkeypatch)
    calibrated = []
    original = calibration.run_sequential
    monkeypatch.setattr(calibration, "run_sequential", lambda *a, **k: calibrated.append(1) or original(*a, **k))
    monkeypatch.setattr(sc.compress, "run_sequential", calibration.run_sequential)
    runner = CliRunner()
    args = ["compress", str(source), "--method", "svd", "--windows", "4", "--seq-len", "32"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert calibrated == []
    report = json.loads((tmp_path / "a" / "compression_report.json").read_text())
    assert report["calibration"] is None
    assert all(m["output_error"] is None for m in report["modules"])
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--error-report"])
    assert result.exit_code == 0, result.output
    assert calibrated == [1]
    report = json.loads((tmp_path / "b" / "compression_report.json").read_text())
    assert all(0 < m["output_error"] < 1 for m in report["modules"])


def test_synthetic_model_has_the_shape_and_the_tokenizer_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM

    from svdcompress.synthetic import make_synthetic

    out = make_synthetic("tinyllama-1.1b", tmp_path / "synthetic", num_hidden_layers=2,
                         hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]  # head, 2 blocks, tail
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 49152 and not model.config.tie_word_embeddings
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.shape == (64, 128) and abs(weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    again = make_synthetic("tinyllama-1.1b", tmp_path / "again", num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert (again / files[1]).read_bytes() == (out / files[1]).read_bytes()  # seeded by name


@pytest.mark.real
def test_real_smollm2_streams_to_the_same_checkpoint_as_in_memory(tmp_path):
    from svdcompress.zoo import resolve_model_spec

    source = resolve_model_spec("smollm2-135m")  # one safetensors file, tied embeddings
    config = sc.SVDConfig(param_ratio=0.8)
    model, tokenizer = load_model("smollm2-135m")
    sc.compress_(model, config)
    model.config.compression_config["base_model"] = "smollm2-135m"
    save(model, tmp_path / "memory", tokenizer=tokenizer, extra_files={"compression_report.json": "{}"})
    del model
    streaming.compress_streaming(source, config, tmp_path / "stream", tokenizer=tokenizer,
                                 base_model="smollm2-135m")
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")


def test_block_statistics_are_shared_exact_and_stop_at_the_last_target(tiny_llama, tiny_windows):
    """Both paths' statistics pass: targets fed one tensor share one Gram, which equals Σ xᵀx of
    each target's input as a plain forward sees it; the pass stops once every target has its input."""
    from svdcompress import calibration

    block = tiny_llama.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    modules = {n: block.get_submodule(n) for n in names}
    calls = calibration.capture_block_inputs(tiny_llama, block, list(tiny_windows.split(2)))
    expected = {n: 0 for n in names}
    ran_after_down = []

    def record(name):
        def hook(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            expected[name] = expected[name] + x.T @ x
        return hook

    with calibration.forward_hooks({m: record(n) for n, m in modules.items()}), torch.no_grad():
        for call in calls:
            calibration.run_block(block, call, call.hidden)
    with calibration.forward_hooks({block.mlp.down_proj: lambda *a: ran_after_down.append(1)}):
        stats, _ = calibration.gather_block_stats(block, modules, calls, [c.hidden for c in calls], None)
    assert ran_after_down == []  # down_proj's own product was never computed
    assert stats["self_attn.q_proj"].gram is stats["self_attn.v_proj"].gram
    assert stats["mlp.gate_proj"].gram is stats["mlp.up_proj"].gram
    assert stats["self_attn.o_proj"].gram is not stats["self_attn.q_proj"].gram
    for name in names:
        torch.testing.assert_close(stats[name].gram, expected[name], rtol=1e-5, atol=1e-4)
        assert torch.equal(stats[name].gram, stats[name].gram.T)
        assert stats[name].n_tokens == tiny_windows.numel()


def test_a_shared_input_is_released_once_its_last_sharer_has_it(tiny_llama, tiny_windows):
    """The statistics pass holds each batch's inputs so that a reused address is never taken for a
    shared input; from the second batch on, once the number of sharers is known, q/k/v's input is
    let go after v_proj has it: down_proj (the block's peak) runs without it held."""
    import weakref

    from svdcompress import calibration

    block = tiny_llama.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    modules = {n: block.get_submodule(n) for n in names}
    calls = calibration.capture_block_inputs(tiny_llama, block, list(tiny_windows.split(2)))
    q_input, alive_at_down = [], []

    def remember(_module, args, _kwargs):
        q_input.append(weakref.ref(args[0]))

    def check(_module, _args, _kwargs):
        alive_at_down.append(q_input[-1]() is not None)

    hooks = {block.self_attn.q_proj: remember, block.mlp.down_proj: check}
    with calibration.forward_hooks(hooks, pre=True):
        calibration.gather_block_stats(block, modules, calls, [c.hidden for c in calls], None)
    assert alive_at_down == [True, False]  # first batch: sharers being counted; then released


def test_sharers_decompose_their_gram_once_and_get_the_same_factors(tiny_llama, tiny_windows, monkeypatch):
    """q/k/v and gate/up share one Gram matrix, so whiten decomposes it once per block: 3 times
    (q/k/v, o, gate/up; the wide k, v and down_proj need no eigendecomposition), and each factor
    equals the one a fresh eigendecomposition gives."""
    from svdcompress import linalg

    calls = []
    real = linalg._gram_eigen
    monkeypatch.setattr(linalg, "_gram_eigen", lambda gram, floor: calls.append(gram.shape) or real(gram, floor))
    config = sc.WhitenConfig(param_ratio=0.6, calib_batch_size=2)
    shared = make_tiny_model("llama")
    sc.compress_(shared, config, tiny_windows)
    assert len(calls) == 3 * len(shared.model.layers)

    monkeypatch.setattr(ModuleStats, "from_gram",
                        lambda self, _key, compute, needed=True: compute(self.gram) if needed else None)
    fresh = make_tiny_model("llama")
    sc.compress_(fresh, config, tiny_windows)
    assert len(calls) == (3 + 4) * len(shared.model.layers)  # fresh: q, o, gate, up each
    for (name, a), (_, b) in zip(shared.named_modules(), fresh.named_modules(), strict=True):
        if isinstance(a, LowRankLinear):
            assert torch.equal(a.dense_weight(), b.dense_weight()), name


def test_a_value_shared_by_sharers_is_dropped_after_the_last_and_follows_the_gram():
    first = ModuleStats(gram=torch.eye(3, dtype=torch.float64), abs_sum=torch.zeros(3, dtype=torch.float64))
    first.shared.users = 3
    computed = []

    def compute(gram):
        computed.append(1)
        return gram.sum().item()

    assert [first.from_gram("sum", compute) for _ in range(2)] == [3.0, 3.0]
    assert len(computed) == 1 and first.shared.memo
    first.gram.mul_(2)  # changed in place: the memo is stale
    assert first.from_gram("sum", compute) == 6.0 and len(computed) == 2
    assert first.from_gram("sum", compute) == 6.0 and len(computed) == 2
    assert first.from_gram("sum", compute) == 6.0 and not first.shared.memo  # third user: dropped
