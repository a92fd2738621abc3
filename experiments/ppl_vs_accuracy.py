"""Issue 11, claim "perplexity and accuracy are uncorrelated": rank correlation across our variants.

    python experiments/ppl_vs_accuracy.py

Reads the compressed variants already measured on the same held-out items (the engine grid's 15
models and the Q/K/O sweep's, each with held-out Wikipedia perplexity and fact recall on the same
300 qa_wikidata eval facts) and reports Spearman's rank correlation between perplexity and fact
recall (scipy), over all variants and over those within 3× dense perplexity (the ones that did not
collapse). Writes ``experiments/results/claims/ppl_vs_accuracy.json`` and ``.md``; runs no model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from svdcompress.provenance import write_results

SOURCES = {
    "engine_grid": (Path("experiments/results/engine_grid/results.json"),
                    lambda r: (r["perplexity"]["perplexity"], r["facts"]["accuracy"])),
    "qko_sweep": (Path("experiments/results/qko_sweep/results.json"),
                  lambda r: (r["perplexity"], r["facts"]["accuracy"])),
}


def variants() -> list[dict]:
    """(source, name, perplexity / its source's dense, fact recall) of every measured model."""
    rows = []
    for source, (path, read) in SOURCES.items():
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        runs = data.get("runs", data)
        runs = {k: v for k, v in runs.items() if k != "provenance"}
        dense_ppl, _ = read(runs["dense"])
        for name, run in runs.items():
            if source != "engine_grid" and name == "dense":
                continue  # the same dense model, counted once
            ppl, facts = read(run)
            rows.append({"source": source, "name": name, "ppl_ratio": ppl / dense_ppl,
                         "facts": facts})
    return rows


def correlation(rows: list[dict]) -> dict:
    rho, p = spearmanr([r["ppl_ratio"] for r in rows], [r["facts"] for r in rows])
    return {"n": len(rows), "spearman_rho": float(rho), "p_value": float(p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/claims"))
    parser.add_argument("--near", type=float, default=3.0, help="'not collapsed': ppl ≤ near × dense")
    args = parser.parse_args()
    rows = variants()
    near = [r for r in rows if r["ppl_ratio"] <= args.near]
    result = {"variants": rows, "all": correlation(rows), f"within_{args.near:g}x": correlation(near)}
    write_results(args.out / "ppl_vs_accuracy.json", result)
    lines = ["| variants | n | Spearman rho (perplexity vs fact recall) | p |", "|---|---|---|---|"]
    for label, key in (("all", "all"), (f"perplexity ≤ {args.near:g} × dense", f"within_{args.near:g}x")):
        c = result[key]
        lines.append(f"| {label} | {c['n']} | {c['spearman_rho']:+.2f} | {c['p_value']:.2g} |")
    (args.out / "ppl_vs_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
