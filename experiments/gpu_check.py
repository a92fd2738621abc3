"""Issues 12 and 14 on a lent GPU: the prepared script, every stage written to ``--out`` as it ends.

No session has been lent a GPU so far; this is the one command to run when one is (device time is
minutes). Stages, in order; each records its own numbers or its error, and a stage that would start
after ``--budget`` seconds is skipped, so a short lease still brings back what finished:

- ``env``: torch and CUDA versions, the device, its memory.
- ``compress``: SmolLM2 whiten 0.8 (pivoted, the CLI's plain default) on the GPU with 64 × 512
  calibration tokens: wall time, peak GPU memory, and one plain forward pass over the same tokens
  on the same GPU (the issue-12 ratio).
- ``eval``: held-out perplexity of that model and of dense on the GPU (32 × 512, wiki and sotu).
- ``recover``: ``--recover-steps`` recovery steps (batch 4 × 512) on the GPU: steps/s, peak memory.
- ``speed``: ``svdcompress bench`` (fresh processes) of dense and the compressed model on the GPU in
  bfloat16 and float16: prefill and decode tokens/s, batch 1 and 8.
- ``stream``: the TinyLlama-1.1B shape (``--stream-shape``; random weights, built here) compressed
  block by block through the GPU: wall time, seconds per block, peak GPU memory.

    python experiments/gpu_check.py --out $OUT/gpu_check.json                  # on the GPU machine
    python experiments/gpu_check.py --device cpu --smoke --out runs/gpu_check_smoke.json   # test here

``--smoke`` shrinks every stage (few windows, short sequences, 2 recovery steps, a 2-block
synthetic model) so the script's own path can be checked on the CPU before device time is spent.
SmolLM2 must be in the cache (``$SVDCOMPRESS_CACHE``); the GPU machine has no network, so its
wheel travels with the command (BENCHMARKS.md, issue 12, "prepared for a GPU").
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import traceback
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch

from svdcompress import api
from svdcompress.config import WhitenConfig
from svdcompress.datasets import token_windows
from svdcompress.devices import resolve_device
from svdcompress.provenance import write_results
from svdcompress.synthetic import SHAPES, make_synthetic
from svdcompress.zoo import load_model

logger = logging.getLogger("gpu_check")
MODEL = "smollm2-135m"


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu_check"), help="checkpoints go here")
    parser.add_argument("--budget", type=float, default=480, help="seconds after which no stage starts")
    parser.add_argument("--recover-steps", type=int, default=50)
    parser.add_argument("--stream-shape", default="tinyllama-1.1b", help="a svdcompress.synthetic shape")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on the CPU")
    parser.add_argument("--stages", nargs="+", default=["env", "compress", "eval", "recover", "speed", "stream"])
    return parser.parse_args()


class _Peak:
    """Peak GPU memory of what runs inside (MiB); None on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20


def _sizes(args) -> dict:
    if args.smoke:
        return {"windows": 4, "seq_len": 64, "eval_windows": 2, "steps": 2, "bench_tokens": 16, "layers": 2}
    return {"windows": 64, "seq_len": 512, "eval_windows": 32, "steps": args.recover_steps, "bench_tokens": 512,
            "layers": None}


def _env(args, device, sizes) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}")
    return info


def _forward_seconds(device, sizes) -> float:
    """One plain forward pass over the calibration tokens (batch 4), the compression's yardstick."""
    model, tokenizer = load_model(MODEL, device=device)
    windows = token_windows(tokenizer, "wiki", "calib", seq_len=sizes["seq_len"], n_samples=sizes["windows"])
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in windows.split(4):
            model(input_ids=batch.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _compress(args, device, sizes) -> dict:
    out = args.work / "w08"
    with _Peak(device) as peak:
        summary = api.compress(MODEL, out, WhitenConfig(param_ratio=0.8, storage="pivoted"),
                               windows=sizes["windows"], seq_len=sizes["seq_len"], device=str(device),
                               overwrite=True)
    forward = _forward_seconds(device, sizes)
    return {"checkpoint": str(out), "wall_seconds": summary["wall_seconds"], "peak_gpu_mib": peak.mib,
            "forward_seconds": forward, "ratio_to_forward": summary["wall_seconds"] / forward,
            "target_param_ratio": summary["target_param_ratio"]}


def _eval(args, device, sizes) -> dict:
    result = api.evaluate(str(args.work / "w08"), reference=MODEL, windows=sizes["eval_windows"],
                          seq_len=sizes["seq_len"], device=str(device), facts=0, second_domain="sotu")
    reference = result["reference"]
    return {name: {"model": result[key]["perplexity"], "dense": reference[key]["perplexity"],
                   "ratio": result[key]["perplexity"] / reference[key]["perplexity"]}
            for name, key in (("wiki", "perplexity"), ("sotu", "second_domain"))}


def _recover(args, device, sizes) -> dict:
    with _Peak(device) as peak:
        start = time.perf_counter()
        summary = api.recover(args.work / "w08", steps=sizes["steps"], batch_size=4, seq_len=sizes["seq_len"],
                              device=str(device), out=args.work / "w08-rec", overwrite=True,
                              checkpoint_every=10**6, base=MODEL)
        wall = time.perf_counter() - start
    return {"steps": sizes["steps"], "wall_seconds": wall, "steps_per_second": sizes["steps"] / wall,
            "peak_gpu_mib": peak.mib, "summary": summary}


def _speed(args, device, sizes) -> dict:
    tokens = sizes["bench_tokens"]
    return {dtype: api.bench([str(args.work / "w08")], against=MODEL, device=str(device), dtype=dtype,
                             prefill_tokens=tokens, new_tokens=32 if not args.smoke else 3, runs=3, rounds=2)
            for dtype in ("bfloat16", "float16")}


def _stream(args, device, sizes) -> dict:
    source = args.work / args.stream_shape
    overrides = {"num_hidden_layers": sizes["layers"]} if sizes["layers"] else {}
    if not source.is_dir():
        make_synthetic(args.stream_shape, source, **overrides)
    blocks = sizes["layers"] or SHAPES[args.stream_shape]["num_hidden_layers"]
    with _Peak(device) as peak:
        summary = api.compress(str(source), args.work / f"{args.stream_shape}-w08", WhitenConfig(param_ratio=0.8),
                               windows=16 if not args.smoke else 2, seq_len=sizes["seq_len"],
                               device=str(device), overwrite=True, stream=True)
    return {"blocks": blocks, "wall_seconds": summary["wall_seconds"],
            "seconds_per_block": summary["wall_seconds"] / blocks, "peak_gpu_mib": peak.mib,
            "peak_rss_mb": summary["peak_rss_mb"]}


STAGES = {"env": _env, "compress": _compress, "eval": _eval, "recover": _recover, "speed": _speed,
          "stream": _stream}


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device, sizes, start = resolve_device(args.device), _sizes(args), time.perf_counter()
    results = {"settings": {**vars(args), "out": str(args.out), "work": str(args.work)}, "stages": {}}
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.stages:
        if time.perf_counter() - start > args.budget:
            results["stages"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        began = time.perf_counter()
        try:
            results["stages"][name] = {**STAGES[name](args, device, sizes),
                                       "stage_seconds": time.perf_counter() - began}
        except Exception as err:  # one stage's failure must not cost the others' numbers
            results["stages"][name] = {"error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc()[-2000:]}
        logger.info("%s: %s", name, json.dumps(results["stages"][name], default=str)[:400])
        write_results(args.out, json.loads(json.dumps(results, default=str)))
    if args.smoke:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
