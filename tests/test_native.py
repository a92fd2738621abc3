"""The fused int8 GEMV (svdcompress/kernels/int8_gemv.c), built with the system C compiler."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from svdcompress import native, runtime
from svdcompress.linalg import Factors
from svdcompress.modules import LowRankLinear

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A cache of its own, so the kernel is compiled in this test and forgotten after it."""
    monkeypatch.setenv("SVDCOMPRESS_CACHE", str(tmp_path))
    native._library.cache_clear()
    native._parallel_build.cache_clear()
    yield tmp_path
    native._library.cache_clear()
    native._parallel_build.cache_clear()


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


def _built_for(target: str):
    """The library built for one -march path; skips where this CPU cannot run it."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    needs = {"-march=x86-64-v4": "avx512f", "-march=x86-64-v3": "avx2"}.get(target)
    if needs is not None and needs not in flags.split():
        pytest.skip(f"this CPU cannot run {target}")
    return native.load(native.build(native.source(), shutil.which("cc"), target))


@needs_compiler
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("target", ["-march=x86-64-v4", "-march=x86-64-v3", "-march=x86-64"])
def test_every_path_avx512_avx2_and_plain_c_gives_the_same_numbers(fresh_build, target):
    """Each -march picks one path of the source; a CPU without AVX-512 runs only what it can."""
    functions = _built_for(target)
    for m, n, k in [(1, 9, 37), (7, 13, 300), (16, 6, 16)]:
        x, q, scale, expected = _case(m, n, k, seed=k)
        y = torch.empty(m, n)
        for threads in (1, 2):  # a one-thread build ignores the count
            functions.int8_gemv(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k, threads)
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


def _int8_module(out: int, inp: int, rank: int, *, bias: bool, seed: int, storage: str = "pivoted") -> LowRankLinear:
    g = torch.Generator().manual_seed(seed)
    module = LowRankLinear(inp, out, rank, bias=bias, storage=storage)
    module.set_factors(Factors(torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)))
    if bias:
        module.bias.data.normal_(generator=g)
    return module.quantize_(8)


def _pivoted_reference(module: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The same layer in float64 from its dequantized matrices, without the C code."""
    y = x.double() @ module.dense_weight().double().T
    return y if module.bias is None else y + module.bias.double()


@needs_compiler
@pytest.mark.parametrize(("rows", "out", "inp", "rank", "bias"),
                         [(1, 1536, 576, 340, False), (8, 576, 1536, 340, True), (3, 7, 13, 5, True),
                          (16, 192, 576, 100, False), (5, 8, 9, 8, False), (2, 33, 17, 1, True)])
