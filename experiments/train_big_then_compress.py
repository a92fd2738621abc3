"""Issue 11, claim 8: train big then compress, or train small?

    nice -n 5 env OMP_NUM_THREADS=1 python experiments/train_big_then_compress.py --threads 1

The brief: "train big then compress beats training small: +55.6 % accuracy at 4x
over-parameterisation". Here small Llama-shaped transformers (``LlamaConfig``: ``--layers`` blocks,
head size 32, MLP 4x wide, tied input/output embeddings, vocabulary 512) are trained from scratch
with the Hugging Face Trainer (:func:`svdcompress.finetune.finetune_`: AdamW, linear decay) on the
same synthetic facts for the same number of epochs at every hidden width (``--widths``, 64 / 128 /
160 / 256), one run per seed (the seed draws the facts, the initial weights and the data order).

Task: ``--facts`` random facts "k_a k_b k_c -> v": three key tokens out of 256 (distinct key
triples) mapped to one of 254 value tokens, drawn uniformly. The loss is on the value token only.
Accuracy is exact match of the greedy (argmax over the whole vocabulary) next token after "->",
on the training facts themselves: the claim is about knowledge capacity, and random facts have
nothing to generalise to, so there is no held-out split (a held-out split of random facts would
score chance, 1/254, at every width).

Each wide model (width d > the small width w0 = ``--widths[0]``) is then compressed with plain
truncated SVD (:func:`svdcompress.compress_`, ``SVDConfig``) in two ways:

- ``rank-w0`` (the brief's words, "compressed to the rank of the small one"): every decoder-block
  linear (Q, K, V, O, gate, up, down) keeps rank w0; embeddings and norms untouched. This model
  holds MORE numbers than the small one (stored densely here; counted as two factors where that is
  smaller), so it is not a same-size comparison.
- ``decoder-matched``: every decoder linear factored at r_dec (below); embeddings untouched, so the
  model holds the small one's decoder numbers plus a wider embedding (more numbers in all).
- ``params-matched``: the same total stored numbers as the small model, or fewer. Every decoder
  linear is factored at one rank r_dec, the largest whose factors hold no more numbers than the
  small model's decoder linears; the tied embedding / output head (512 x d) is factored too (input
  embedding = rows of the head's factors), at the largest rank r_emb that keeps the whole model
  (norms included) within the small model's count.
- ``params-matched+ft``: that model fine-tuned (all factors, norms) on the same facts for
  ``--recover-epochs`` epochs with the training settings. Its control is ``small+ft``: the small
  model trained the same number of extra epochs the same way.

Statistics (:mod:`svdcompress.stats`): per seed, the exact McNemar test over the facts (same facts,
same seed) of each compressed wide model against the small model; over seeds, the paired t-test of
the accuracies. Each (width, seed) row is written to ``results.json`` as soon as it is finished (a
rerun skips it); ``table.md`` and ``accuracy_vs_width.png`` are rewritten from ``results.json``
(``--report-only`` rewrites only those two). ``--sweep-ranks R ...`` then retrains the widest model
(``--sweep-seeds``; training is deterministic, so it is the grid's model) and truncates its decoder
linears to each rank, embeddings untouched: where the compressed wide model crosses the small one.

Measured (2 shared CPU cores, --threads 1): the grid took 55 min under a load of 8-13 (each row's
time is in ``results.json``), the sweep of one seed 4 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")  # compress_'s per-module bars would flood the log
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import svdcompress as sc
from svdcompress.finetune import FinetuneConfig, finetune_
from svdcompress.linalg import factored_params, truncated_svd
from svdcompress.modules import LowRankLinear, stored_numbers
from svdcompress.provenance import write_results
from svdcompress.stats import mcnemar_exact, paired_t

N_KEYS, N_VALUES, KEY_LEN = 256, 254, 3
VOCAB = 2 + N_KEYS + N_VALUES  # <pad>, "->", keys, values = 512
HEAD_DIM, MLP_RATIO = 32, 4
SETTINGS = ("facts", "layers", "epochs", "lr", "batch_size", "recover_epochs")
VARIANTS = ("rank-w0", "decoder-matched", "params-matched", "params-matched+ft")


# ------------------------------------------------------------------------------------------------
# Data and models


def make_tokenizer():
    """A word-level tokenizer over the task's 512 symbols (ids: <pad> 0, "->" 1, keys, values)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "->", *(f"k{i}" for i in range(N_KEYS)), *(f"v{i}" for i in range(N_VALUES))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<pad>")


