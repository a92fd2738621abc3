"""The fused int8 GEMV (svdcompress/kernels/int8_gemv.c), built with the system C compiler."""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch

from svdcompress import native, runtime

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A cache of its own, so the kernel is compiled in this test and forgotten after it."""
    monkeypatch.setenv("SVDCOMPRESS_CACHE", str(tmp_path))
    native._library.cache_clear()
    yield tmp_path
    native._library.cache_clear()


def _case(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) / 100 + 1e-4
    expected = (x.double() @ q.double().T) * scale.double()
    return x, q, scale, expected


@needs_compiler
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (1, 256, 576), (2, 7, 13), (3, 192, 577),
                                           (8, 5, 8), (16, 1536, 300), (5, 576, 1536)])
def test_matches_float64_on_every_tile_and_tail(fresh_build, m, n, k):
    """Rows in tiles of 4 and 2 with every remainder, lengths with and without a vector tail."""
    x, q, scale, expected = _case(m, n, k, seed=m * n + k)
    assert native.gemv_available()
    y = native.int8_gemv(x, q, scale)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    strided = torch.randn(k, m).T  # not contiguous: copied, same answer
    torch.testing.assert_close(native.int8_gemv(strided, q, scale).double(),
                               (strided.double() @ q.double().T) * scale.double(), rtol=1e-5, atol=1e-4)
    assert len(list((fresh_build / "native").glob("int8_gemv-*.so"))) == 1  # built once, cached


@needs_compiler
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("target", ["-march=x86-64-v4", "-march=x86-64-v3", "-march=x86-64"])
def test_every_path_avx512_avx2_and_plain_c_gives_the_same_numbers(fresh_build, target):
    """Each -march picks one path of the source; a CPU without AVX-512 runs only what it can."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    needs = {"-march=x86-64-v4": "avx512f", "-march=x86-64-v3": "avx2"}.get(target)
    if needs is not None and needs not in flags.split():
        pytest.skip(f"this CPU cannot run {target}")
    function = native.load(native.build(native.source(), shutil.which("cc"), target))
    for m, n, k in [(1, 9, 37), (7, 13, 300), (16, 6, 16)]:
        x, q, scale, expected = _case(m, n, k, seed=k)
        y = torch.empty(m, n)
        function(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_compiler
def test_refuses_what_would_read_past_a_buffer(fresh_build):
    x, q, scale, _ = _case(2, 4, 8, seed=0)
    for bad in [(x[:, :7], q, scale), (x, q, scale[:3]), (x.double(), q, scale), (x, q.float(), scale),
                (x[0], q, scale)]:
        with pytest.raises(ValueError, match="int8_gemv needs"):
            native.int8_gemv(*bad)


@needs_compiler
def test_the_gemv_kernel_takes_decode_rows_and_leaves_prefill_to_torch(fresh_build, monkeypatch):
    x, q, scale, expected = _case(runtime.SERIAL_ROWS, 40, 48, seed=1)
    calls = []
    real = native.int8_gemv
    monkeypatch.setattr(native, "int8_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    y = runtime.int8_linear(x.reshape(2, 8, 48), q, scale, "gemv")
    assert calls == [(16, 48)] and y.shape == (2, 8, 40)
    torch.testing.assert_close(y.reshape(16, 40).double(), expected, rtol=1e-5, atol=1e-5)
    runtime.int8_linear(torch.randn(runtime.SERIAL_ROWS + 1, 48), q, scale, "gemv")  # prefill-sized
    runtime.int8_linear(x.double(), q, scale, "gemv")  # another dtype
    assert len(calls) == 1


def test_without_a_compiler_it_falls_back_with_one_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    x, q, scale, expected = _case(1, 40, 48, seed=2)
    with caplog.at_level(logging.WARNING, logger="svdcompress.native"):
        assert not native.gemv_available()
        y = runtime.int8_linear(x, q, scale, "gemv")  # dequant_serial instead: the same numbers
        runtime.int8_linear(x, q, scale, "gemv")
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_it_can_be_turned_off(fresh_build, monkeypatch):
    monkeypatch.setenv("SVDCOMPRESS_NATIVE", "0")
    assert not native.gemv_available()
    assert not (fresh_build / "native").exists()
