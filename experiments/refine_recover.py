"""Issue 6: whiten vs whiten + refinement vs whiten + refinement + recovery on SmolLM2-135M.

For each param_ratio: compress all decoder linear layers with whitening (64 × 512 wiki calib
tokens), again with gradient refinement, then distil the refined checkpoint for a fixed number of
steps; evaluate every checkpoint (and the dense model) on the same held-out windows.

    python experiments/refine_recover.py                       # everything (hours on a shared CPU)
    python experiments/refine_recover.py --ratios 0.8 --stages dense whiten

Results accumulate in --results (JSON; finished runs are skipped unless --force), with a Markdown
table and plots beside it. Checkpoints go to --runs-dir. A recovery run that was interrupted is
resumed from its last saved state.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from svdcompress.config import SVDConfig, WhitenConfig, load_recipe
from svdcompress.evaluate import evaluate_model
from svdcompress.pipelines.compress import run_compress
from svdcompress.pipelines.recover import run_recover, state_folder
from svdcompress.provenance import write_results
from svdcompress.recover import RecoverySettings
from svdcompress.report import plot_recovery, plot_refinement
from svdcompress.zoo import load_model

logger = logging.getLogger("refine_recover")

MODEL = "smollm2-135m"
# variant -> (what it is built from, compression settings or "recover")
VARIANTS: dict[str, dict] = {
    "whiten": {"method": "whiten"},
    "whiten+refine": {"method": "whiten", "refine": True},
    "whiten+refine+recover": {"recover_from": "whiten+refine"},
    "whiten+recover": {"recover_from": "whiten"},
    "whiten+update": {"method": "whiten", "update": True},
    "whiten+update+refine": {"method": "whiten", "update": True, "refine": True},
    # Ranks from issue 5's sensitivity allocation (its saved recipe for this ratio), then distilled.
    "allocated": {"method": "whiten", "allocated": True},
    "allocated+recover": {"recover_from": "allocated"},
    "svd": {"method": "svd"},
    "svd+refine": {"method": "svd", "refine": True},
}
STAGES = ("dense", *VARIANTS, "lr-probe")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--stages", nargs="+", choices=STAGES,
                        default=["dense", "whiten", "whiten+refine", "whiten+refine+recover"])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/issue6"))
    parser.add_argument("--results", type=Path, default=Path("experiments/results/issue6/results.json"))
    parser.add_argument("--analysis-dir", type=Path, default=Path("experiments/results/allocation/analysis"),
                        help="where issue 5's allocation recipes (allocation-pR.json) are")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--refine-iters", type=int, default=50)
    parser.add_argument("--refine-lr", type=float, default=0.03)
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--recover-lr", type=float, default=1e-4)
    parser.add_argument("--recover-batch", type=int, default=4)
    parser.add_argument("--recover-seq-len", type=int, default=256)
    parser.add_argument("--probe-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="redo runs already in --results")
    return parser.parse_args()


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def _store(path: Path, results: dict) -> None:
    write_results(path, results)  # atomically, with the command and code version


def _evaluate(spec: str, args) -> dict:
    start = time.perf_counter()
    model, tokenizer = load_model(spec)
    result = evaluate_model(model, tokenizer, n_samples=args.eval_samples, seq_len=512,
                            second_domain="sotu", facts=args.facts)
    return {
        "wiki_ppl": result["perplexity"]["perplexity"],
        "sotu_ppl": result["second_domain"]["perplexity"],
        "fact_recall": result["facts"]["accuracy"],
        "eval_settings": result["settings"],
        "eval_seconds": time.perf_counter() - start,
    }


def _folder(variant: str, ratio: float, args) -> Path:
    return args.runs_dir / f"{variant.replace('+', '-')}-p{round(ratio * 100):02d}"


def _allocation_recipe(ratio: float, args) -> Path:
    return args.analysis_dir / f"allocation-p{ratio:.2f}.json"


def _compress(variant: str, ratio: float, args) -> dict:
    spec = VARIANTS[variant]
    if spec.get("allocated"):
        config = load_recipe(_allocation_recipe(ratio, args))
    else:
        config_type = SVDConfig if spec["method"] == "svd" else WhitenConfig
        config = config_type(param_ratio=ratio, update=spec.get("update", False),
                             refine_iters=args.refine_iters if spec.get("refine") else 0,
                             refine_lr=args.refine_lr)
    summary = run_compress(MODEL, config, _folder(variant, ratio, args), calib="wiki",
                           calib_samples=args.calib_samples, seq_len=512, n_facts=0, overwrite=True)
    return {"param_ratio_factored_modules": summary["target_param_ratio"],
            "param_ratio_all_linears": summary["selected_param_ratio"],
            "compress_seconds": summary["wall_seconds"], "config": config.to_dict()}


def _recover(variant: str, ratio: float, args) -> dict:
    source = _folder(VARIANTS[variant]["recover_from"], ratio, args)
    out = _folder(variant, ratio, args)
    settings = RecoverySettings(steps=args.recover_steps, lr=args.recover_lr,
                                batch_size=args.recover_batch)
    resume = state_folder(out).is_dir()
    summary = run_recover(source, settings, out=out, base=None, data="wiki",
                          seq_len=args.recover_seq_len, n_windows=None, resume=resume,
                          overwrite=True, device="cpu")
    source_run = f"{VARIANTS[variant]['recover_from']} p{round(ratio * 100):02d}"
    return {**_source_ratios(source), "recover_seconds": summary["wall_seconds"],
            "source_run": source_run, "recovery": {k: v for k, v in summary.items() if k != "losses"}}


def _source_ratios(folder: Path) -> dict[str, float]:
    summary = json.loads((folder / "compression_report.json").read_text())["summary"]
    return {"param_ratio_factored_modules": summary["target_param_ratio"],
            "param_ratio_all_linears": summary["selected_param_ratio"]}


def _cli(variant: str, ratio: float, args) -> str:
    """The equivalent command line, for BENCHMARKS.md."""
    spec, out = VARIANTS[variant], _folder(variant, ratio, args)
    if "recover_from" in spec:
        return (f"svdcompress recover {_folder(spec['recover_from'], ratio, args)} "
                f"--steps {args.recover_steps} --lr {args.recover_lr} --batch-size "
                f"{args.recover_batch} --seq-len {args.recover_seq_len} --device cpu --out {out}")
    what = (f"--recipe {_allocation_recipe(ratio, args)}" if spec.get("allocated")
            else f"--method {spec['method']} --param-ratio {ratio}")
    flags = f" {what} --calib-samples {args.calib_samples} --seq-len 512"
    flags += " --update" if spec.get("update") else ""
    flags += f" --refine-iters {args.refine_iters} --refine-lr {args.refine_lr}" if spec.get("refine") else ""
    return f"svdcompress compress {MODEL}{flags} --out {out}"


def _run_ratio(ratio: float, args, results: dict) -> None:
    tag = f"p{round(ratio * 100):02d}"
    for variant in VARIANTS:
        name = f"{variant} {tag}"
        if variant not in args.stages or (name in results["runs"] and not args.force):
            continue
        logger.info("=== %s ===", name)
        run = {"variant": variant, "param_ratio": ratio, "command": _cli(variant, ratio, args)}
        recover = "recover_from" in VARIANTS[variant]
        run.update(_recover(variant, ratio, args) if recover else _compress(variant, ratio, args))
        run.update(_evaluate(str(_folder(variant, ratio, args)), args))
        results["runs"][name] = run
        _store(args.results, results)


def _lr_probe(ratio: float, args, results: dict) -> None:
    """Short recoveries from the whitened checkpoint at several learning rates (wiki ppl only)."""
    from svdcompress.datasets import token_windows
    from svdcompress.evaluate import perplexity

    probe = results.setdefault("lr_probe", {})
    source = _folder("whiten", ratio, args)
    for lr in args.probe_lrs:
        name = f"p{round(ratio * 100):02d} lr={lr:g} steps={args.probe_steps}"
        if name in probe and not args.force:
            continue
        out = args.runs_dir / f"probe-{name.replace(' ', '-')}"
        settings = RecoverySettings(steps=args.probe_steps, lr=lr, batch_size=args.recover_batch)
        summary = run_recover(source, settings, out=out, base=None, data="wiki",
                              seq_len=args.recover_seq_len, n_windows=None,
                              resume=state_folder(out).is_dir(), overwrite=True, device="cpu")
        model, tokenizer = load_model(str(out))
        windows = token_windows(tokenizer, "wiki", "eval", seq_len=512, n_samples=args.eval_samples)
        probe[name] = {"lr": lr, "steps": args.probe_steps, "source": str(source),
                       "final_kl": summary["final_loss"], "recover_seconds": summary["wall_seconds"],
                       "wiki_ppl": perplexity(model, windows).perplexity,
                       "command": f"svdcompress recover {source} --steps {args.probe_steps} --lr {lr} "
                                  f"--batch-size {args.recover_batch} --seq-len {args.recover_seq_len} "
                                  f"--device cpu --out {out}"}
        _store(args.results, results)


def _plots(args, results: dict) -> None:
    out = args.results.parent
    for name, run in results["runs"].items():
        report_path = Path(run["command"].rsplit("--out ", 1)[-1]) / "compression_report.json"
        if run["variant"].endswith("+refine") and report_path.is_file():  # runs/ may be gone
            report = json.loads(report_path.read_text())
            stem = name.replace("+", "-").replace(" ", "-")
            plot_refinement(report["modules"], out / f"refinement-{stem}.png",
                            title=f"Refinement, {name}: per-module output error")
    losses = {}
    for name, run in results["runs"].items():
        report_path = Path(run["command"].rsplit("--out ", 1)[-1]) / "recovery_report.json"
        if "recovery" in run and report_path.is_file():
            losses[name] = json.loads(report_path.read_text())["losses"]
    if losses:
        plot_recovery(losses, out / "recovery-loss.png")


def results_table(results: dict) -> str:
    dense = results["runs"].get("dense")
    lines = ["| variant | params kept (all linears) | wiki ppl (× dense) | sotu ppl (× dense) | fact recall | "
             "wall: compress / recover |", "|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        ratio = "1.0" if name == "dense" else f"{run.get('param_ratio_all_linears', run['param_ratio']):.3f}"
        wiki = f"{run['wiki_ppl']:.2f}" + (f" ({run['wiki_ppl'] / dense['wiki_ppl']:.3f})" if dense else "")
        sotu = f"{run['sotu_ppl']:.2f}" + (f" ({run['sotu_ppl'] / dense['sotu_ppl']:.3f})" if dense else "")
        wall = " / ".join(f"{run[k]:.0f} s" if k in run else "–" for k in ("compress_seconds", "recover_seconds"))
        lines.append(f"| {name} | {ratio} | {wiki} | {sotu} | {run['fact_recall']:.1%} | {wall} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    results = _load(args.results)
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    if "dense" in args.stages and ("dense" not in results["runs"] or args.force):
        results["runs"]["dense"] = {"variant": "dense", "param_ratio": 1.0,
                                    "command": f"svdcompress eval {MODEL}", **_evaluate(MODEL, args)}
        _store(args.results, results)
    for ratio in args.ratios:
        _run_ratio(ratio, args, results)
        if "lr-probe" in args.stages:
            _lr_probe(ratio, args, results)
    _plots(args, results)
    table = results_table(results)
    (args.results.parent / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
