"""Issue 12: the best training-free configuration (``make demo``'s) streamed block by block.

``make demo`` compresses SmolLM2-135M with the allocated pivoted recipe at 0.8 and ``error_blend``
0.25, which tracks the original model's hidden states beside the compressed model's. This runs
that command twice, each in its own process under ``/usr/bin/time -v`` on one thread: in memory
(``--no-stream``) and block by block from the safetensors file (``--stream``), then compares the
two checkpoints tensor by tensor and their ``compression_config``:

    python experiments/streaming_blend.py --out runs/streaming_blend

Results: ``experiments/results/streaming/blend.json`` (wall and CPU time, maximum RSS, whether
every tensor is equal, the largest difference if not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from streaming_memory import time_v

from svdcompress.provenance import write_results

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "experiments" / "results" / "allocation" / "analysis" / "allocation-p0.80-pivoted.json"
RESULTS = ROOT / "experiments" / "results" / "streaming" / "blend.json"


def _command(out: Path, stream: bool) -> list[str]:
    return [str(Path(sys.executable).with_name("svdcompress")), "--threads", "1", "compress", "smollm2-135m",
            "--recipe", str(RECIPE), "--error-blend", "0.25", "--windows", "64", "--seq-len", "512",
            "--stream" if stream else "--no-stream", "--out", str(out), "--overwrite"]


def _timed(command: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v; its maximum RSS, wall and CPU seconds."""
    with log.open("w") as handle:
        subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT, check=True)
    timed = time_v(log.read_text())
    return {"command": " ".join(command), "wall_seconds": timed["wall_seconds"],
            "cpu_seconds": timed["cpu_seconds"], "max_rss_mib": timed["max_rss_mib"]}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _compare(memory: Path, streamed: Path) -> dict:
    a, b = _tensors(memory), _tensors(streamed)
    differing = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    largest = max((float((a[k].double() - b[k].double()).abs().max()) for k in differing
                   if k in b and a[k].shape == b[k].shape), default=0.0)
    config_a = json.loads((memory / "config.json").read_text())["compression_config"]
    config_b = json.loads((streamed / "config.json").read_text())["compression_config"]
    # the command differs by --stream/--no-stream and the folder: every other key should not
    return {"tensors": len(a), "same_names": a.keys() == b.keys(), "differing_tensors": differing,
            "largest_difference": largest,
            "differing_config_keys": sorted(k for k in config_a.keys() | config_b.keys()
                                            if config_a.get(k) != config_b.get(k))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/streaming_blend"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, stream in [("memory", False), ("streaming", True)]:
        runs[name] = _timed(_command(args.out / name, stream), args.out / f"{name}.log")
        print(name, runs[name])
    comparison = _compare(args.out / "memory", args.out / "streaming")
    print(comparison)
    write_results(RESULTS, {"recipe": str(RECIPE.relative_to(ROOT)), "error_blend": 0.25, "windows": 64,
                            "seq_len": 512, "threads": 1, "runs": runs, "comparison": comparison})


if __name__ == "__main__":
    main()
