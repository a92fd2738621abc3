"""How OpenMP's idle threads wait, and what it does to dense and INT8 speed, idle and under load.

torch's CPU parallel regions hand work to OpenMP threads that sleep or spin between regions
(libgomp: ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``). Each setting runs in its own worker process
(libgomp reads the variables once, when torch loads it), on an idle machine and beside one
competing single-thread job (a float32 matmul loop this script starts), and measures dense
float32 and the given INT8 checkpoints at ``--threads``: prefill tokens/s (one forward of
``--prefill-tokens``) and greedy decode tokens/s at batch 1 and 8, with ``svdcompress.bench``'s
timing functions, the models interleaved within each round:

    python experiments/omp_wait.py smollm2-135m runs/speed/w06-int8 runs/speed/w06-int8-pivoted \\
        --out experiments/results/speed/omp_wait

Results: ``OUT/omp_wait.json`` (medians per setting, condition, model and quantity; ratios to dense
in the same worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # svdcompress's default until 2026-12-07
    "spin3000": {"GOMP_SPINCOUNT": "3000"},  # svdcompress's default since
    "libgomp-default": {},  # 300,000 spins
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def _worker(args) -> None:
    import torch  # first: libgomp reads its variables now, before svdcompress could set any

    from svdcompress.bench import _decode_rate, _load, _prefill_rate, _token_ids

    torch.set_num_threads(args.threads)
    models = {"dense": _load(args.dense), **{Path(c).name: _load(c) for c in args.compressed}}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            _prefill_rate(model, _token_ids(model, 1, 16, 0))
        for _ in range(args.rounds):
            for name, model in models.items():
                rates = samples[name]
                rates.setdefault("prefill", []).append(
                    _prefill_rate(model, _token_ids(model, 1, args.prefill_tokens, 0)))
                for batch in (1, 8):
                    rates.setdefault(f"decode_b{batch}", []).append(
                        _decode_rate(model, _token_ids(model, batch, 32, batch), args.new_tokens))
    print(json.dumps(samples))


def _measure(args, setting: str, loaded: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    load = subprocess.Popen([sys.executable, "-c", LOAD], env={**env, "OMP_NUM_THREADS": "1"}) if loaded else None
    try:
        command = [sys.executable, __file__, "--worker", args.dense, *args.compressed,
                   "--threads", str(args.threads), "--rounds", str(args.rounds),
                   "--prefill-tokens", str(args.prefill_tokens), "--new-tokens", str(args.new_tokens)]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        if load is not None:
            load.kill()
            load.wait()
    samples = json.loads(output.strip().splitlines()[-1])
    medians = {name: {q: statistics.median(v) for q, v in rates.items()} for name, rates in samples.items()}
    return {"samples": samples, "median_tokens_per_s": medians,
            "vs_dense": {name: {q: v / medians["dense"][q] for q, v in rates.items()}
                         for name, rates in medians.items() if name != "dense"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense")
    parser.add_argument("compressed", nargs="*")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--loaded-settings", nargs="+", choices=list(SETTINGS),
                        default=["passive", "spin3000", "libgomp-default"],
                        help="settings measured beside the competing thread (active spins longer than "
                             "libgomp's default, whose decode there was ~15x slower than passive)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/speed/omp_wait"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    from svdcompress.provenance import write_results

    results = {}
    for condition, loaded, settings in [("idle", False, args.settings),
                                        ("one competing thread", True, args.loaded_settings)]:
        for setting in settings:
            results.setdefault(condition, {})[setting] = row = _measure(args, setting, loaded)
            print(condition, setting, json.dumps(row["median_tokens_per_s"]), flush=True)
    write_results(args.out / "omp_wait.json", {
        "dense": args.dense, "compressed": args.compressed, "threads": args.threads, "rounds": args.rounds,
        "prefill_tokens": args.prefill_tokens, "new_tokens": args.new_tokens, "cpu_count": os.cpu_count(),
        "settings": SETTINGS, "results": results})


if __name__ == "__main__":
    main()
