"""Load time of a compressed SmolLM2-135M: ``svdcompress.load`` vs ``from_pretrained`` (issue 13).

Compresses the real model (SVD, param_ratio 0.6, float and INT8 factors), saves it, loads it three
times with each loader (alternating, one torch thread) and checks the logits are bit-identical.
Writes ``experiments/results/hf_load_time.json``.

    OMP_NUM_THREADS=1 python experiments/hf_load_time.py
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import svdcompress as sc
from svdcompress.provenance import write_results

OUT = Path(__file__).parent / "results" / "hf_load_time.json"
ROUNDS = 3


def _seconds(load) -> tuple[float, object]:
    start = time.perf_counter()
    loaded = load()
    return time.perf_counter() - start, loaded


def measure(model, tokenizer, folder: Path, bits: int | None) -> dict:
    compressed = copy.deepcopy(model)
    sc.compress_(compressed, sc.SVDConfig(param_ratio=0.6, quant_bits=bits))
    sc.save(compressed, folder, tokenizer=tokenizer)
    times: dict[str, list[float]] = {"svdcompress.load": [], "from_pretrained": []}
    for _ in range(ROUNDS):  # alternating, so a busy spell of the machine hits both
        seconds, (ours, _) = _seconds(lambda: sc.load(folder, tokenizer=False))
        times["svdcompress.load"].append(seconds)
        seconds, theirs = _seconds(lambda: AutoModelForCausalLM.from_pretrained(folder))
        times["from_pretrained"].append(seconds)
    ids = tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt").input_ids
    with torch.no_grad():
        equal = torch.equal(ours(ids).logits, theirs(ids).logits)
    return {"quant_bits": bits, "logits_equal": equal,
            "seconds": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}}


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = sc.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(model, tokenizer, Path(work) / f"bits-{bits}", bits) for bits in (None, 8)]
    for row in rows:
        print(row)
    write_results(OUT, {"model": "smollm2-135m", "config": "SVDConfig(param_ratio=0.6)", "rounds": ROUNDS,
                        "results": rows})


if __name__ == "__main__":
    main()
