"""``calibration_stream="original"``: one-pass calibration on the original model's activations."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import svdcompress as sc
from svdcompress.errors import ConfigError
from svdcompress.modules import LowRankLinear
from svdcompress.targets import decoder_blocks

ONE_PASS = {"calibration_stream": "original", "calib_batch_size": 2}


def _low_rank(model) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_block_is_compressed_as_if_every_block_before_it_were_still_dense(arch, tiny_windows):
    """One-pass over the whole model = compressing each block alone in an otherwise dense model."""
    model = make_tiny_model(arch)
    sc.compress_(model, sc.WhitenConfig(param_ratio=0.6, **ONE_PASS), tiny_windows)
    one_pass = _low_rank(model)
    prefix, blocks = decoder_blocks(model)
    for index in range(len(blocks)):
        alone = make_tiny_model(arch)
        sc.compress_(alone, sc.WhitenConfig(param_ratio=0.6, calib_batch_size=2,
                                            targets=(rf"{prefix}\.{index}\..*",)), tiny_windows)
        for name, module in _low_rank(alone).items():
            assert torch.allclose(module.dense_weight(), one_pass[name].dense_weight(), atol=1e-6), name
    # ... which the default sequential stream is not: later blocks see earlier blocks' errors.
    sequential = make_tiny_model(arch)
    sc.compress_(sequential, sc.WhitenConfig(param_ratio=0.6, calib_batch_size=2), tiny_windows)
    last = next(n for n in one_pass if n.startswith(f"{prefix}.{len(blocks) - 1}."))
    assert not torch.allclose(_low_rank(sequential)[last].dense_weight(), one_pass[last].dense_weight(), atol=1e-6)


def test_one_pass_runs_every_block_once_per_batch(tiny_llama, tiny_windows):
    def block_calls(model, config):
        _, blocks = decoder_blocks(model)
        calls = [0] * len(blocks)
        handles = [b.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, b in enumerate(blocks)]
        try:
            sc.compress_(model, config, tiny_windows)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    batches = tiny_windows.shape[0] // 2
    # +1: the capture of the first block's inputs (stopped at its first call of each batch)
    assert block_calls(tiny_llama, sc.WhitenConfig(param_ratio=0.6, **ONE_PASS)) == [2 * batches] + [batches] * 2
    sequential = block_calls(make_tiny_model("llama"), sc.WhitenConfig(param_ratio=0.6, calib_batch_size=2))
    assert sequential == [3 * batches, 2 * batches, batches]  # the last block's outputs feed nothing


def test_one_pass_is_recorded_and_reloads(tiny_llama, tiny_windows, tmp_path):
    sc.compress_(tiny_llama, sc.WhitenConfig(param_ratio=0.6, **ONE_PASS), tiny_windows)
    assert tiny_llama.config.compression_config["config"]["calibration_stream"] == "original"
    sc.save(tiny_llama, tmp_path / "out")
    reloaded, _ = sc.load(tmp_path / "out")
    assert torch.equal(reloaded(tiny_windows).logits, tiny_llama(tiny_windows).logits)


def test_settings_that_need_the_compressed_stream_are_refused():
    with pytest.raises(ConfigError, match=r"update=True.*calibration_stream='compressed'"):
        sc.WhitenConfig(param_ratio=0.6, update=True, calibration_stream="original")
    with pytest.raises(ConfigError, match=r"error_blend=0\.5"):
        sc.WhitenConfig(param_ratio=0.6, error_blend=0.5, calibration_stream="original")
    with pytest.raises(ConfigError, match=r"calibration_stream='both'.*compressed, original"):
        sc.WhitenConfig(param_ratio=0.6, calibration_stream="both")
