"""Tables and plots: spectra, sensitivity heatmaps, chosen ranks, drift and perplexity curves.

Plots are PNG files drawn with matplotlib's Agg backend (no display needed); the report is one
Markdown file beside them. Nothing here runs a model: every function reads numbers already measured
(an :class:`~svdcompress.analysis.Analysis`, an :class:`~svdcompress.allocation.Allocation`,
diagnostics dicts, benchmark results).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt
import numpy as np

from svdcompress.analysis import Analysis
from svdcompress.targets import ROLE_NAMES

__all__ = [
    "benchmark_table",
    "plot_benchmark",
    "plot_drift",
    "plot_effective_rank",
    "plot_predicted_curve",
    "plot_ranks",
    "plot_recovery",
    "plot_refinement",
    "plot_sensitivity",
    "plot_spectra",
    "write_report",
]

logger = logging.getLogger(__name__)

_DPI = 110


def _roles(analysis: Analysis) -> list[str]:
    present = {m.role or "other" for m in analysis.modules}
    return [r for r in [*ROLE_NAMES, "other"] if r in present]


def _n_blocks(analysis: Analysis) -> int:
    return max(m.block for m in analysis.modules) + 1


def _grid(analysis: Analysis, value) -> np.ndarray:
    """(roles, blocks) array of ``value(module)``; NaN where a block has no such module."""
    roles = _roles(analysis)
    grid = np.full((len(roles), _n_blocks(analysis)), np.nan)
    for m in analysis.modules:
        grid[roles.index(m.role or "other"), m.block] = value(m)
    return grid


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _block_axis(ax, n_blocks: int) -> None:
    step = max(1, n_blocks // 15)
    ax.set_xticks(range(0, n_blocks, step))
    ax.set_xlabel("decoder block")


# --------------------------------------------------------------------------------------------------
# Analysis plots


def plot_spectra(analysis: Analysis, path: Path) -> Path:
    """Normalised singular values per role, one line per block (colour = depth): plain and whitened."""
    roles, n_blocks = _roles(analysis), _n_blocks(analysis)
    fig, axes = plt.subplots(2, len(roles), figsize=(2.6 * len(roles), 5.4), squeeze=False,
                             sharey="row")
    cmap = plt.get_cmap("viridis")
    for col, role in enumerate(roles):
        for m in (m for m in analysis.modules if (m.role or "other") == role):
            for row, values in enumerate((m.singular_values, m.whitened_values)):
                s = np.asarray(values)
                x = np.arange(1, s.size + 1) / s.size
                axes[row, col].semilogy(x, s / s[0], color=cmap(m.block / max(n_blocks - 1, 1)), lw=0.8)
        axes[0, col].set_title(role)
        axes[1, col].set_xlabel("index / full rank")
    axes[0, 0].set_ylabel("σᵢ / σ₁  (W)")
    axes[1, 0].set_ylabel("σᵢ / σ₁  (W·S, whitened)")
    for ax in axes.flat:
        ax.set_ylim(bottom=1e-4)
        ax.grid(alpha=0.3)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_blocks - 1))
    fig.colorbar(mappable, ax=axes, label="block", fraction=0.02)
    fig.suptitle("Singular value spectra: the whitened ones decide the output error")
    return _save(fig, path)


def plot_effective_rank(analysis: Analysis, path: Path) -> Path:
    """Effective rank / full rank per block and role, plain (dashed) and whitened (solid)."""
    from svdcompress.analysis import effective_rank

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, role in enumerate(_roles(analysis)):
        mods = sorted((m for m in analysis.modules if (m.role or "other") == role), key=lambda m: m.block)
        blocks = [m.block for m in mods]
        color = f"C{i}"
        ax.plot(blocks, [effective_rank(m.whitened_values) / m.full_rank for m in mods], color=color,
                label=role)
        ax.plot(blocks, [effective_rank(m.singular_values) / m.full_rank for m in mods], color=color,
                ls="--", lw=0.8)
    _block_axis(ax, _n_blocks(analysis))
    ax.set_ylabel("effective rank / full rank")
    ax.set_title("Effective rank (entropy of σ): solid whitened, dashed plain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    return _save(fig, path)


def _heatmap(ax, grid: np.ndarray, roles: list[str], cmap: str, label: str, fig, **kwargs):
    image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest", **kwargs)
    ax.set_yticks(range(len(roles)), roles)
    _block_axis(ax, grid.shape[1])
    fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.01)
    return image


def plot_sensitivity(analysis: Analysis, path: Path, fraction: float = 0.5, top: int = 5) -> Path:
    """Layer × module-type heatmap of log₁₀ predicted KL with the module alone at ``fraction`` of its
    parameters; the ``top`` most sensitive modules are boxed."""
    grid = _grid(analysis, lambda m: math.log10(max(m.predicted_kl(m.rank_for_fraction(fraction)), 1e-12)))
    roles = _roles(analysis)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * grid.shape[1] + 2), 0.45 * len(roles) + 1.6))
    _heatmap(ax, grid, roles, "magma", "log₁₀ KL (nats/token)", fig)
    for row in analysis.sensitivity(fraction)[:top]:
        y = roles.index(row["role"] or "other")
        ax.add_patch(plt.Rectangle((row["block"] - 0.5, y - 0.5), 1, 1, fill=False, ec="cyan", lw=1.5))
    ax.set_title(f"Sensitivity: KL to the original with one module at {fraction:.0%} of its "
                 f"parameters (boxed: top {top})")
    return _save(fig, path)


def plot_ranks(analysis: Analysis, ranks: dict[str, int | None], path: Path, title: str = "") -> Path:
    """Layer × module-type heatmap of the kept parameter fraction; 'D' marks modules left dense."""
    def kept(m):
        rank = ranks.get(m.name)
        return 1.0 if rank is None else m.factored_params(rank) / m.dense_params

    grid, roles = _grid(analysis, kept), _roles(analysis)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * grid.shape[1] + 2), 0.45 * len(roles) + 1.6))
    _heatmap(ax, grid, roles, "viridis", "parameters kept", fig, vmin=0, vmax=1)
    for m in analysis.modules:
        if ranks.get(m.name) is None:
            ax.text(m.block, roles.index(m.role or "other"), "D", ha="center", va="center",
                    fontsize=7, color="black")
    ax.set_title(title or "Chosen ranks (fraction of each matrix's parameters kept; D = dense)")
    return _save(fig, path)


def plot_predicted_curve(curve: Sequence[dict], path: Path) -> Path:
    """Predicted KL (sum over modules) vs parameter ratio: allocated vs uniform ranks."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [row["param_ratio"] for row in curve]
    ax.semilogy(x, [row["uniform_kl"] for row in curve], "o-", label="uniform ranks")
    ax.semilogy(x, [row["allocated_kl"] for row in curve], "s-", label="allocated ranks")
    ax.set_xlabel("parameters kept (of the targeted matrices)")
    ax.set_ylabel("predicted KL (Σ one-at-a-time, nats/token)")
    ax.set_title("Predicted loss vs parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def plot_drift(diagnostics: dict[str, dict], path: Path) -> Path:
    """Per-layer hidden-state cosine and norm ratio to the original, one line per policy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, diag in diagnostics.items():
        layers = diag["layers"]
        x = [d["layer"] for d in layers]
        left.plot(x, [d["cosine"] for d in layers], marker=".", label=label)
        right.plot(x, [d["norm_ratio"] for d in layers], marker=".", label=label)
        if diag.get("first_bad_layer") is not None:
            left.axvline(diag["first_bad_layer"], ls=":", color=left.lines[-1].get_color())
    threshold = next(iter(diagnostics.values()))["cosine_threshold"]
    left.axhline(threshold, color="grey", lw=0.8, ls="--")
    left.set_ylabel("mean token cosine to original")
    right.set_ylabel("mean ‖h′‖ / ‖h‖")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("decoder block (output)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("Hidden-state drift (dotted: first block below threshold)")
    right.set_title("Norm drift")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Benchmark (experiments) plots and tables


def _runs(results: dict) -> list[dict]:
    return [{"name": name, **run} for name, run in results["runs"].items()]


def _kept(run: dict) -> float:
    """Parameters kept over all selected decoder linears (allocation's dense modules at full size);
    ``target_param_ratio`` is that number's name in results written before issue 15."""
    return run.get("param_ratio_all_linears", run.get("target_param_ratio"))


def plot_benchmark(results: dict, path: Path, metric: str = "wiki_ppl") -> Path:
    """Measured perplexity vs parameters kept, one line per variant, dense as a reference line."""
    runs = _runs(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = next((r for r in runs if r["variant"] == "dense"), None)
    variants = sorted({r["variant"] for r in runs} - {"dense"})
    for i, variant in enumerate(variants):
        points = sorted((_kept(r), r[metric]) for r in runs if r["variant"] == variant)
        ax.plot(*zip(*points, strict=True), marker="os^dv"[i % 5], label=variant)
    if dense is not None:
        ax.axhline(dense[metric], color="black", ls="--", lw=0.8, label="dense")
    ax.set_xlabel("parameters kept (of all decoder linear layers)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_yscale("log")
    # Plain numbers on the log axis (30, 40, 60), not 3×10¹.
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Held-out perplexity vs parameters")
    return _save(fig, path)


def benchmark_table(results: dict) -> str:
    """Markdown table of every run, grouped by ratio, with the perplexity increase over dense."""
    runs = _runs(results)
    dense = next((r for r in runs if r["variant"] == "dense"), None)
    header = ("| run | params kept | dense modules | wiki ppl | Δ vs dense | sotu ppl | fact recall "
              "| first layer cos<0.95 | repetition |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in sorted(runs, key=lambda r: (-r["param_ratio"], r["variant"] != "uniform", r["name"])):
        delta = "" if dense is None else f"{r['wiki_ppl'] - dense['wiki_ppl']:+.2f}"
        diag = r.get("diagnostics") or {}
        rep = diag.get("repetition", {}).get("compressed")
        lines.append(
            f"| {r['name']} | {_kept(r):.3f} | {r.get('dense_modules', 0)} | "
            f"{r['wiki_ppl']:.2f} | {delta} | {r['sotu_ppl']:.2f} | {r['fact_recall']:.3f} | "
            f"{diag.get('first_bad_layer', '')} | {'' if rep is None else f'{rep:.3f}'} |"
        )
    return header + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The analysis report


def _sensitive_table(analysis: Analysis, fraction: float, top: int) -> str:
    rows = analysis.sensitivity(fraction)[:top]
    lines = ["| module | rank | KL (nats/token) | KL per M params saved |", "|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['rank']} | {r['kl']:.3g} | {r['kl_per_mparam_saved']:.3g} |"
              for r in rows]
    return "\n".join(lines)


def _role_table(analysis: Analysis, fraction: float) -> str:
    summary = analysis.role_summary(fraction)
    lines = ["| role | median KL | max KL | median KL per M params saved | modules |",
             "|---|---|---|---|---|"]
    lines += [f"| {role} | {v['median_kl']:.3g} | {v['max_kl']:.3g} | "
              f"{v['median_kl_per_mparam']:.3g} | {v['n']} |"
              for role, v in sorted(summary.items(), key=lambda kv: -kv[1]["median_kl"])]
    return "\n".join(lines)


def _allocation_section(name: str, allocation: dict, image: str) -> str:
    return (f"### {name}\n\nkept {allocation['cost_after']:,} of {allocation['cost_before']:,} "
            f"{allocation['unit']} ({allocation['ratio']:.4f}; budget {allocation['budget']:,}), "
            f"{len(allocation['dense'])} modules left dense, predicted KL "
            f"{allocation['predicted_kl']:.4g}. Recipe: `{name}.json` "
            f"(`svdcompress compress --recipe`).\n\n![{name}]({image})\n")


def _diagnostics_section(diagnostics: dict[str, dict]) -> str:
    lines = ["| policy | ppl original → compressed | logits cos | KL | top-1 | first block cos<thr "
             "| largest drop | repetition orig → comp |", "|---|---|---|---|---|---|---|---|"]
    for label, d in diagnostics.items():
        rep = d.get("repetition") or {}
        rep_text = (f"{rep['original']:.3f} → {rep['compressed']:.3f}" if "compressed" in rep else "")
        lines.append(
            f"| {label} | {d['perplexity']['original']:.2f} → {d['perplexity']['compressed']:.2f} | "
            f"{d['logits']['cosine']:.4f} | {d['logits']['kl']:.4f} | "
            f"{d['logits']['top1_agreement']:.3f} | {d['first_bad_layer']} | "
            f"{d['largest_drop_layer']} | {rep_text} |")
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    analysis: Analysis,
    *,
    allocations: dict[str, dict] | None = None,
    curve: Sequence[dict] | None = None,
    diagnostics: dict[str, dict] | None = None,
    title: str = "Sensitivity analysis",
    fraction: float = 0.5,
) -> Path:
    """Draw every plot into ``out_dir`` and write ``report.md`` referencing them."""
    out_dir = Path(out_dir)
    plot_spectra(analysis, out_dir / "spectra.png")
    plot_effective_rank(analysis, out_dir / "effective_rank.png")
    plot_sensitivity(analysis, out_dir / "sensitivity.png", fraction)
    s = analysis.settings
    parts = [
        f"# {title}\n",
        f"Model fingerprint `{analysis.fingerprint}`; {len(analysis.modules)} modules; calibration "
        f"{s['calibration']} ({s['calibration_shape'][0]}×{s['calibration_shape'][1]} tokens); probe "
        f"{s['probe_samples']}×{s['probe_len']} tokens; KL measured at parameter fractions "
        f"{s['fractions']}; measurement took {analysis.seconds:.1f} s.\n",
        "## Spectra\n\n![spectra](spectra.png)\n\n![effective rank](effective_rank.png)\n",
        f"## Sensitivity\n\nKL to the original with one module compressed alone to {fraction:.0%} "
        "of its parameters (measured at the probe ranks, interpolated in the whitened tail energy "
        "between them).\n\n![sensitivity](sensitivity.png)\n",
        f"Most sensitive modules:\n\n{_sensitive_table(analysis, fraction, 12)}\n",
        f"By module type:\n\n{_role_table(analysis, fraction)}\n",
    ]
    if curve:
        plot_predicted_curve(curve, out_dir / "predicted_curve.png")
        parts.append("## Predicted loss vs parameters\n\n![curve](predicted_curve.png)\n")
    for name, allocation in (allocations or {}).items():
        plot_ranks(analysis, allocation["ranks"], out_dir / f"{name}.png", title=f"Ranks: {name}")
        parts.append(_allocation_section(name, allocation, f"{name}.png"))
    if diagnostics:
        plot_drift(diagnostics, out_dir / "drift.png")
        parts.append("## Diagnostics of applied policies\n\n" + _diagnostics_section(diagnostics)
                     + "\n\n![drift](drift.png)\n")
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------------------
# Refinement and recovery (issue 6)


def plot_refinement(modules: Sequence[dict], path: Path, title: str = "") -> Path:
    """Per-module relative output error before and after gradient refinement.

    ``modules``: the ``modules`` list of a compression report's JSON (``refine_error_*`` fields).
    """
    rows = [m for m in modules if m.get("refine_error_before") is not None]
    if not rows:
        raise ValueError("no module in this report was refined (refine_iters was 0)")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    x = np.arange(len(rows))
    before = np.array([m["refine_error_before"] for m in rows])
    after = np.array([m["refine_error_after"] for m in rows])
    top.semilogy(x, before, ".", ms=4, label="start (method's factors)")
    top.semilogy(x, after, ".", ms=4, label="after refinement")
    top.set_ylabel("‖W x − A B x′‖ / ‖W x‖")
    top.legend(fontsize=8)
    bottom.plot(x, 100 * (1 - after / np.maximum(before, 1e-30)), ".", ms=4, color="tab:green")
    bottom.set_ylabel("error reduction (%)")
    step = max(1, len(rows) // 20)
    bottom.set_xticks(x[::step], [m["name"].split(".", 2)[-1] for m in rows][::step],
                      rotation=70, fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, which="both")
    top.set_title(title or "Per-module output error before and after refinement")
    return _save(fig, path)


def plot_recovery(losses: dict[str, Sequence[float]], path: Path) -> Path:
    """KL to the original model per recovery step, one line per run (a 10-step running mean)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in losses.items():
        values = np.asarray(values, dtype=float)
        window = min(10, len(values))
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(values)), smooth, label=label)
    ax.set_xlabel("recovery step")
    ax.set_ylabel("KL(original ‖ compressed), nats/token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Recovery distillation loss")
    return _save(fig, path)
