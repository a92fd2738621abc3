"""Issue 4: dense fp32 vs whole-model INT8 vs whitened SVD (0.8, 0.6) with float and INT8 factors.

Quality (held-out Wikipedia perplexity on ``--eval-samples`` × ``--seq-len`` windows, fact recall on
``--facts`` BIG-bench qa_wikidata prompts) and speed/memory (:func:`svdcompress.bench.run_bench`:
every model in fresh processes, alternating, against the dense original in the same run).

Inputs are checkpoint folders made beforehand with the CLI (see BENCHMARKS.md for the commands):
``RUNS/whiten-p08``, ``RUNS/whiten-p06`` (``svdcompress compress``), their int8 twins
``RUNS/whiten-p08-int8``, ``RUNS/whiten-p06-int8`` and the baseline ``RUNS/int8-rtn``
(``svdcompress quantize``). Every number is cached in ``--out``/int8_benchmarks.json as soon as
it exists, so an interrupted run resumes; ``--out``/int8_benchmarks.md gets the table.

    python experiments/int8_benchmarks.py --runs-dir runs/issue4 --out experiments/results/int8 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch

from svdcompress import load_model
from svdcompress.bench import BenchSettings, run_bench, weight_bytes
from svdcompress.datasets import load_facts, token_windows
from svdcompress.evaluate import fact_recall, perplexity
from svdcompress.provenance import write_results
from svdcompress.runtime import set_runtime

logger = logging.getLogger("int8_benchmarks")

# label -> (folder under --runs-dir, or None for the original; int8 kernel). Int8 checkpoints are
# evaluated with every kernel, because kernels that quantize activations change the numbers.
VARIANTS: dict[str, tuple[str | None, str]] = {
    "dense fp32": (None, "auto"),
    "INT8 RTN, no SVD [dequant]": ("int8-rtn", "dequant"),
    "whiten 0.8, float factors": ("whiten-p08", "auto"),
    "whiten 0.8, INT8 factors [dequant]": ("whiten-p08-int8", "dequant"),
    "whiten 0.6, float factors": ("whiten-p06", "auto"),
    "whiten 0.6, INT8 factors [dequant]": ("whiten-p06-int8", "dequant"),
    "INT8 RTN, no SVD [int_mm]": ("int8-rtn", "int_mm"),
    "INT8 RTN, no SVD [fbgemm]": ("int8-rtn", "fbgemm"),
    "whiten 0.6, INT8 factors [int_mm]": ("whiten-p06-int8", "int_mm"),
    "whiten 0.6, INT8 factors [fbgemm]": ("whiten-p06-int8", "fbgemm"),
}
MAIN_KERNEL = "dequant"  # rows whose speed the main table shows (see runtime.py for why)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/issue4"), help="checkpoints")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/int8"), help="results")
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=["quality", "speed", "kernels", "prompt"])
    parser.add_argument("--only", nargs="+", default=None, help="quality: these variant labels only")
    return parser.parse_args()


def _spec(args, folder: str | None) -> str:
    return args.model if folder is None else str(args.runs_dir / folder)


def _quality(args, label: str, results: dict, out: Path) -> None:
    if label in results["quality"]:
        return
    folder, kernel = VARIANTS[label]
    start = time.perf_counter()
    model, tokenizer = load_model(_spec(args, folder))
    set_runtime(model, kernel)
    windows = token_windows(tokenizer, "wiki", "eval", seq_len=args.seq_len,
                            n_samples=args.eval_samples, seed=0)
    entry: dict[str, Any] = {"spec": _spec(args, folder), "kernel": kernel,
                             "weight_bytes": weight_bytes(model)}
    with torch.inference_mode():
        entry["perplexity"] = perplexity(model, windows, progress=False).to_dict()
        # Every row, kernels included: short fact prompts expose activation rounding that
        # 512-token perplexity windows hide (the first token's attention-sink values).
        recall = fact_recall(model, tokenizer, load_facts(args.facts), progress=False)
        entry["fact_recall"] = {"accuracy": recall.accuracy, "n": recall.n}
    entry["seconds"] = time.perf_counter() - start
    results["quality"][label] = entry
    write_results(out, results)
    logger.info("%s: %s", label, {k: entry[k] for k in ("perplexity", "seconds")})
    del model
    gc.collect()


def _speed(args, results: dict, out: Path) -> None:
    if results.get("speed"):
        return
    specs = list(dict.fromkeys(_spec(args, folder) for folder, _ in VARIANTS.values() if folder))
    settings = BenchSettings(threads=args.threads, rounds=args.rounds, runs=args.runs,
                             kernel=MAIN_KERNEL)
    results["speed"] = run_bench(specs, args.model, settings)
    write_results(out, results)


def _kernels(args, results: dict, out: Path) -> None:
    """The 0.6 + INT8 checkpoint with each int8 kernel, against dense, decode batch 1 and prefill."""
    results.setdefault("kernels", {})
    for kernel in ("dequant", "int_mm", "fbgemm"):
        if kernel in results["kernels"]:
            continue
        settings = BenchSettings(threads=args.threads, rounds=1, runs=args.runs, batch_sizes=(1,),
                                 kernel=kernel)
        results["kernels"][kernel] = run_bench([_spec(args, "whiten-p06-int8")], args.model, settings)
        write_results(out, results)


def _prompt(args, results: dict, out: Path) -> None:
    """Per-position logits of the INT8 baseline vs dense on one short prompt, for each kernel."""
    if results.get("prompt"):
        return
    dense, tokenizer = load_model(args.model)
    model, _ = load_model(_spec(args, "int8-rtn"))
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    entry: dict[str, Any] = {"prompt": text, "model": _spec(args, "int8-rtn"), "kernels": {}}
    with torch.inference_mode():
        reference = dense(ids).logits[0]  # (T, V)
        for kernel in ("dequant", "int_mm", "fbgemm"):
            set_runtime(model, kernel)
            logits = model(ids).logits[0]
            error = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)  # (T,)
            same = (logits.argmax(-1) == reference.argmax(-1)).tolist()
            entry["kernels"][kernel] = {"relative_error": error.tolist(), "same_argmax": same}
    results["prompt"] = entry
    write_results(out, results)


def _speed_row(results: dict, spec: str) -> dict | None:
    speed = results.get("speed")
    if not speed:
        return None
    if spec == speed["against"]:
        return {**speed["reference"], "ratio_to_reference": None}
    return next((m for m in speed["models"] if m["spec"] == spec), None)


def _ratio(row: dict | None, key: str) -> str:
    if row is None:
        return "–"
    if row["ratio_to_reference"] is None:
        return f"1.00 ({row[key]['median']:.0f}/s)"
    return f"{row['ratio_to_reference'][key]:.2f}"


def table(results: dict) -> str:
    quality = results["quality"]
    dense_ppl = quality["dense fp32"]["perplexity"]["perplexity"]
    lines = ["| variant | ppl (ratio) | fact recall | weights MB | decoder-linear bytes vs fp32 | "
             "peak RSS MB | decode b1 | decode b8 | prefill 512 |", "|---" * 9 + "|"]
    for label, entry in quality.items():
        ppl = entry["perplexity"]["perplexity"]
        recall = entry.get("fact_recall", {}).get("accuracy")
        layers = entry["weight_bytes"]
        share = (f"{layers['compressed_layers'] / layers['compressed_layers_dense_fp32']:.1%}"
                 if layers["n_compressed_layers"] else "100%")
        main = "[" not in label or f"[{MAIN_KERNEL}]" in label
        row = _speed_row(results, entry["spec"]) if main else None
        rss = f"{row['peak_rss_mb']['median']:.0f}" if row else "–"
        lines.append(
            f"| {label} | {ppl:.2f} ({ppl / dense_ppl:.3f}) | "
            f"{'–' if recall is None else f'{recall:.1%}'} | {layers['total'] / 1e6:.1f} | {share} | "
            f"{rss} | {_ratio(row, 'decode_b1_tokens_per_s')} | {_ratio(row, 'decode_b8_tokens_per_s')} | "
            f"{_ratio(row, 'prefill_tokens_per_s')} |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = _args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "int8_benchmarks.json"
    results = json.loads(out.read_text()) if out.is_file() else {"quality": {}}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    if "quality" in args.stages:
        for label in args.only or VARIANTS:
            _quality(args, label, results, out)
    if "speed" in args.stages:
        _speed(args, results, out)
    if "kernels" in args.stages:
        _kernels(args, results, out)
    if "prompt" in args.stages:
        _prompt(args, results, out)
    markdown = table(results)
    (args.out / "int8_benchmarks.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