def make_facts(n: int, seed: int) -> torch.Tensor:
    """(n, 4) token ids: three distinct-as-a-triple key tokens, then the value token."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    keys: set[tuple[int, ...]] = set()
    while len(keys) < n:
        keys.add(tuple(torch.randint(0, N_KEYS, (KEY_LEN,), generator=gen).tolist()))
    key_ids = torch.tensor(sorted(keys)) + 2  # (n, 3)
    key_ids = key_ids[torch.randperm(n, generator=gen)]
    values = torch.randint(0, N_VALUES, (n, 1), generator=gen) + 2 + N_KEYS  # (n, 1)
    return torch.cat([key_ids, values], dim=1)


def fact_records(facts: torch.Tensor, tokenizer) -> list[dict[str, str]]:
    """Prompt/completion records for :func:`finetune_` (loss on the value token only)."""
    words = tokenizer.convert_ids_to_tokens
    return [{"prompt": " ".join(words(row[:KEY_LEN])) + " ->", "completion": " " + words(row[-1])}
            for row in facts.tolist()]


def build_model(width: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=MLP_RATIO * width,
        num_hidden_layers=layers, num_attention_heads=width // HEAD_DIM,
        num_key_value_heads=width // HEAD_DIM, max_position_embeddings=16,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_(model, tokenizer, records, epochs: float, args, seed: int) -> dict:
    config = FinetuneConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, seq_len=8,
                            seed=seed, warmup=0.02, device="cpu")
    _, result = finetune_(model, tokenizer, records, config, progress=False)
    losses = [e["loss"] for e in result.losses]
    return {"steps": result.steps, "epochs": epochs, "first_loss": result.first_loss,
            "final_loss": float(np.mean(losses[-20:])), "wall_s": round(result.wall_seconds, 1)}


@torch.no_grad()
def fact_correct(model, facts: torch.Tensor) -> list[float]:
    """1.0 where the argmax next token after "k k k ->" is the fact's value, else 0.0."""
    model.eval()
    prompts = torch.cat([facts[:, :KEY_LEN], torch.ones(len(facts), 1, dtype=torch.long)], dim=1)
    hits = []
    for start in range(0, len(facts), 1024):
        logits = model(input_ids=prompts[start : start + 1024]).logits[:, -1]  # (B, vocab)
        hits.append(logits.argmax(-1) == facts[start : start + 1024, -1])
    return torch.cat(hits).float().tolist()


# ------------------------------------------------------------------------------------------------
# Parameter counts and matched ranks (pure arithmetic)


def linear_shapes(width: int, layers: int) -> list[tuple[int, int]]:
    """(out, in) of every decoder-block linear: Q, K, V, O (d x d), gate, up (4d x d), down."""
    mlp = MLP_RATIO * width
    return [(width, width)] * 4 * layers + [(mlp, width), (mlp, width), (width, mlp)] * layers


def model_numbers(width: int, layers: int, *, rank: int | None = None,
                  emb_rank: int | None = None) -> int:
    """Stored numbers of the model: tied embedding, decoder linears (factored at ``rank`` when
    given, never more than dense), RMSNorm weights (2 per block + the final one)."""
    linears = sum(m * n if rank is None else min(m * n, factored_params(m, n, rank))
                  for m, n in linear_shapes(width, layers))
    embedding = VOCAB * width if emb_rank is None else factored_params(VOCAB, width, emb_rank)
    return embedding + linears + (2 * layers + 1) * width


