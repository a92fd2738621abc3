"""The fused int8 GEMV (``kernels/int8_gemv.c``), compiled for this machine on first use.

torch has no CPU op that multiplies float32 activations by int8 weights without converting the
weights first (``_weight_int8pack_mm``'s float32 path is several times slower than a cast and a
matmul, BENCHMARKS.md issue 4), and at decode sizes the conversion is the cost. The kernel widens
each int8 weight vector in registers and uses it at once, so the weights are read once, as bytes.

It is built with the system C compiler (``$CC``, else ``cc``) with ``-O3 -march=native
-fopenmp`` into the cache (``$SVDCOMPRESS_CACHE/native``), keyed by the source, the flags, the
compiler and the CPU, written to a temporary name and renamed, and loaded with ctypes. Its OpenMP
runtime is the ``libgomp.so.1`` torch has already loaded, so it shares torch's thread pool and
thread count (:func:`gemv_threads`); a compiler without OpenMP gives a one-thread build. Without
a compiler, or if the build fails, the callers fall back to the torch kernels (one warning per
process); ``SVDCOMPRESS_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from svdcompress.fetch import cache_dir

__all__ = ["PARALLEL_MIN_BYTES", "TARGET", "build", "gemv_available", "gemv_threads", "int8_factored_gemv",
           "int8_gemv", "int8_pivoted_gemv", "load", "source"]

logger = logging.getLogger(__name__)
_FLAGS = ("-O3", "-shared", "-fPIC")
TARGET = "-march=native"  # the AVX-512, AVX2 or plain C path, as this CPU allows


def _cpu_id() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else platform.processor()
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), text)
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def build(source: bytes, compiler: str, target: str = TARGET, *, openmp: bool = True) -> Path:
    """The shared library of ``source`` for ``target`` (a -march flag), built once into the cache;
    ``openmp``: with ``-fopenmp`` (its ``libgomp.so.1`` is the one torch has already loaded)."""
    flags = (*_FLAGS, target, *(("-fopenmp",) if openmp else ()))
    key = hashlib.sha256(source + compiler.encode() + " ".join(flags).encode()).hexdigest()[:12]
    library = cache_dir() / "native" / f"int8_gemv-{key}-{_cpu_id()}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        src, out = Path(tmp) / "int8_gemv.c", Path(tmp) / library.name
        src.write_bytes(source)
        subprocess.run([compiler, *flags, "-o", str(out), str(src)], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, library)  # another process may have built the same file: same bytes
    return library


def source() -> bytes:
    """The kernel's C source, as the package ships it."""
    return resources.files("svdcompress.kernels").joinpath("int8_gemv.c").read_bytes()


def load(library: Path) -> ctypes.CDLL:
    """A built library, its functions (``int8_gemv``, ``int8_factored_gemv``, ``int8_pivoted_gemv``,
    ``int8_gemv_parallel``)
    typed for ctypes."""
    functions = ctypes.CDLL(str(library))
    functions.int8_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    functions.int8_gemv.restype = None
    functions.int8_pivoted_gemv.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    functions.int8_pivoted_gemv.restype = ctypes.c_int
    functions.int8_factored_gemv.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
    functions.int8_factored_gemv.restype = None
    functions.int8_gemv_parallel.restype = ctypes.c_int
    return functions


