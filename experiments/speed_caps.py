"""Issue 14 item 4: what the measured speed break-even ranks change in an allocation.

``allocate(..., speed_caps=)`` offers no factored rank above the decode break-even rank of its
shape (``experiments/results/speed/break_even.json``, ``kernel_bench.py --break-even``: the lowest
over the thread counts measured; float caps for float factors, INT8 caps for INT8 factors). Here,
from the committed SmolLM2-135M analysis (no model run): for each param_ratio and factor dtype,
how many of the 210 modules the caps bind, how far, and what the predicted KL pays for it, in the
storage the file measured (factored, or pivoted: ``kernel_bench.py --break-even-storage pivoted``).

``--evaluate RATIO`` also compresses SmolLM2 (whiten, factored, INT8 factors) allocated at RATIO
with and without the caps and measures both beside the dense model on the held-out windows of
both domains and the facts (each row written as it finishes; a rerun skips it):

    python experiments/speed_caps.py
    OMP_NUM_THREADS=1 python experiments/speed_caps.py --evaluate 0.6 --out runs/speed_caps
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from svdcompress import api
from svdcompress.allocation import SpeedCaps, allocate
from svdcompress.analysis import load_analysis
from svdcompress.config import WhitenConfig
from svdcompress.evaluate import evaluate_model
from svdcompress.provenance import command_line, write_results
from svdcompress.zoo import load_model

logger = logging.getLogger("speed_caps")
MODEL = "smollm2-135m"


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analysis-dir", type=Path, default=Path("experiments/results/allocation/analysis"))
    parser.add_argument("--caps", type=Path, default=Path("experiments/results/speed/break_even.json"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--evaluate", type=float, default=None, metavar="RATIO")
    parser.add_argument("--out", type=Path, default=Path("runs/speed_caps"))
    parser.add_argument("--results", type=Path, default=Path("experiments/results/speed/speed_caps.json"))
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def _binding(analysis, caps: SpeedCaps, ratio: float, int8: bool) -> dict:
    # in the storage the caps were measured for (a file from kernel_bench.py --break-even-storage)
    free = allocate(analysis, param_ratio=ratio, storage=caps.storage)
    capped = allocate(analysis, param_ratio=ratio, speed_caps=caps, int8_factors=int8, storage=caps.storage)
    bound = {}
    for module in analysis.modules:
        cap, rank = caps.cap(module, int8), free.ranks[module.name]
        if cap is not None and rank is not None and rank > cap:
            bound[module.name] = {"free": rank, "cap": cap, "capped": capped.ranks[module.name]}
    return {"param_ratio": ratio, "storage": caps.storage, "factors": "int8" if int8 else "float",
            "predicted_kl_free": free.predicted_kl, "predicted_kl_capped": capped.predicted_kl,
            "dense_free": len(free.dense), "dense_capped": len(capped.dense),
            "modules": len(analysis.modules), "bound": bound}


def _evaluate(spec: str) -> dict:
    start = time.perf_counter()
    model, tokenizer = load_model(spec)
    result = evaluate_model(model, tokenizer, n_samples=32, seq_len=512, second_domain="sotu", facts=300)
    return {"wiki_ppl": result["perplexity"]["perplexity"], "sotu_ppl": result["second_domain"]["perplexity"],
            "fact_recall": result["facts"]["accuracy"], "eval_seconds": time.perf_counter() - start}


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    caps = SpeedCaps.load(args.caps)
    analysis = load_analysis(args.analysis_dir)
    results["caps"] = {"source": str(args.caps), "float": {f"{o}x{i}": r for (o, i), r in caps.float_ranks.items()},
                       "int8": {f"{o}x{i}": r for (o, i), r in caps.int8_ranks.items()}}
    results["allocations"] = [_binding(analysis, caps, ratio, int8) for ratio in args.ratios
                              for int8 in (False, True)]
    for row in results["allocations"]:
        logger.info("%s %s factors: caps bind %d modules; predicted KL %.4f -> %.4f", row["param_ratio"],
                    row["factors"], len(row["bound"]), row["predicted_kl_free"], row["predicted_kl_capped"])
    results["command"] = command_line()
    write_results(args.results, results)
    if args.evaluate is None:
        return
    rows = results.setdefault("rows", {})
    # compress --allocate writes its recipe beside the analysis: a copy keeps the committed one as it is
    analysis_copy = args.out / "analysis"
    if not analysis_copy.is_dir():
        shutil.copytree(args.analysis_dir, analysis_copy)
    if "dense" not in rows:
        rows["dense"] = _evaluate(MODEL)
        write_results(args.results, results)
    for name, speed_caps in (("allocated int8", None), ("allocated int8 + speed caps", args.caps)):
        key = f"{name} p{args.evaluate:g}"
        if key in rows:
            continue
        out = args.out / key.replace(" ", "-").replace("+", "")
        config = WhitenConfig(param_ratio=args.evaluate, storage="factored", quant_bits=8)
        summary = api.compress(MODEL, out, config, windows=64, seq_len=512, facts=0, device="cpu",
                               overwrite=True, allocate=True, analysis_dir=analysis_copy,
                               speed_caps=speed_caps)
        rows[key] = {"command": command_line(), "param_ratio": summary["selected_param_ratio"],
                     "compress_seconds": summary["wall_seconds"], **_evaluate(str(out))}
        write_results(args.results, results)


if __name__ == "__main__":
    main()
