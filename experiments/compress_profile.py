"""Issue 12: where compression's time goes, against one plain forward pass over the same tokens.

In one process and at one thread count: loads SmolLM2-135M, times one plain forward pass (no
cache, no gradients, batches of ``--batch``) over the ``--windows`` × ``--seq-len`` calibration
tokens (wiki calib split, seed 0), then ``compress_`` with whiten at ``--param-ratio`` on the same
tokens, with its time split by phase. Wall and process CPU seconds both: on a shared machine the
ratio measured in one process is what counts, and CPU seconds say what the code costs.

Phases (each timed by wrapping the function that does it; the rest is "other"):

- ``statistics``: the calibration hooks (Gram matrices, absolute sums) inside the statistics pass;
- ``statistics_forward``: the rest of the statistics pass (the dense block's own forward);
- ``eigendecompositions``: ``linalg._gram_eigen`` (symmetrise + LAPACK eigh);
- ``svds``: every ``torch.linalg.svd``;
- ``factorize_other``: the rest of the whitened SVD (W·S, B·S⁻¹ products);
- ``report``: the per-module report (weight and output errors);
- ``propagation``: the second pass, the compressed block producing the next block's inputs (none
  with ``--calibration-stream original``: the statistics pass runs the whole dense block and its
  outputs are the next inputs).

    python experiments/compress_profile.py --threads 1 --name baseline --out experiments/results/compress_time
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from collections import defaultdict
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch

from svdcompress import calibration as calibration_module
from svdcompress import compress as compress_module
from svdcompress import linalg
from svdcompress.methods import whiten as whiten_method
from svdcompress.provenance import write_results

logger = logging.getLogger("compress_profile")


class PhaseClock:
    """Wall and CPU seconds per phase; a phase nested in another is subtracted from its parent."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            d_wall, d_cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.wall[name] += d_wall
            self.cpu[name] += d_cpu
            self.calls[name] += 1
            if self._stack:  # the parent's own time excludes this child's
                self.wall[self._stack[-1]] -= d_wall
                self.cpu[self._stack[-1]] -= d_cpu

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    @property
    def current(self) -> str | None:
        return self._stack[-1] if self._stack else None


def instrument(clock: PhaseClock, stack: contextlib.ExitStack) -> None:
    """Wrap the functions that do each phase (restored when ``stack`` closes)."""

    def patch(owner, attribute, replacement):
        original = getattr(owner, attribute)
        setattr(owner, attribute, replacement(original))
        stack.callback(setattr, owner, attribute, original)

    def timed_hooks(original):
        def forward_hooks(hooks, *, pre=False):
            if clock.current != "statistics_pass":  # hooks of the statistics pass only
                return original(hooks, pre=pre)
            return original({m: clock.wrap("statistics", h) for m, h in hooks.items()}, pre=pre)
        return forward_hooks

    def timed_block(original):
        def run_block(*args, **kwargs):
            name = "statistics_forward" if clock.current == "statistics_pass" else "propagation"
            with clock.phase(name):
                return original(*args, **kwargs)
        return run_block

    patch(calibration_module, "gather_block_stats", lambda f: clock.wrap("statistics_pass", f))
    patch(calibration_module, "run_block", timed_block)
    patch(calibration_module, "forward_hooks", timed_hooks)
    patch(whiten_method, "whitened_svd", lambda f: clock.wrap("factorize_other", f))
    patch(linalg, "_gram_eigen", lambda f: clock.wrap("eigendecompositions", f))
    patch(torch.linalg, "svd", lambda f: clock.wrap("svds", f))
    patch(compress_module.Compressor, "_report", lambda f: clock.wrap("report", f))


def forward_pass(model, windows: torch.Tensor, batch: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for chunk in windows.split(batch):
            model(input_ids=chunk, use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="calibration batch size, both passes")
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-stream", choices=["compressed", "original"], default="compressed",
                        help="original: one-pass calibration (each block run once, by its statistics pass)")
    parser.add_argument("--name", required=True, help="the results file's name (the code variant)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/compress_time"))
    parser.add_argument("--save-factors", type=Path, help="safetensors file of every module's factors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from svdcompress import WhitenConfig, compress_, load_model
    from svdcompress.calibration import Calibration
    from svdcompress.datasets import token_windows

    model, tokenizer = load_model(args.model)
    model.eval()
    tokens = token_windows(tokenizer, "wiki", "calib", seq_len=args.seq_len, n_samples=args.windows, seed=0)
    forward_wall, forward_cpu = forward_pass(model, tokens, args.batch)
    logger.info("forward pass: %.1f s wall, %.1f s CPU", forward_wall, forward_cpu)

    clock = PhaseClock()
    config = WhitenConfig(param_ratio=args.param_ratio, calib_batch_size=args.batch,
                          calibration_stream=args.calibration_stream)
    source = f"wiki:calib seq_len={args.seq_len} n={args.windows} seed=0"
    with contextlib.ExitStack() as stack:
        instrument(clock, stack)
        with clock.phase("other"):
            report = compress_(model, config, Calibration(tokens, source=source))
    compress_wall = sum(clock.wall.values())
    compress_cpu = sum(clock.cpu.values())
    phases = {name: {"wall_seconds": round(clock.wall[name], 2), "cpu_seconds": round(clock.cpu[name], 2),
                     "calls": clock.calls[name]} for name in sorted(clock.wall)}
    result = {
        "model": args.model, "threads": args.threads, "windows": args.windows, "seq_len": args.seq_len,
        "batch": args.batch, "param_ratio": args.param_ratio, "calibration_stream": args.calibration_stream,
        "forward": {"wall_seconds": round(forward_wall, 2), "cpu_seconds": round(forward_cpu, 2)},
        "compress": {"wall_seconds": round(compress_wall, 2), "cpu_seconds": round(compress_cpu, 2)},
        "ratio_wall": round(compress_wall / forward_wall, 3),
        "ratio_cpu": round(compress_cpu / forward_cpu, 3),
        "phases": phases,
        "mean_output_error": sum(m.output_error for m in report.modules) / len(report.modules),
        "target_param_ratio": report.target_param_ratio,
    }
    if args.save_factors is not None:
        from safetensors.torch import save_file

        from svdcompress.modules import LowRankLinear

        factors = {f"{name}.{part}": getattr(module, part).detach().contiguous()
                   for name, module in model.named_modules() if isinstance(module, LowRankLinear)
                   for part in ("left", "right")}
        args.save_factors.parent.mkdir(parents=True, exist_ok=True)
        save_file(factors, args.save_factors)
    path = write_results(args.out / f"{args.name}.json", result)
    print(f"compress_ {compress_wall:.1f} s wall = {result['ratio_wall']}x forward ({forward_wall:.1f} s); "
          f"CPU {compress_cpu:.1f} s = {result['ratio_cpu']}x ({forward_cpu:.1f} s) -> {path}")
    for name, phase in phases.items():
        print(f"  {name:22s} {phase['wall_seconds']:8.1f} s wall {phase['cpu_seconds']:8.1f} s CPU  ({phase['calls']} calls)")


if __name__ == "__main__":
    main()