def matched_ranks(width: int, small: int, layers: int) -> dict[str, int]:
    """Largest decoder rank whose factors hold no more numbers than the small model's decoder
    linears, then the largest embedding rank keeping the whole model within the small one's count."""
    budget_linears = model_numbers(small, layers) - VOCAB * small - (2 * layers + 1) * small
    per_rank = sum(m + n for m, n in linear_shapes(width, layers))
    rank = budget_linears // per_rank
    total = model_numbers(small, layers)
    emb_rank = (total - model_numbers(width, layers, rank=rank) + VOCAB * width) // (VOCAB + width)
    if rank < 1 or emb_rank < 1:
        raise ValueError(f"width {width} cannot be matched to width {small}: ranks {rank}, {emb_rank}")
    return {"decoder_rank": int(rank), "embedding_rank": int(emb_rank)}


# ------------------------------------------------------------------------------------------------
# Compression


class FactoredEmbedding(nn.Module):
    """Input embedding tied to a factored output head: token i -> row i of ``left @ right``."""

    def __init__(self, head: LowRankLinear) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: its factors are the lm_head's parameters

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.head.left) @ self.head.right  # (B, T, r) @ (r, d)

    def extra_repr(self) -> str:
        return f"tied to lm_head, rank={self.head.rank}"


@torch.no_grad()
def factor_embeddings_(model, rank: int) -> None:
    """Replace the tied (vocab, d) embedding and output head by one rank-``rank`` factorization."""
    weight = model.lm_head.weight.detach()  # (vocab, d), the same tensor as the input embedding
    factors = truncated_svd(weight, rank)
    head = LowRankLinear(weight.shape[1], weight.shape[0], rank, bias=False, dtype=weight.dtype)
    head.set_factors(type(factors)(factors.left.to(weight.dtype), factors.right.to(weight.dtype)))
    model.lm_head = head
    model.model.embed_tokens = FactoredEmbedding(head)
    model.config.tie_word_embeddings = False  # nothing left for transformers to tie


def compress_rank(model, rank: int) -> dict:
    report = sc.compress_(model, sc.SVDConfig(rank=rank, targets=("all-linear",), storage="dense"))
    return {"decoder_rank": rank, "embedding": "untouched", "storage": "dense",
            "mean_weight_error": float(np.mean([m.weight_error for m in report.modules]))}


def compress_decoder(model, rank: int) -> dict:
    report = sc.compress_(model, sc.SVDConfig(rank=rank, targets=("all-linear",)))
    return {"decoder_rank": rank, "embedding": "untouched", "storage": "factored",
            "mean_weight_error": float(np.mean([m.weight_error for m in report.modules]))}


def compress_matched(model, ranks: dict[str, int]) -> dict:
    report = sc.compress_(model, sc.SVDConfig(rank=ranks["decoder_rank"], targets=("all-linear",)))
    factor_embeddings_(model, ranks["embedding_rank"])
    return {**ranks, "embedding": "factored (tied)", "storage": "factored",
            "mean_weight_error": float(np.mean([m.weight_error for m in report.modules]))}


# ------------------------------------------------------------------------------------------------
# One (width, seed) row


def scored(model, facts, **extra) -> dict:
    correct = fact_correct(model, facts)
    return {"accuracy": float(np.mean(correct)), "stored_numbers": stored_numbers(model),
            "correct": correct, **extra}


def trained(width: int, seed: int, args, tokenizer) -> tuple:
    """The model of (width, seed) trained on its facts: (model, facts, records, training info)."""
    facts = make_facts(args.facts, seed)
    records = fact_records(facts, tokenizer)
    model = build_model(width, args.layers, seed)
    return model, facts, records, train_(model, tokenizer, records, args.epochs, args, seed)


def run_row(width: int, seed: int, args, tokenizer) -> dict:
    model, facts, records, info = trained(width, seed, args, tokenizer)
    row = {"width": width, "seed": seed, "train": info}
    models = {"dense": scored(model, facts)}
    small = args.widths[0]
    if width == small:
        extra = train_(model, tokenizer, records, args.recover_epochs, args, seed)
        models["small+ft"] = scored(model, facts, train=extra)
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        info = compress_rank(model, small)
        models["rank-w0"] = scored(model, facts, compression=info,
                                   factored_numbers=model_numbers(width, args.layers, rank=small))
        ranks = matched_ranks(width, small, args.layers)
        model = build_model(width, args.layers, seed)
        model.load_state_dict(state)
        info = compress_decoder(model, ranks["decoder_rank"])
        models["decoder-matched"] = scored(model, facts, compression=info)
        model = build_model(width, args.layers, seed)
        model.load_state_dict(state)
        info = compress_matched(model, ranks)
        models["params-matched"] = scored(model, facts, compression=info)
        extra = train_(model, tokenizer, records, args.recover_epochs, args, seed)
        models["params-matched+ft"] = scored(model, facts, compression=info, train=extra)
    row["models"] = models
    return row


