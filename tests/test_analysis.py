"""Sensitivity analysis on tiny models: measurements, cache resume, refusals, diagnostics, report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_model

import svdcompress as sc
import svdcompress.analysis as analysis_module
from svdcompress.analysis import (
    ANALYSIS_FILE,
    analyze,
    effective_rank,
    energy_rank,
    interpolate_kl,
    load_analysis,
    model_fingerprint,
)
from svdcompress.diagnostics import diagnose_policy
from svdcompress.errors import AnalysisError

PROBE = {"probe_samples": 2, "probe_len": 16}


@pytest.fixture(scope="module")
def llama_and_analysis():
    model = make_tiny_model("llama")
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, windows, analyze(model, windows, **PROBE)


def test_interpolate_kl_shape():
    points = [(0.1, 1e-3), (0.4, 1e-2)]
    assert interpolate_kl(0.1, points) == pytest.approx(1e-3)
    assert interpolate_kl(0.4, points) == pytest.approx(1e-2)
    assert interpolate_kl(0.05, points) == pytest.approx(5e-4)  # linear in energy below
    assert interpolate_kl(0.0, points) == 0.0
    grid = [interpolate_kl(e, [(0.1, 1e-3), (0.2, 5e-4), (0.4, 1e-2)]) for e in (0.05, 0.15, 0.3, 0.8)]
    assert grid == sorted(grid)  # noisy measurements are made monotone


def test_effective_and_energy_rank():
    assert effective_rank([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert effective_rank([1.0, 0.0]) == pytest.approx(1.0)
    assert energy_rank([3.0, 1.0], 0.9) == 1 and energy_rank([1.0, 1.0], 0.9) == 2


def test_every_module_measured_and_model_unchanged(llama_and_analysis):
    model, _, analysis = llama_and_analysis
    reference = make_tiny_model("llama")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  reference.state_dict().values(), strict=True))
    assert len(analysis.modules) == 21
    for m in analysis.modules:
        assert len(m.singular_values) == len(m.whitened_values) == m.full_rank
        assert [x.rank for x in m.measurements] == sorted((x.rank for x in m.measurements), reverse=True)
        assert all(0 < x.energy < 1 and x.kl >= 0 and math.isfinite(x.delta_nll) for x in m.measurements)
        assert m.predicted_kl(None) == 0.0 and m.predicted_kl(m.full_rank) == 0.0
    rows = analysis.sensitivity(0.5)
    assert rows[0]["kl"] >= rows[-1]["kl"] and set(analysis.role_summary()) >= {"q_proj", "v_proj"}


def test_measured_kl_matches_compressing_the_module(llama_and_analysis):
    """The probe's KL for one module equals the KL of a model with just that module compressed."""
    model, windows, analysis = llama_and_analysis
    entry = analysis.module("model.layers.1.self_attn.v_proj")
    rank = entry.measurements[0].rank
    compressed = copy.deepcopy(model)
    config = sc.WhitenConfig(rank=rank, targets=(entry.name,))
    sc.compress_(compressed, config, windows)
    probe = windows[:2, :16]
    with torch.no_grad():
        ref = model(input_ids=probe).logits.log_softmax(-1)
        out = compressed(input_ids=probe).logits.log_softmax(-1)
    kl = float((ref.exp() * (ref - out)).sum(-1).mean())
    assert kl == pytest.approx(entry.measurements[0].kl, rel=1e-3, abs=1e-9)


