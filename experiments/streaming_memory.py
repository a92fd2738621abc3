"""Issue 12: peak memory of streaming compression vs the in-memory path, on synthetic models.

Each measurement runs in its own process under ``/usr/bin/time -v`` (maximum resident set size of
the whole process, as the kernel counts it), so one run's memory never hides in another's:

    python experiments/streaming_memory.py stream  MODEL --method whiten --blocks 2 --out DIR
    python experiments/streaming_memory.py memory  MODEL --method whiten --blocks 1
    python experiments/streaming_memory.py sample PID NAME  # RSS of a running worker, every 5 s
    python experiments/streaming_memory.py collect          # logs -> results JSON (older entries kept)

``stream`` compresses the first ``--blocks`` decoder blocks block by block (the run stops there; a
rerun without ``--blocks`` would resume and finish it). ``memory`` loads the whole model as
``svdcompress compress`` does and compresses the targets of the first ``--blocks`` blocks only: its
peak holds the whole model plus one block's statistics, a lower bound for compressing all blocks.
Build the models first (never committed; runs/ is ignored by git):

    svdcompress make-synthetic --shape tinyllama-1.1b --out runs/streaming/tinyllama-1.1b
    svdcompress make-synthetic --shape llama-7b --out runs/streaming/llama-7b
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "runs" / "streaming" / "logs"
RESULTS = ROOT / "experiments" / "results" / "streaming" / "streaming_memory.json"


def _windows_file(args) -> Path:
    return LOGS / f"windows-{Path(args.model).name}-{args.windows}x{args.seq_len}.safetensors"


def _prepare_windows(args) -> None:
    """Tokenize the calibration text here, in the driver: reading the text corpus holds a few
    hundred MB that are no part of compression's footprint (the workers load the token ids)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from svdcompress.datasets import token_windows

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_positions = AutoConfig.from_pretrained(args.model).max_position_embeddings
    ids = token_windows(tokenizer, "wiki", "calib", seq_len=args.seq_len, n_samples=args.windows,
                        seed=0, max_positions=max_positions)
    save_file({"windows": ids}, _windows_file(args))


def _calibration(args):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from svdcompress.calibration import Calibration

    ids = load_file(_windows_file(args))["windows"]
    source = f"wiki:calib seq_len={args.seq_len} n={args.windows} seed=0"
    return Calibration(ids, source=source), AutoTokenizer.from_pretrained(args.model)


def _config(args):
    import svdcompress as sc

    cls = {"svd": sc.SVDConfig, "whiten": sc.WhitenConfig}[args.method]
    if args.method == "svd":
        return cls(param_ratio=args.param_ratio, calib_batch_size=args.batch)
    return cls(param_ratio=args.param_ratio, calib_batch_size=args.batch,
               calibration_stream=args.calibration_stream)


def worker_stream(args) -> dict:
    from svdcompress.streaming import compress_streaming, work_folder

    calibration, tokenizer = (None, None) if args.method == "svd" else _calibration(args)
    start = time.perf_counter()
    report = compress_streaming(args.model, _config(args), args.out, calibration=calibration,
                                tokenizer=tokenizer, overwrite=True, stop_after=args.blocks)
    done = len(list(work_folder(args.out).glob("block-*.json"))) if report is None else None
    return {"wall_seconds": time.perf_counter() - start, "blocks_done": done,
            "finished": report is not None}


def worker_memory(args) -> dict:
    from svdcompress.compress import compress_
    from svdcompress.zoo import load_model

    calibration = None if args.method == "svd" else _calibration(args)[0]
    start = time.perf_counter()
    model, _ = load_model(str(args.model))
    loaded = time.perf_counter() - start
    blocks = "|".join(str(i) for i in range(args.blocks))
    config = _config(args).replace(targets=(rf"model\.layers\.({blocks})\..*",))
    report = compress_(model, config, calibration)
    return {"wall_seconds": time.perf_counter() - start, "load_seconds": loaded,
            "modules": len(report.modules)}