# ------------------------------------------------------------------------------------------------
# Statistics and report


def seeds_of(results: dict, width: int) -> list[int]:
    return sorted(r["seed"] for r in results["rows"].values() if r["width"] == width)


def comparisons(results: dict) -> dict:
    """Every wide variant against the small model (``small+ft`` for ``+ft``): per seed McNemar
    over facts, and the paired t-test over the seeds both have."""
    rows, small = results["rows"], results["settings"]["widths"][0]
    out = {}
    for width in results["settings"]["widths"][1:]:
        for variant in ("dense", *VARIANTS):
            base = "small+ft" if variant.endswith("+ft") else "dense"
            seeds = [s for s in seeds_of(results, width) if f"w{small}/seed{s}" in rows]
            if not seeds:
                continue
            pairs = [(rows[f"w{small}/seed{s}"]["models"][base], rows[f"w{width}/seed{s}"]["models"][variant])
                     for s in seeds]
            per_seed = {s: mcnemar_exact(a["correct"], b["correct"]).to_dict()
                        for s, (a, b) in zip(seeds, pairs, strict=True)}
            over = paired_t([a["accuracy"] for a, _ in pairs], [b["accuracy"] for _, b in pairs])
            out[f"w{width}/{variant}"] = {"width": width, "variant": variant, "baseline": base,
                                          "seeds": seeds, "mcnemar": per_seed,
                                          "paired_t": over.to_dict()}
    return out


def verdict(cmp: dict) -> str:
    """better / worse: paired t over seeds p < 0.05 and McNemar p < 0.05 the same way in every seed."""
    t, tests = cmp["paired_t"], cmp["mcnemar"].values()
    if len(cmp["seeds"]) < 3:
        return "too few seeds"
    for sign, word in ((1, "better"), (-1, "worse")):
        if sign * t["difference"] > 0 and t["p_value"] < 0.05 and all(
                sign * m["difference"] > 0 and m["p_value"] < 0.05 for m in tests):
            return f"wide model {word}"
    return "no significant difference"


CLAIM_READING = {
    "dense": "the premise: uncompressed, the wide model learns more facts in the same epochs",
    "rank-w0": "the brief's wording, but this model stores more numbers than the small one",
    "decoder-matched": "decoder at the small one's size, wider embeddings kept",
    "params-matched": "the claim at equal size",
    "params-matched+ft": "the claim at equal size, after a short recovery",
}


def _mean_sd(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1) if len(values) > 1 else 0:.1f}"