def test_interrupted_analysis_resumes_from_cache(tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    real = analysis_module._analyze_module
    calls = []

    def failing(model, target, *args):
        if target.block == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in block 1
        calls.append(target.name)
        return real(model, target, *args)

    monkeypatch.setattr(analysis_module, "_analyze_module", failing)
    with pytest.raises(KeyboardInterrupt):
        analyze(model, windows, tmp_path, **PROBE)
    cached = json.loads((tmp_path / ANALYSIS_FILE).read_text())["modules"]
    assert len(cached) == 7 and all(".layers.0." in name for name in cached)

    monkeypatch.setattr(analysis_module, "_analyze_module", lambda *a: calls.append(a[1].name) or real(*a))
    calls.clear()
    resumed = analyze(model, windows, tmp_path, **PROBE)
    assert len(calls) == 14 and not any(".layers.0." in name for name in calls)
    fresh = analyze(model, windows, **PROBE)
    for a, b in zip(resumed.modules, fresh.modules, strict=True):
        assert [x.kl for x in a.measurements] == pytest.approx([x.kl for x in b.measurements], rel=1e-6)
    assert load_analysis(tmp_path).fingerprint == resumed.fingerprint


def test_refuses_folder_of_another_model_or_settings(tmp_path):
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    small = {**PROBE, "targets": ("k_proj",)}
    analyze(make_tiny_model("llama"), windows, tmp_path, **small)
    with pytest.raises(AnalysisError, match="different model"):
        analyze(make_tiny_model("llama", seed=1), windows, tmp_path, **small)
    with pytest.raises(AnalysisError, match=r"other settings.*fractions"):
        analyze(make_tiny_model("llama"), windows, tmp_path, **small, fractions=(0.5,))
    (tmp_path / ANALYSIS_FILE).write_text('{"format_version": 1, "fingerp')
    with pytest.raises(AnalysisError, match="cannot read"):
        analyze(make_tiny_model("llama"), windows, tmp_path, **small)


def test_fingerprint_tracks_weights():
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures(arch):
    """GPT-2's Conv1D weights and OPT's final layer norm go through the same probe."""
    model = make_tiny_model(arch)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    result = analyze(model, windows, targets=("o_proj", "down_proj"), **PROBE)
    assert len(result.modules) == 6
    # c_proj (down) reads 256 channels but sees only 32 tokens: at rank 35 its error is ~0.
    assert all(x.kl >= 0 for m in result.modules for x in m.measurements)
    assert all(m.measurements[-1].kl > 0 for m in result.modules)


def test_diagnose_policy(llama_and_analysis):
    model, windows, _ = llama_and_analysis
    same = diagnose_policy(model, copy.deepcopy(model), windows[:2])
    assert same.first_bad_layer is None and all(d.cosine == pytest.approx(1.0) for d in same.layers)
    assert same.logits["kl"] == pytest.approx(0.0, abs=1e-6)
    compressed = copy.deepcopy(model)
    sc.compress_(compressed, sc.WhitenConfig(rank=4, targets=("v_proj",)), windows)
    diag = diagnose_policy(model, compressed, windows[:2], cosine_threshold=0.999)
    assert len(diag.layers) == 3 and diag.first_bad_layer == 0
    assert diag.perplexity["compressed"] != diag.perplexity["original"]
    assert 0 <= diag.largest_drop_layer < 3 and diag.logits["kl"] > 0


def test_report_files(llama_and_analysis, tmp_path):
    from svdcompress.allocation import allocate, predicted_curve
    from svdcompress.report import write_report

    model, windows, analysis = llama_and_analysis
    allocation = allocate(analysis, param_ratio=0.7, min_rank=2, rank_step=2)
    compressed = copy.deepcopy(model)
    sc.compress_(compressed, allocation.to_config(sc.WhitenConfig(param_ratio=0.7)), windows)
    diagnostics = {"allocated": diagnose_policy(model, compressed, windows[:2]).to_dict()}
    curve = predicted_curve(analysis, [0.6, 0.8], min_rank=2, rank_step=2)
    report = write_report(tmp_path, analysis, allocations={"alloc": allocation.to_dict()},
                          curve=curve, diagnostics=diagnostics)
    text = report.read_text()
    for png in ("spectra", "effective_rank", "sensitivity", "predicted_curve", "alloc", "drift"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in text
    assert "model.layers" in text


@pytest.mark.real
def test_real_smollm2_first_and_last_block(smollm2, tmp_path):
    """On the real model: the probe replays it exactly, and allocation meets a budget (≈1 min)."""
    from svdcompress.allocation import allocate
    from svdcompress.datasets import token_windows

    model, tokenizer = smollm2
    windows = token_windows(tokenizer, "wiki", "calib", seq_len=128, n_samples=4)
    targets = (r"model\.layers\.(0|29)\..*",)
    result = analyze(model, windows, tmp_path, targets=targets, probe_samples=1, probe_len=128)
    assert len(result.modules) == 14
    assert all(m.measurements[-1].kl > m.measurements[0].kl > 0 for m in result.modules)
    allocation = allocate(result, param_ratio=0.8)
    assert allocation.cost_after <= allocation.budget and allocation.predicted_kl > 0


def test_the_analysis_cache_names_the_run_that_measured_it(tiny_llama, tiny_windows, tmp_path):
    import json

    from svdcompress.analysis import ANALYSIS_FILE, analyze

    analyze(tiny_llama, tiny_windows, tmp_path, probe_samples=2, probe_len=16)
    provenance = json.loads((tmp_path / ANALYSIS_FILE).read_text())["provenance"]
    assert provenance["command"] and provenance["code_version"]["commit"]