@functools.cache
def _library():
    if os.environ.get("SVDCOMPRESS_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    try:
        if compiler is None:
            raise FileNotFoundError("no C compiler (cc, or $CC) on PATH")
        try:
            return load(build(source(), compiler))
        except subprocess.CalledProcessError as err:  # a compiler without OpenMP: one thread
            logger.info("building the int8 kernel with OpenMP failed (%s); building it for one thread",
                        (err.stderr or b"").decode(errors="replace")[:200])
            return load(build(source(), compiler, openmp=False))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        logger.warning("the fused int8 kernel is unavailable (%s%s); using torch's kernels instead",
                       err, f": {detail.decode(errors='replace')[:300]}" if detail else "")
        return None


def gemv_available() -> bool:
    """Whether the fused kernel is built and loaded (building it on first call)."""
    return _library() is not None


# Where idle OpenMP threads sleep between parallel regions, waking one costs more than splitting a
# decode-sized GEMV saves (tens of µs a region on our 2-core VM, BENCHMARKS.md issue 14): one thread.
_THREADS_SLEEP = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
PARALLEL_MIN_BYTES = 131072  # int8 weights below this: one thread (k/v at 0.6, 67 KB, ran 15.6 → 27.8 µs on two)


def gemv_threads(weight_bytes: int) -> int:
    """How many threads the kernel uses for int8 weights of ``weight_bytes``: torch's intra-op
    thread count, or 1 for small weights, where idle threads sleep, or in a build without OpenMP."""
    if _THREADS_SLEEP or weight_bytes < PARALLEL_MIN_BYTES or not _parallel_build():
        return 1
    return torch.get_num_threads()


@functools.cache
def _parallel_build() -> bool:
    return bool(_library().int8_gemv_parallel())


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """``x @ (q · scale[:, None])ᵀ`` for float32 CPU ``x`` (M, in), int8 ``q`` (out, in) and float32
    ``scale`` (out,), on ``threads`` threads (default :func:`gemv_threads`; the same numbers on any
    count). Call :func:`gemv_available` first."""
    # A C loop reads past the end of a wrong-sized buffer instead of raising: check here.
    # (is-comparisons and is_cpu: this runs twice per module per decoded token)
    if x.dtype is not torch.float32 or q.dtype is not torch.int8 or scale.dtype is not torch.float32 \
            or x.dim() != 2 or q.dim() != 2 or scale.dim() != 1 or x.shape[1] != q.shape[1] \
            or scale.shape[0] != q.shape[0] or not (x.is_cpu and q.is_cpu and scale.is_cpu):
        raise ValueError(f"int8_gemv needs float32 x (M, in), int8 q (out, in), float32 scale (out,) "
                         f"on the CPU; got x {x.dtype} {tuple(x.shape)}, q {q.dtype} {tuple(q.shape)}, "
                         f"scale {scale.dtype} {tuple(scale.shape)}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    _library().int8_gemv(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0], q.shape[0],
                         q.shape[1], gemv_threads(q.numel()) if threads is None else max(1, threads))
    return y


def _int8_matrix(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> bool:
    return (q.dtype is torch.int8 and scale.dtype is torch.float32 and q.shape == (rows, cols)
            and scale.shape == (rows,) and q.is_cpu and scale.is_cpu)


def _layer_shape(x: torch.Tensor, left_q: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, in, out, rank) of a fused layer call, or -1s where ``x`` or ``left`` is not 2-D."""
    if x.dim() == 2 and left_q.dim() == 2:
        return (*x.shape, *left_q.shape)
    return -1, -1, -1, -1


def _bias_fits(bias: torch.Tensor | None, out: int) -> bool:
    return bias is None or (bias.dtype is torch.float32 and bias.shape == (out,) and bias.is_cpu)


def _described(**tensors: torch.Tensor | None) -> dict:
    """Name -> (dtype, shape) of the tensors a refused call was given, for its error."""
    return {name: None if t is None else (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def int8_factored_gemv(x: torch.Tensor, right_q: torch.Tensor, right_scale: torch.Tensor,
                       left_q: torch.Tensor, left_scale: torch.Tensor, bias: torch.Tensor | None,
                       threads: int | None = None) -> torch.Tensor:
    """A factored-storage int8 layer in one call: ``left · (right · x) + bias`` for float32 CPU
    ``x`` (M, in), int8 ``right`` (r, in) and ``left`` (out, r) with float32 per-row scales, and
    ``bias`` (out,) or None; the same numbers as two :func:`int8_gemv` calls and an add, with one
    call's overhead (it is paid per module per decoded token). ``threads`` as in :func:`int8_gemv`,
    for both matrices. Call :func:`gemv_available` first."""
    # A C loop reads past the end of a wrong-sized buffer instead of raising: check here.
    rows, width, out, rank = _layer_shape(x, left_q)
    if not (x.dtype is torch.float32 and x.is_cpu and rows >= 0 and rank >= 1
            and _int8_matrix(right_q, right_scale, rank, width) and _int8_matrix(left_q, left_scale, out, rank)
            and _bias_fits(bias, out)):
        shapes = _described(x=x, right_q=right_q, right_scale=right_scale, left_q=left_q, left_scale=left_scale,
                            bias=bias)
        raise ValueError(f"int8_factored_gemv needs float32 x (M, in), int8 right (r, in) and left (out, r) "
                         f"with float32 row scales, float32 bias (out,) or None, all on the CPU; got {shapes}")
    # contiguous() may copy: the copies are named so that they outlive the call
    x, right_q, right_scale, left_q, left_scale = (t.contiguous() for t in (x, right_q, right_scale, left_q,
                                                                              left_scale))
    bias = None if bias is None else bias.contiguous()
    work = torch.empty(rows * rank, dtype=torch.float32)
    y = torch.empty(rows, out, dtype=torch.float32)
    right_threads, left_threads = ((gemv_threads(right_q.numel()), gemv_threads(left_q.numel())) if threads is None
                                   else (max(1, threads),) * 2)
    _library().int8_factored_gemv(
        x.data_ptr(), right_q.data_ptr(), right_scale.data_ptr(), left_q.data_ptr(), left_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), work.data_ptr(), y.data_ptr(), rows, out, width, rank,
        right_threads, left_threads)
    return y


def int8_pivoted_gemv(x: torch.Tensor, permutation: torch.Tensor, coupling_q: torch.Tensor,
                      coupling_scale: torch.Tensor, left_q: torch.Tensor, left_scale: torch.Tensor,
                      bias: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """A pivoted-storage int8 layer in one call: ``left · (x[:, p[:r]] + coupling · x[:, p[r:]]) +
    bias`` for float32 CPU ``x`` (M, in), the int64 column permutation ``p`` (in,), int8
    ``coupling`` (r, in − r) and ``left`` (out, r) with float32 per-row scales, and ``bias`` (out,)
    or None; ``threads`` as in :func:`int8_gemv`. Call :func:`gemv_available` first."""
    # A C loop reads past the end of a wrong-sized buffer instead of raising: check here.
    rows, width, out, rank = _layer_shape(x, left_q)
    if not (x.dtype is torch.float32 and x.is_cpu and rows >= 0
            and permutation.dtype is torch.int64 and permutation.shape == (width,) and permutation.is_cpu
            and 1 <= rank <= width and _int8_matrix(coupling_q, coupling_scale, rank, width - rank)
            and _int8_matrix(left_q, left_scale, out, rank) and _bias_fits(bias, out)):
        shapes = _described(x=x, permutation=permutation, coupling_q=coupling_q, coupling_scale=coupling_scale,
                            left_q=left_q, left_scale=left_scale, bias=bias)
        raise ValueError(f"int8_pivoted_gemv needs float32 x (M, in), int64 permutation (in,), int8 "
                         f"coupling (r, in - r) and left (out, r) with float32 row scales, float32 bias "
                         f"(out,) or None, all on the CPU; got {shapes}")
    # contiguous() may copy: the copies are named so that they outlive the call
    x, permutation, coupling_q, coupling_scale, left_q, left_scale = (t.contiguous() for t in (
        x, permutation, coupling_q, coupling_scale, left_q, left_scale))
    bias = None if bias is None else bias.contiguous()
    work = torch.empty(rows * width, dtype=torch.float32)
    y = torch.empty(rows, out, dtype=torch.float32)
    status = _library().int8_pivoted_gemv(
        x.data_ptr(), permutation.data_ptr(), coupling_q.data_ptr(), coupling_scale.data_ptr(),
        left_q.data_ptr(), left_scale.data_ptr(), None if bias is None else bias.data_ptr(),
        work.data_ptr(), y.data_ptr(), rows, out, width, rank,
        gemv_threads(coupling_q.numel() + left_q.numel()) if threads is None else max(1, threads))
    if status != 0:
        raise ValueError(f"int8_pivoted_gemv: the permutation holds an index outside [0, {width}); "
                         "the checkpoint is damaged (re-create it with svdcompress compress)")
    return y