def accuracy_table(results: dict) -> str:
    rows = results["rows"]
    names = ("dense", "small+ft", *VARIANTS)
    lines = ["| width | seeds | stored numbers (× small) | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]
    small_total = model_numbers(results["settings"]["widths"][0], results["settings"]["layers"])
    for width in results["settings"]["widths"]:
        seeds = seeds_of(results, width)
        if not seeds:
            continue
        models = [rows[f"w{width}/seed{s}"]["models"] for s in seeds]
        cells = [_mean_sd([m[n]["accuracy"] for m in models]) if n in models[0] else "–"
                 for n in names]
        sizes = f"{models[0]['dense']['stored_numbers']:,} ({models[0]['dense']['stored_numbers'] / small_total:.1f}×)"
        if "params-matched" in models[0]:
            sizes += f"; matched {models[0]['params-matched']['stored_numbers'] / small_total:.3f}×"
            sizes += f"; rank-w0 {models[0]['rank-w0']['factored_numbers'] / small_total:.1f}×"
            sizes += f"; decoder-matched {models[0]['decoder-matched']['stored_numbers'] / small_total:.2f}×"
        lines.append(f"| {width} | {len(seeds)} | {sizes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p(value: float) -> str:
    """``=0.031``; ``<1e-300`` where the exact p-value underflows double precision."""
    return "<1e-300" if value == 0 else f"={value:.2g}"


def headline(results: dict, cmps: dict) -> str:
    """The claim at 4x width (the widest model): its compressed variants against the small one."""
    widest = results["settings"]["widths"][-1]
    lines = [f"Claim: train big then compress beats training small, +55.6 % at 4× "
             f"over-parameterisation. Here: width {widest} ({widest // results['settings']['widths'][0]}× "
             "the small width), compressed, against the small model trained directly:", ""]
    for variant in ("dense", *VARIANTS):
        cmp = cmps.get(f"w{widest}/{variant}")
        if cmp is None:
            continue
        t = cmp["paired_t"]
        relative = t["difference"] / t["mean_a"] if t["mean_a"] else float("nan")
        lines.append(f"- {variant}: {100 * t['mean_b']:.1f} % vs {100 * t['mean_a']:.1f} % "
                     f"(small {cmp['baseline']}), {100 * t['difference']:+.1f} pts "
                     f"({100 * relative:+.0f} % relative), paired t over {len(cmp['seeds'])} seeds "
                     f"p{_p(t['p_value'])}: **{verdict(cmp)}** ({CLAIM_READING[variant]})")
    fair = [verdict(cmps[k]) for k in (f"w{widest}/params-matched", f"w{widest}/params-matched+ft")
            if k in cmps]
    if fair:
        word = ("holds" if "wide model better" in fair else "cannot be decided (too few seeds)"
                if "too few seeds" in fair else "does not hold")
        lines += ["", f"Verdict (the compressed wide model against the small one at the same "
                  f"number of stored parameters): **{word}**."]
    return "\n".join(lines)


def comparison_table(cmps: dict) -> str:
    lines = ["| width | model | vs | Δ accuracy, pts (mean over seeds) [95 % CI] paired-t p | "
             "per seed: Δ pts [95 % CI], McNemar p (gained/lost) | verdict |",
             "|---|---|---|---|---|---|"]
    for cmp in cmps.values():
        t = cmp["paired_t"]
        seeds = "; ".join(
            f"s{s}: {100 * m['difference']:+.1f} [{100 * m['ci_low']:+.1f}, {100 * m['ci_high']:+.1f}] "
            f"p{_p(m['p_value'])} ({m['extra']['gained']}/{m['extra']['lost']})"
            for s, m in cmp["mcnemar"].items())
        lines.append(f"| {cmp['width']} | {cmp['variant']} | small {cmp['baseline']} | "
                     f"{100 * t['difference']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}] "
                     f"p{_p(t['p_value'])} | {seeds} | {verdict(cmp)} |")
    return "\n".join(lines)


def ranks_table(results: dict) -> str:
    settings = results["settings"]
    small = settings["widths"][0]
    lines = ["| width | params-matched decoder rank | embedding rank | stored numbers | × small |",
             "|---|---|---|---|---|"]
    total = model_numbers(small, settings["layers"])
    for width in settings["widths"][1:]:
        ranks = matched_ranks(width, small, settings["layers"])
        n = model_numbers(width, settings["layers"], rank=ranks["decoder_rank"],
                          emb_rank=ranks["embedding_rank"])
        lines.append(f"| {width} | {ranks['decoder_rank']} | {ranks['embedding_rank']} | {n:,} | "
                     f"{n / total:.3f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    rows, widths = results["rows"], results["settings"]["widths"]
    sweep = results.get("sweep", {})
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    for name, style in (("dense", "o-"), ("rank-w0", "s--"), ("decoder-matched", "d--"),
                        ("params-matched", "v--"),
                        ("params-matched+ft", "^-")):
        points = []
        for width in widths:
            accs = [rows[f"w{width}/seed{s}"]["models"][name]["accuracy"]
                    for s in seeds_of(results, width) if name in rows[f"w{width}/seed{s}"]["models"]]
            if accs:
                points.append((width, 100 * np.mean(accs), 100 * np.std(accs)))
        if points:
            x, y, e = zip(*points, strict=True)
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=name)
    for name, ls in (("dense", "--"), ("small+ft", ":")):
        accs = [rows[f"w{widths[0]}/seed{s}"]["models"][name]["accuracy"]
                for s in seeds_of(results, widths[0])]
        if accs:
            ax.axhline(100 * np.mean(accs), color="grey", ls=ls, lw=1,
                       label=f"small (width {widths[0]}){' + ft' if name != 'dense' else ''}")
    ax.set_xlabel("hidden width trained")
    ax.set_ylabel("fact accuracy, % (mean ± sd over seeds)")
    ax.set_xticks(widths)
    ax.set_title(f"Train big then compress: {results['settings']['facts']} facts, "
                 f"{results['settings']['epochs']} epochs")
    ax.legend(fontsize=8)
    if sweep:
        plot_sweep(axes[0, 1], results)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_sweep(ax, results: dict) -> None:
    small, layers = results["settings"]["widths"][0], results["settings"]["layers"]
    total = model_numbers(small, layers)
    for name, row in results["sweep"].items():
        points = sorted((run["numbers"] / total, 100 * run["accuracy"]) for run in row["ranks"].values())
        ax.plot(*zip(*points, strict=True), "o-", label=f"{name}: decoder rank sweep")
        for rank, run in row["ranks"].items():
            ax.annotate(rank, (run["numbers"] / total, 100 * run["accuracy"]), fontsize=7)
        base = results["rows"].get(f"w{small}/seed{row['seed']}")
        if base:
            ax.axhline(100 * base["models"]["dense"]["accuracy"], color="grey", ls="--", lw=1,
                       label=f"small (width {small}), seed {row['seed']}")
    ax.axvline(1.0, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("stored numbers / small model's")
    ax.set_ylabel("fact accuracy, %")
    ax.set_title("compressed widest model: rank sweep (labels: rank)")
    ax.legend(fontsize=8)


def report(results: dict, out: Path) -> str:
    cmps = comparisons(results)
    results["comparisons"] = cmps
    s = results["settings"]
    text = (f"Facts: {s['facts']} random 'k k k -> v' facts (accuracy = greedy exact match on the "
            f"training facts); {s['layers']} Llama blocks, head 32, MLP 4×, tied embeddings, "
            f"vocab {VOCAB}; {s['epochs']} epochs, lr {s['lr']}, batch {s['batch_size']} at every "
            f"width; +ft = {s['recover_epochs']} more epochs, same settings.\n\n"
            "Models: dense = trained at that width; small+ft = the width-"
            f"{s['widths'][0]} model trained +ft more; rank-w0 = every decoder linear of the wide "
            f"model truncated to rank {s['widths'][0]} (plain SVD), embeddings untouched (more "
            "numbers than the small model: × small below counts factors where smaller); "
            "decoder-matched = every decoder linear at the parameter-matched rank below, "
            "embeddings untouched; params-matched = decoder linears and the tied embedding "
            "factored so the whole model stores no more numbers than the small one; "
            "params-matched+ft = that, fine-tuned +ft (compare with small+ft).\n\n"
            "Accuracy, % (mean ± sd over seeds):\n\n" + accuracy_table(results) +
            "\n\nParameter-matched ranks (all decoder linears at one rank, tied embedding "
            "factored; stored numbers within the small model's):\n\n" + ranks_table(results) +
            "\n\nAgainst the small model trained directly (same facts, same seed):\n\n" +
            comparison_table(cmps) + "\n\n" + headline(results, cmps) + "\n")
    if results.get("sweep"):
        text += ("\nRank sweep of the widest model (decoder linears only; embeddings untouched, "
                 "stored numbers counted as factors where that is smaller):\n\n"
                 + sweep_table(results) + "\n")
    (out / "table.md").write_text(text)
    plot(results, out / "accuracy_vs_width.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/claims/train_big"))
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 160, 256],
                        help="hidden widths; the first is the small model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--facts", type=int, default=4000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--recover-epochs", type=float, default=1.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep-ranks", type=int, nargs="*", default=[],
                        help="after the grid: decoder ranks for a sweep of the widest model "
                        "(retrained, embeddings untouched)")
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite table.md and the plot from results.json, train nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("svdcompress").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in SETTINGS}
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "rows": {}}
    previous = results.pop("provenance", None)  # every command that added rows stays named
    if previous and previous["command"] not in results.setdefault("commands", []):
        results["commands"].append(previous["command"])
    results["settings"].pop("widths", None)
    if results["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings {results['settings']}; use another --out")
    results["settings"]["widths"] = sorted(set(args.widths) | {r["width"] for r in results["rows"].values()})
    if args.widths[0] != results["settings"]["widths"][0]:
        raise SystemExit(f"the small width must be the smallest: {results['settings']['widths']}")
    if not args.report_only:
        run_all(results, path, args)
    print(report(results, args.out))
    if not args.report_only:  # a report leaves the results (and the command that made them) alone
        write_results(path, results)