def test_pivoted_layer_in_one_call_matches_float64(fresh_build, rows, out, inp, rank, bias):
    """Gather, coupling, left and bias in C: every tile remainder, one column to couple, rank 1."""
    module = _int8_module(out, inp, rank, bias=bias, seed=rows + out + inp)
    x = torch.randn(rows, inp)
    with torch.no_grad():
        y = native.int8_pivoted_gemv(x, module.permutation, module.coupling_q, module.coupling_scale,
                                     module.left_q, module.left_scale, module.bias)
        expected = _pivoted_reference(module, x)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        module.kernel = "dequant_serial"  # the torch path of the same module: same numbers
        torch.testing.assert_close(y, module(x), rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_compiler
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("target", ["-march=x86-64-v4", "-march=x86-64-v3", "-march=x86-64"])
def test_pivoted_layer_on_every_path(fresh_build, target):
    functions = _built_for(target)
    module = _int8_module(37, 53, 21, bias=True, seed=3)
    x, y = torch.randn(5, 53), torch.empty(5, 37)
    work = torch.empty(5 * 53)
    expected = _pivoted_reference(module, x).detach()
    for threads in (1, 2):
        status = functions.int8_pivoted_gemv(
            x.data_ptr(), module.permutation.data_ptr(), module.coupling_q.data_ptr(),
            module.coupling_scale.data_ptr(), module.left_q.data_ptr(), module.left_scale.data_ptr(),
            module.bias.data_ptr(), work.data_ptr(), y.data_ptr(), 5, 37, 53, 21, threads)
        assert status == 0
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_compiler
def test_pivoted_call_refuses_wrong_buffers_and_a_damaged_permutation(fresh_build):
    module = _int8_module(12, 10, 4, bias=True, seed=5)
    good = [torch.randn(2, 10), module.permutation, module.coupling_q, module.coupling_scale,
            module.left_q, module.left_scale, module.bias.detach()]
    for index, bad in [(0, torch.randn(2, 9)), (0, torch.randn(2, 10).double()), (1, module.permutation[:9]),
                       (1, module.permutation.int()), (2, module.coupling_q[:, :5]), (3, module.coupling_scale[:3]),
                       (4, module.left_q.float()), (5, module.left_scale[:11]), (6, torch.randn(11))]:
        args = list(good)
        args[index] = bad
        with pytest.raises(ValueError, match="int8_pivoted_gemv needs"):
            native.int8_pivoted_gemv(*args)
    damaged = module.permutation.clone()
    damaged[3] = 10  # one past the last column
    with pytest.raises(ValueError, match="outside"):
        native.int8_pivoted_gemv(good[0], damaged, *good[2:])


@needs_compiler
@pytest.mark.parametrize(("storage", "call"), [("pivoted", "int8_pivoted_gemv"), ("factored", "int8_factored_gemv")])
def test_int8_module_decodes_in_one_c_call_and_leaves_prefill_and_gradients_to_torch(fresh_build, monkeypatch,
                                                                                     storage, call):
    module = _int8_module(24, 20, 6, bias=True, seed=7, storage=storage)
    calls = []
    real = getattr(native, call)
    monkeypatch.setattr(native, call, lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    x = torch.randn(2, 3, 20)
    with torch.no_grad():
        decode = module(x)  # 6 rows: C
        module(torch.randn(runtime.SERIAL_ROWS + 1, 20))  # prefill-sized: torch
        module.kernel = "dequant_serial"  # the torch path of the same module: same numbers
        torch.testing.assert_close(decode, module(x), rtol=1e-5, atol=1e-5)
        module.kernel = "auto"
    assert calls == [(6, 20)] and decode.shape == (2, 3, 24)
    x = torch.randn(3, 20, requires_grad=True)  # a gradient to carry back: torch, which has autograd
    module(x).sum().backward()
    assert calls == [(6, 20)] and x.grad is not None and module.bias.grad is not None
    module.bias.grad = None
    module(torch.randn(3, 20)).sum().backward()  # C for the matrices, the trained bias after it
    assert calls == [(6, 20), (3, 20)]
    torch.testing.assert_close(module.bias.grad, torch.full((24,), 3.0))


def _factored_args(module: LowRankLinear, x: torch.Tensor) -> tuple:
    bias = None if module.bias is None else module.bias.detach()
    return x, module.right_q, module.right_scale, module.left_q, module.left_scale, bias


@needs_compiler
@pytest.mark.parametrize(("rows", "out", "inp", "rank", "bias"),
                         [(1, 576, 576, 172, False), (8, 576, 1536, 251, True), (3, 7, 13, 5, True),
                          (2, 33, 17, 1, True)])
def test_factored_layer_in_one_call_is_two_gemvs_and_an_add(fresh_build, rows, out, inp, rank, bias):
    """The same bits as the two calls it replaces (and the add of the bias after them)."""
    module = _int8_module(out, inp, rank, bias=bias, seed=rows + out, storage="factored")
    x = torch.randn(rows, inp)
    middle = native.int8_gemv(x, module.right_q, module.right_scale)
    two_calls = native.int8_gemv(middle, module.left_q, module.left_scale)
    two_calls = two_calls if module.bias is None else two_calls + module.bias.detach()
    for threads in (None, 1, 2):
        assert torch.equal(native.int8_factored_gemv(*_factored_args(module, x), threads=threads), two_calls)


@needs_compiler
def test_factored_call_refuses_wrong_buffers(fresh_build):
    module = _int8_module(12, 10, 4, bias=True, seed=5, storage="factored")
    good = list(_factored_args(module, torch.randn(2, 10)))
    for index, bad in [(0, torch.randn(2, 9)), (0, torch.randn(2, 10).double()), (0, torch.randn(10)),
                       (1, module.right_q[:, :9]), (2, module.right_scale[:3]), (3, module.left_q.float()),
                       (3, module.left_q[:, :3]), (4, module.left_scale[:11]), (5, torch.randn(11))]:
        args = list(good)
        args[index] = bad
        with pytest.raises(ValueError, match="int8_factored_gemv needs"):
            native.int8_factored_gemv(*args)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 8, 13])
def test_threads_share_the_rows_and_give_the_same_bits(fresh_build, rows):
    """Each thread writes its own output rows: any thread count, the same numbers to the bit."""
    x, q, scale, _ = _case(rows, 1537, 576, seed=rows)
    one = native.int8_gemv(x, q, scale, threads=1)
    for threads in (2, 3):
        assert torch.equal(native.int8_gemv(x, q, scale, threads=threads), one)
    module = _int8_module(1536, 576, 300, bias=True, seed=rows)
    x = torch.randn(rows, 576)
    args = (x, module.permutation, module.coupling_q, module.coupling_scale, module.left_q,
            module.left_scale, module.bias.detach())
    assert torch.equal(native.int8_pivoted_gemv(*args, threads=2), native.int8_pivoted_gemv(*args, threads=1))


@needs_compiler
def test_the_kernel_shares_torchs_openmp_runtime(fresh_build, monkeypatch):
    """One libgomp in the process (torch's): the kernel's threads are torch's pool, not a second one."""
    assert native.gemv_available()
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("no /proc/self/maps")
    gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, gomp
    monkeypatch.setattr(native, "_THREADS_SLEEP", False)
    assert native.gemv_threads(native.PARALLEL_MIN_BYTES - 1) == 1
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.gemv_threads(native.PARALLEL_MIN_BYTES) == (2 if native._parallel_build() else 1)
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(native, "_THREADS_SLEEP", True)
    assert native.gemv_threads(10**9) == 1


@needs_compiler
def test_a_compiler_without_openmp_gives_a_one_thread_build(fresh_build, monkeypatch):
    real = native.build

    def no_openmp(source, compiler, target=native.TARGET, *, openmp=True):
        if openmp:
            raise subprocess.CalledProcessError(1, [compiler, "-fopenmp"], stderr=b"unsupported option '-fopenmp'")
        return real(source, compiler, target, openmp=False)

    monkeypatch.setattr(native, "build", no_openmp)
    monkeypatch.setattr(native, "_THREADS_SLEEP", False)
    assert native.gemv_available() and not native._parallel_build()
    assert native.gemv_threads(10**9) == 1
    x, q, scale, expected = _case(3, 300, 200, seed=4)
    torch.testing.assert_close(native.int8_gemv(x, q, scale, threads=2).double(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())
