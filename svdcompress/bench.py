"""Speed and memory of models side by side: prefill and decode tokens/s, peak RSS, bytes, load time.

How a measurement is made, so the numbers can be trusted:

- Each model is measured in a **fresh Python process** (nothing inherited), so its peak RSS is its
  own and one model's allocations cannot pollute another's. With several models and ``rounds > 1``
  the processes alternate (A, B, A, B, ...), so both see the same background load on a shared
  machine; every timing is pooled over rounds and reported as median, min and max.
- Inputs are fixed token ids (``seed``), not text: speed does not depend on content, and the same
  ids go to every model. Decode is greedy ``generate`` forced to exactly ``new_tokens`` tokens;
  a logits processor timestamps every step, and decode tokens/s counts the steps after the first
  (the first step is the prompt's prefill). Prefill is one forward of ``prefill_tokens`` tokens
  (batch 1) that keeps only the last position's logits, as ``generate`` does.
- Every timed quantity gets ``warmup`` untimed runs, then ``runs`` timed runs, per process.
- Threads are set with ``torch.set_num_threads`` in the worker and reported, with the machine's
  load average before and after, because on a shared machine that explains the spread.
- Load time is loading the weights (no tokenizer). Bytes of weights count each stored tensor once
  (tied embeddings once). Packed copies a kernel makes at run time are not "bytes of weights" but
  they are in the RSS.
- Peak RSS is the worker's own high-water mark (``VmHWM``) after every run: compare that one.
  RSS right after loading understates a model, because safetensors files are memory-mapped and
  their pages come in on first use; ``rss_before_load_mb`` is Python + torch + transformers alone.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from svdcompress._openmp import OPENMP_ENVIRONMENT
from svdcompress.errors import ConfigError, SvdCompressError

__all__ = ["SCHEMA", "BenchError", "BenchSettings", "PeakRSS", "format_table", "measure_model", "run_bench", "weight_bytes"]


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 50 ms in a thread (the
    process's own high-water mark would include the runs before this one)."""

    def __enter__(self) -> PeakRSS:
        self._process, self._stop = psutil.Process(), threading.Event()
        self._start = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth_mb = (max(self._peak, self._process.memory_info().rss) - self._start) / 2**20


logger = logging.getLogger(__name__)

SCHEMA = "svdcompress.bench/1"


class BenchError(SvdCompressError):
    """A benchmark worker failed; the message carries its error or the end of its stderr."""


BENCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchSettings:
    prefill_tokens: int = 512  # prompt length of the prefill measurement (batch 1)
    prompt_tokens: int = 32  # prompt length before decoding
    new_tokens: int = 32  # tokens generated per decode run
    batch_sizes: tuple[int, ...] = (1, 8)  # decode batch sizes
    warmup: int = 1
    runs: int = 3
    rounds: int = 1  # fresh processes per model, alternating between models
    threads: int | None = None  # None: torch's default for this process
    kernel: str = "auto"  # int8 kernel (runtime.set_runtime), ignored for float models
    seed: int = 0
    device: str = "cpu"  # where the workers run the model (a concrete device, not "auto")
    dtype: str = "float32"  # the model's floats (float16/bfloat16: GPU comparisons; int8 codes stay int8)

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        for name in ("prefill_tokens", "prompt_tokens", "runs", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench {name}={getattr(self, name)} must be >= 1.")
        if self.new_tokens < 2:
            raise ConfigError("bench new_tokens must be >= 2: decode speed needs steps after the first.")
        if self.warmup < 0 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("bench warmup must be >= 0 and batch sizes >= 1.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"bench threads={self.threads} must be >= 1.")
        if self.dtype not in BENCH_DTYPES:
            raise ConfigError(f"bench dtype={self.dtype!r}: use one of {', '.join(BENCH_DTYPES)}.")


# --------------------------------------------------------------------------------------------------
# Inside one worker process


def _load(spec: str) -> nn.Module:
    """The model only (no tokenizer): compressed checkpoints through ``checkpoint.load``."""
    from transformers import AutoModelForCausalLM

    from svdcompress.checkpoint import is_compressed_checkpoint, load
    from svdcompress.zoo import resolve_model_spec

    source = resolve_model_spec(spec)
    if Path(source).is_dir() and is_compressed_checkpoint(source):
        model, _ = load(source, tokenizer=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model.eval()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of stored weights (each tensor once) and, for low-rank modules, against dense fp32."""
    from svdcompress.modules import LowRankLinear

    seen, total = set(), 0
    for tensor in model.state_dict().values():  # saved tensors only: no rotary caches
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    return {
        "total": total,
        "compressed_layers": sum(m.weight_bytes() for m in layers),
        "compressed_layers_dense_fp32": sum(4 * m.in_features * m.out_features for m in layers),
        "n_compressed_layers": len(layers),
    }


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def _repeat(fn, settings: BenchSettings) -> list[float]:
    for _ in range(settings.warmup):
        fn()
    return [fn() for _ in range(settings.runs)]


def _prefill_rate(model: nn.Module, ids: torch.Tensor) -> float:
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # what generate does at prefill; full logits would dominate
    start = time.perf_counter()
    model(input_ids=ids, **kwargs)
    _sync(ids.device)
    return ids.numel() / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    """GPU work is asynchronous: wait for it, or the clock measures only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(scores.device)
        self.stamps.append(time.perf_counter())
        return scores


def _decode_rate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    from transformers import LogitsProcessorList

    clock = _StepClock()
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
        pad_token_id=0,
    )
    steps = len(clock.stamps) - 1  # the first stamp comes after the prompt's prefill
    return ids.shape[0] * steps / (clock.stamps[-1] - clock.stamps[0])


def _peak_rss_mb() -> float:
    """This process's peak resident set size.

    Linux keeps ``ru_maxrss`` across ``exec``, so a worker started by a big parent would report
    the parent's peak; ``VmHWM`` belongs to the process's own address space, which ``exec`` renews.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


def _token_ids(model: nn.Module, batch: int, length: int, seed: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab - 1), vocab, (batch, length), generator=generator)


def _set_kernel(model: nn.Module, kernel: str) -> int:
    from svdcompress.runtime import set_runtime

    return set_runtime(model, kernel)


def measure_model(spec: str, settings: BenchSettings) -> dict[str, Any]:
    """Everything measured about one model in the current process (call it in a fresh one)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    process = psutil.Process()
    rss_start = process.memory_info().rss
    start = time.perf_counter()
    # floating tensors only: int8 codes and the int64 permutation stay as they are
    model = _load(spec).to(settings.device, getattr(torch, settings.dtype))
    load_seconds = time.perf_counter() - start
    rss_loaded = process.memory_info().rss
    n_int8 = _set_kernel(model, settings.kernel)
    result: dict[str, Any] = {"spec": spec, "load_seconds": load_seconds, "int8_modules": n_int8,
                              "weight_bytes": weight_bytes(model)}
    with torch.inference_mode():
        ids = _token_ids(model, 1, settings.prefill_tokens, settings.seed).to(settings.device)
        result["prefill_tokens_per_s"] = _repeat(lambda: _prefill_rate(model, ids), settings)
        for batch in settings.batch_sizes:
            ids = _token_ids(model, batch, settings.prompt_tokens, settings.seed + batch).to(settings.device)
            rates = _repeat(lambda ids=ids: _decode_rate(model, ids, settings.new_tokens), settings)
            result[f"decode_b{batch}_tokens_per_s"] = rates
    result.update({
        "rss_before_load_mb": rss_start / 2**20, "rss_after_load_mb": rss_loaded / 2**20,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
    })
    return result


# --------------------------------------------------------------------------------------------------
# The parent: fresh processes, pooling, ratios


def _in_fresh_process(spec: str, settings: BenchSettings) -> dict[str, Any]:
    """Run :func:`measure_model` in a new interpreter (``python -m svdcompress.bench``).

    A subprocess rather than multiprocessing: it works from any caller (a script without a
    ``__main__`` guard, a notebook, stdin) and inherits nothing but the environment.
    """
    with tempfile.TemporaryDirectory(prefix="svdcompress-bench-") as tmp:
        out = Path(tmp) / "result.json"
        request = json.dumps({"spec": spec, "settings": asdict(settings), "out": str(out)})
        proc = subprocess.run([sys.executable, "-m", "svdcompress.bench"], input=request,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise BenchError(f"benchmark worker for {spec!r} failed (exit {proc.returncode}):\n{tail}")
        reply = json.loads(out.read_text())
    if "error" in reply:
        raise BenchError(f"{spec}: {reply['error']}")
    return reply["result"]


def _worker_main() -> None:
    """Entry of the worker process: a JSON request on stdin, a JSON reply in the named file."""
    from svdcompress.errors import SvdCompressError

    request = json.loads(sys.stdin.read())
    settings = BenchSettings(**request["settings"])
    try:
        reply: dict[str, Any] = {"result": measure_model(request["spec"], settings)}
    except SvdCompressError as err:  # expected failures travel back as a message, not a traceback
        reply = {"error": str(err)}
    Path(request["out"]).write_text(json.dumps(reply))


_RATES = ("prefill_tokens_per_s",)
_SCALARS = ("load_seconds", "peak_rss_mb", "rss_after_load_mb", "rss_before_load_mb")


def _rate_keys(settings: BenchSettings) -> list[str]:
    return [*_RATES, *(f"decode_b{b}_tokens_per_s" for b in settings.batch_sizes)]


def _pool(spec: str, rounds: list[dict[str, Any]], settings: BenchSettings) -> dict[str, Any]:
    """One model's rounds combined: rates pooled over every run, scalars over rounds."""
    first = rounds[0]
    pooled = {"spec": spec, "weight_bytes": first["weight_bytes"],
              "int8_modules": first["int8_modules"], "threads": first["threads"]}
    for key in _rate_keys(settings):
        pooled[key] = _summary([v for r in rounds for v in r[key]])
    for key in _SCALARS:
        pooled[key] = _summary([r[key] for r in rounds])
    return pooled


def _ratios(model: dict[str, Any], reference: dict[str, Any], settings: BenchSettings) -> dict:
    ratios = {key: model[key]["median"] / reference[key]["median"] for key in _rate_keys(settings)}
    for key in ("peak_rss_mb", "load_seconds"):
        ratios[key] = model[key]["median"] / reference[key]["median"]
    ratios["weight_bytes"] = model["weight_bytes"]["total"] / reference["weight_bytes"]["total"]
    return ratios


def _host() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "loadavg": list(os.getloadavg()),
            # workers inherit the environment; busy-waiting OpenMP threads matter on a shared CPU
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "openmp_environment": OPENMP_ENVIRONMENT}


def run_bench(models: list[str], against: str | None = None,
              settings: BenchSettings | None = None, *, in_process: bool = False) -> dict[str, Any]:
    """Measure ``models`` (and ``against``, the reference) and return a JSON-ready result.

    ``in_process=True`` skips the fresh processes (for tests only: RSS is then shared).
    """
    settings = settings or BenchSettings()
    specs = [*models, *([against] if against else [])]
    if not models or len(set(specs)) != len(specs):
        raise ConfigError(f"bench needs distinct models, got {specs}.")
    from svdcompress.zoo import resolve_model_spec

    for spec in specs:  # fail on a bad spec now, not after minutes of measuring the others
        resolve_model_spec(spec)
    measure = measure_model if in_process else _in_fresh_process
    host_before = _host()
    raw: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
    for round_index in range(settings.rounds):
        for spec in specs:  # alternate, so background load hits every model alike
            logger.info("bench round %d/%d: %s", round_index + 1, settings.rounds, spec)
            raw[spec].append(measure(spec, settings))
    pooled = {spec: _pool(spec, rounds, settings) for spec, rounds in raw.items()}
    settings_dict = {**asdict(settings), "batch_sizes": list(settings.batch_sizes)}
    result = {"schema": SCHEMA, "settings": settings_dict, "host": host_before,
              "loadavg_after": list(os.getloadavg()), "against": against,
              "models": [pooled[s] for s in models],
              "reference": pooled[against] if against else None}
    if against:
        for entry in result["models"]:
            entry["ratio_to_reference"] = _ratios(entry, pooled[against], settings)
    return result


# --------------------------------------------------------------------------------------------------
# A plain-text table


def _fmt(stat: dict[str, Any], digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}–{stat['max']:.{digits}f}]"


def _rows(entry: dict[str, Any], settings: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("weights MB", f"{entry['weight_bytes']['total'] / 1e6:.1f}")]
    if entry["weight_bytes"]["n_compressed_layers"]:
        layers = entry["weight_bytes"]
        share = layers["compressed_layers"] / layers["compressed_layers_dense_fp32"]
        rows.append(("compressed layers vs dense fp32", f"{share:.1%}"))
    rows.append(("prefill tok/s", _fmt(entry["prefill_tokens_per_s"])))
    for batch in settings["batch_sizes"]:
        rows.append((f"decode b{batch} tok/s", _fmt(entry[f"decode_b{batch}_tokens_per_s"])))
    rows += [("peak RSS MB", _fmt(entry["peak_rss_mb"], 0)),
             ("load s", _fmt(entry["load_seconds"], 2))]
    return rows


_RATIO_ROWS = {"weights MB": "weight_bytes", "prefill tok/s": "prefill_tokens_per_s",
               "peak RSS MB": "peak_rss_mb", "load s": "load_seconds"}


def _ratio_cell(entry: dict[str, Any], label: str) -> str:
    ratios = entry.get("ratio_to_reference")
    if not ratios:
        return ""
    key = _RATIO_ROWS.get(label)
    if label.startswith("decode b"):
        key = f"decode_b{label.split()[1][1:]}_tokens_per_s"
    return f" (×{ratios[key]:.2f})" if key in ratios else ""


def _cell(entry: dict[str, Any], rows: dict[str, str], label: str) -> str:
    return rows[label] + _ratio_cell(entry, label) if label in rows else "–"


def format_table(result: dict[str, Any]) -> str:
    """Models side by side; each cell carries its ratio to the reference in brackets."""
    entries = ([result["reference"]] if result["reference"] else []) + result["models"]
    tables = [dict(_rows(e, result["settings"])) for e in entries]
    labels = list(dict.fromkeys(label for table in tables for label in table))  # ordered union
    grid = [["", *(Path(e["spec"]).name or e["spec"] for e in entries)]]
    grid += [[label, *(_cell(e, t, label) for e, t in zip(entries, tables, strict=True))]
             for label in labels]
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in grid]
    settings = result["settings"]
    lines.append(f"threads={entries[0]['threads']}  {settings.get('device', 'cpu')} {settings.get('dtype', 'float32')}"
                 f"  load average {result['host']['loadavg'][0]:.2f}"
                 f"→{result['loadavg_after'][0]:.2f}  median [min–max] over "
                 f"{result['settings']['rounds']} round(s) × {result['settings']['runs']} runs")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main()