def _measure(args) -> None:
    """Run this script's worker under /usr/bin/time -v and keep its log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    name = f"{args.mode}-{Path(args.model).name}-{args.method}-{args.blocks}blocks"
    name += f"-{args.tag}" if args.tag else ""  # a resumed run keeps the first run's log
    worker = [sys.executable, __file__, args.mode, str(args.model), "--worker", "--method", args.method,
              "--blocks", str(args.blocks), "--windows", str(args.windows), "--seq-len", str(args.seq_len),
              "--param-ratio", str(args.param_ratio), "--batch", str(args.batch),
              "--calibration-stream", args.calibration_stream]
    if args.out is not None:
        worker += ["--out", str(args.out)]
    if args.method != "svd":
        _prepare_windows(args)
    log = LOGS / f"{name}.log"
    with open(log, "w") as handle:
        handle.write(json.dumps({"command": " ".join(sys.argv), "worker": worker}) + "\n")
        handle.flush()
        done = subprocess.run(["/usr/bin/time", "-v", *worker], stdout=handle, stderr=subprocess.STDOUT,
                              check=False)
    print(f"{name}: exit {done.returncode}, log {log}")


def sample(pid: int, name: str) -> None:
    """Record the worker's RSS every 5 s (``NAME.rss``): the peak so far of a run that may not end."""
    import psutil

    process, start = psutil.Process(pid), time.time()
    with open(LOGS / f"{name}.rss", "a") as handle:  # not the log: the worker writes there
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                break
            handle.write(f"SAMPLE {time.time() - start:.0f} s {rss / 2**20:.0f} MB\n")
            handle.flush()
            time.sleep(5)


def time_v(text: str) -> dict:
    """What ``/usr/bin/time -v`` printed into ``text``: maximum RSS (MiB), user + system CPU seconds,
    wall clock as printed (h:mm:ss or m:ss) and in seconds; None where it printed nothing."""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    return {"max_rss_mib": int(peak.group(1)) / 1024 if peak else None,
            "cpu_seconds": sum(cpu) if cpu else None,
            "wall_clock": wall.group(1) if wall else None,
            "wall_seconds": sum(float(part) * 60**i for i, part in enumerate(reversed(wall.group(1).split(":"))))
            if wall else None}


def _parse(log: Path) -> dict:
    text = log.read_text()
    sampled = log.with_suffix(".rss").read_text() if log.with_suffix(".rss").is_file() else ""
    samples = [int(mb) for mb in re.findall(r"^SAMPLE \d+ s (\d+) MB$", sampled, re.MULTILINE)]
    header = json.loads(text.splitlines()[0])
    timed = time_v(text)
    result = re.search(r"^RESULT (.*)$", text, re.MULTILINE)
    # Older logs lack the CPU seconds and the RSS after the block (trimmed heap): None there.
    pattern = r"block (\d+)/\d+ done in ([\d.]+) s(?:, ([\d.]+) CPU s)? \(peak RSS (\d+) MB(?:, now (\d+) MB)?\)"
    blocks = [{"block": int(b), "seconds": float(s), "cpu_seconds": float(c) if c else None,
               "peak_rss_mb": float(r), "rss_after_mb": float(now) if now else None}
              for b, s, c, r, now in re.findall(pattern, text)]
    return {"log": str(log.relative_to(ROOT)), "command": header["command"],
            "max_rss_mb": round(timed["max_rss_mib"], 1) if timed["max_rss_mib"] is not None else None,
            "cpu_seconds": round(timed["cpu_seconds"], 1) if timed["cpu_seconds"] is not None else None,
            "wall_clock": timed["wall_clock"],
            "killed": "Command terminated by signal" in text,
            "result": json.loads(result.group(1)) if result else None, "blocks": blocks,
            "sampled_max_rss_mb": max(samples) if samples else None,
            "sampled_seconds": int(re.findall(r"^SAMPLE (\d+) s", sampled, re.MULTILINE)[-1]) if samples else None}


def collect() -> None:
    from svdcompress.provenance import write_results

    # Runs whose logs are gone (runs/ is never committed; another machine) keep their recorded entry.
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else {}
    runs.update({log.stem: _parse(log) for log in sorted(LOGS.glob("*.log"))})
    write_results(RESULTS, {"runs": runs})
    for name, run in runs.items():
        print(f"{name}: max RSS {run['max_rss_mb']} MB, {run['result']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["stream", "memory", "sample", "collect"])
    parser.add_argument("model", type=Path, nargs="?", help="model folder (sample: PID NAME)")
    parser.add_argument("name", nargs="?", help="sample: the run's log name")
    parser.add_argument("--method", default="whiten", choices=["svd", "whiten"])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calibration-stream", choices=["compressed", "original"], default="compressed",
                        help="whiten: original = one-pass calibration (issue 12)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tag", help="suffix of the log's name, to tell runs of the same shape apart")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "collect":
        collect()
        return
    if args.mode == "sample":
        sample(int(str(args.model)), args.name)
        return
    if not args.worker:
        _measure(args)
        return
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = (worker_stream if args.mode == "stream" else worker_memory)(args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