def run_sweep(width: int, seed: int, args, tokenizer) -> dict:
    """Decoder linears of one trained wide model at each ``--sweep-ranks`` rank (factored where
    that is smaller, else dense), embeddings untouched: where does it cross the small model?"""
    model, facts, _, info = trained(width, seed, args, tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    row = {"width": width, "seed": seed, "train": info, "dense": scored(model, facts), "ranks": {}}
    for rank in args.sweep_ranks:
        model = build_model(width, args.layers, seed)
        model.load_state_dict(state)
        factored = all(rank <= (m * n - 1) // (m + n) for m, n in linear_shapes(width, args.layers))
        (compress_decoder if factored else compress_rank)(model, rank)
        row["ranks"][str(rank)] = scored(
            model, facts, numbers=model_numbers(width, args.layers, rank=rank))
        logging.info("sweep w%d/seed%d rank %d: %.3f", width, seed, rank,
                     row["ranks"][str(rank)]["accuracy"])
    return row


def sweep_table(results: dict) -> str:
    settings = results["settings"]
    small = settings["widths"][0]
    total = model_numbers(small, settings["layers"])
    lines = ["| model | seed | decoder rank | stored numbers (× small) | accuracy | "
             "vs small, pts [95 % CI] McNemar p |", "|---|---|---|---|---|---|"]
    for row in results.get("sweep", {}).values():
        base = results["rows"].get(f"w{small}/seed{row['seed']}")
        for rank, run in row["ranks"].items():
            cmp = mcnemar_exact(base["models"]["dense"]["correct"], run["correct"]) if base else None
            cell = (f"{100 * cmp.difference:+.1f} [{100 * cmp.ci_low:+.1f}, {100 * cmp.ci_high:+.1f}] "
                    f"p{_p(cmp.p_value)}" if cmp else "")
            lines.append(f"| width {row['width']} | {row['seed']} | {rank} | {run['numbers']:,} "
                         f"({run['numbers'] / total:.2f}×) | {100 * run['accuracy']:.1f} % | {cell} |")
    return "\n".join(lines)


def run_all(results: dict, path: Path, args) -> None:
    tokenizer = make_tokenizer()
    for seed in args.seeds:
        for width in args.widths:
            name = f"w{width}/seed{seed}"
            if name in results["rows"]:
                continue
            started = time.perf_counter()
            row = run_row(width, seed, args, tokenizer)
            row["wall_s"] = round(time.perf_counter() - started, 1)
            results["rows"][name] = row
            write_results(path, results)
            logging.info("%s: %s in %.0f s", name, {k: round(v["accuracy"], 3)
                                                    for k, v in row["models"].items()}, row["wall_s"])
    sweeps = results.setdefault("sweep", {})
    for seed in args.sweep_seeds if args.sweep_ranks else ():
        name = f"w{args.widths[-1]}/seed{seed}"
        if name not in sweeps or set(map(str, args.sweep_ranks)) - set(sweeps[name]["ranks"]):
            sweeps[name] = run_sweep(args.widths[-1], seed, args, tokenizer)
            write_results(path, results)


if __name__ == "__main__":
    main()
