"""The benchmark: its JSON schema, its fresh-process worker and its CLI (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from typer.testing import CliRunner

import svdcompress as sc
from svdcompress.bench import SCHEMA, BenchSettings, format_table, run_bench, weight_bytes
from svdcompress.cli import app
from svdcompress.errors import ConfigError

TINY = {"prefill_tokens": 16, "prompt_tokens": 4, "new_tokens": 3, "runs": 2, "warmup": 1,
        "threads": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = make_tiny_model("llama")
    model.save_pretrained(root / "plain")
    sc.compress_(model, sc.SVDConfig(param_ratio=0.6, quant_bits=8))
    sc.save(model, root / "int8")
    return root


def _check_stat(stat):
    assert set(stat) == {"median", "min", "max", "runs"}
    assert stat["min"] <= stat["median"] <= stat["max"] and stat["min"] > 0


def test_result_schema_and_ratios(folders):
    settings = BenchSettings(batch_sizes=(1, 2), rounds=2, **TINY)
    result = run_bench([str(folders / "int8")], str(folders / "plain"), settings, in_process=True)
    json.dumps(result)  # JSON-ready
    assert result["schema"] == SCHEMA and result["settings"]["batch_sizes"] == [1, 2]
    assert {"torch", "cpu_count", "loadavg"} <= set(result["host"])
    (entry,) = result["models"]
    rates = ["prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b2_tokens_per_s"]
    for key in [*rates, "peak_rss_mb", "load_seconds", "rss_after_load_mb"]:
        _check_stat(entry[key])
    assert len(entry["prefill_tokens_per_s"]["runs"]) == 4  # 2 rounds × 2 runs, pooled
    assert entry["threads"] == 1 and entry["int8_modules"] == 21
    layers = entry["weight_bytes"]
    assert layers["n_compressed_layers"] == 21
    assert layers["compressed_layers"] < 0.25 * layers["compressed_layers_dense_fp32"]
    ratios = entry["ratio_to_reference"]
    assert set(ratios) == {*rates, "peak_rss_mb", "load_seconds", "weight_bytes"}
    assert ratios["weight_bytes"] < 1
    assert result["reference"]["weight_bytes"]["n_compressed_layers"] == 0
    table = format_table(result)
    assert "decode b2 tok/s" in table and "(×" in table and "threads=1" in table


def test_weight_bytes_counts_tied_embeddings_once():
    model = make_tiny_model("llama")  # tied input/output embeddings
    unique = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    assert weight_bytes(model)["total"] == sum(unique.values())


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="new_tokens"):
        BenchSettings(new_tokens=1)
    with pytest.raises(ConfigError, match="distinct"):
        run_bench(["a"], "a", BenchSettings())
    with pytest.raises(ConfigError, match="dtype='int4': use one of float32, bfloat16, float16"):
        BenchSettings(dtype="int4")


def test_models_run_in_the_dtype_asked_for(folders):
    """bfloat16 for GPU comparisons (it runs on the CPU too): floats converted, int8 codes kept."""
    settings = BenchSettings(batch_sizes=(1,), dtype="bfloat16", **TINY)
    result = run_bench([str(folders / "int8")], str(folders / "plain"), settings, in_process=True)
    entry, reference = result["models"][0], result["reference"]
    assert result["settings"]["dtype"] == "bfloat16" and entry["int8_modules"] == 21
    assert reference["weight_bytes"]["total"] == sum(p.numel() * 2 for p in make_tiny_model("llama").parameters())
    assert "cpu bfloat16" in format_table(result)


def test_cli_measures_in_a_fresh_process_and_writes_json(folders, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", str(folders / "int8"), "--json", str(out), "--threads", "1", "--runs", "1",
            "--warmup", "0", "--prefill-tokens", "8", "--prompt-tokens", "4", "--new-tokens", "2",
            "--batch-sizes", "1", "--kernel", "dequant"]
    ballast = torch.ones(2**28)  # 1 GiB held by this process while the worker runs
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["settings"]["kernel"] == "dequant" and saved["models"][0]["threads"] == 1
    peak = saved["models"][0]["peak_rss_mb"]["median"]
    # A separate interpreter's own peak: Linux's ru_maxrss would have reported our 1 GiB too.
    assert 50 < peak < 1000, peak
    del ballast


def test_cli_bad_model_is_one_clean_line(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "no such file or folder" in result.output and "Traceback" not in result.output
