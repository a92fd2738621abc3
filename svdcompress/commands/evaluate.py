"""``svdcompress eval``: perplexity, fact recall, optional benchmark tasks (lm-eval), fidelity and
generation quality; with a reference, per-item paired statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from svdcompress.commands import handle_errors
from svdcompress.commands._vocabulary import (
    DEFAULT_DATA,
    DEFAULT_DEVICE,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_WINDOWS,
    DEVICE_HELP,
    write_json,
)
from svdcompress.pipelines.evaluate import run_eval

__all__ = ["comparison_rows", "register", "render_table"]

_NONE = ("", "none", "off")


def _ppl_row(label: str, ppl: dict[str, Any]) -> tuple[str, str, str]:
    detail = (
        f"{ppl['dataset']}/{ppl['split']}: {ppl['n_windows']} windows × {ppl['seq_len']} tokens, "
        f"{ppl['n_tokens']:,} predictions scored"
    )
    return label, f"{ppl['perplexity']:.3f}", detail


_PERPLEXITY_ROWS = {"perplexity (held-out)": "perplexity", "perplexity (second domain)": "second_domain"}


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [_ppl_row(label, result[key]) for label, key in _PERPLEXITY_ROWS.items() if key in result]
    if "facts" in result:
        facts = result["facts"]
        detail = f"{facts['n_correct']} / {facts['n']} BIG-bench qa_wikidata eval facts, greedy"
        rows.append(("fact recall", f"{facts['accuracy']:.1%}", detail))
    if "fidelity" in result:
        fid = result["fidelity"]
        rows.append(
            ("KL(ref‖model)", f"{fid['kl']:.4f}", f"nats per token over {fid['n_tokens']:,} tokens")
        )
        rows.append(
            (
                "top-1 agreement",
                f"{fid['top1_agreement']:.1%}",
                f"logit cosine {fid['cosine']:.4f}, MSE {fid['mse']:.4g}",
            )
        )
    for name, task in result.get("tasks", {}).get("tasks", {}).items():
        detail = (f"{task['n']} items, chance {task['chance']:.1%}, "
                  f"{task['elapsed_s']:.0f} s (lm-eval)")
        rows.append((f"{name} ({task['metric']})", f"{task['score']:.1%}", detail))
    if "generation" in result:
        gen = result["generation"]
        rows.append(
            (
                "repetition rate",
                f"{gen['repetition_rate']:.3f}",
                "share of repeated 4-grams in greedy continuations",
            )
        )
        rows.append(
            (
                "distinct-1 / distinct-2",
                f"{gen['distinct_1']:.3f} / {gen['distinct_2']:.3f}",
                f"{len(gen['prompts'])} prompts × ≤{gen['max_new_tokens']} tokens",
            )
        )
    return rows


def render_table(result: dict[str, Any]) -> Any:
    """A rich table of an :func:`run_eval` result."""
    from rich.table import Table

    run = result.get("run", {})
    params = result["model"]["parameters"]
    table = Table(
        title=f"svdcompress eval · {run.get('model_spec', result['model']['name'])} · {params / 1e6:.1f}M parameters",
        caption=f"{run.get('elapsed_s', '?')} s · torch {run.get('torch', '?')} · {run.get('cpu_threads', '?')} threads",
    )
    if result.get("reference") is not None:
        table.title += f"\nreference: {run.get('reference_spec', '')}"
    headers, rows = comparison_rows(result)
    for header in headers:
        numeric = header not in ("metric", "measured on")
        table.add_column(header, justify="right" if numeric else "left", no_wrap=header != "measured on")
    for row in rows:
        table.add_row(*row)
    return table


def comparison_rows(result: dict[str, Any]) -> tuple[list[str], list[tuple[str, ...]]]:
    """Column names and rows of a :func:`run_eval` result: the model's values and, with a
    reference, the reference's, their ratio and the paired statistics (also the model card's)."""
    reference = result.get("reference")
    if reference is None:
        return ["metric", "value", "measured on"], _rows(result)
    reference_values = {label: value for label, value, _ in _rows(reference)}
    ratios = {label: f"{result[key]['perplexity'] / reference[key]['perplexity']:.3f}"
              for label, key in _PERPLEXITY_ROWS.items() if key in result and key in reference}
    paired = _paired_details(result.get("paired", {}))
    rows = [(label, value, reference_values.get(label, ""), ratios.get(label, ""),
             paired.get(label.split(" (")[0], detail)) for label, value, detail in _rows(result)]
    return ["metric", "value", "reference", "× reference", "measured on"], rows


def _update_card(model_spec: str, result: dict[str, Any]) -> None:
    """A compressed checkpoint folder's model card gets this table (beside the reference's)."""
    from svdcompress.checkpoint import is_compressed_checkpoint
    from svdcompress.modelcard import markdown_table, update_card

    if not is_compressed_checkpoint(model_spec):
        return
    run = result["run"]
    against = f" beside the original `{run['reference_spec']}`" if run.get("reference_spec") else ""
    evaluation = (f"Measured by `svdcompress eval`{against} on {run['date']} "
                  f"(svdcompress {run['svdcompress']}, torch {run['torch']}):\n\n"
                  f"{markdown_table(*comparison_rows(result))}\n")
    typer.echo(f"updated {update_card(model_spec, evaluation)}")


def _paired_details(paired: dict[str, Any]) -> dict[str, str]:
    """Row label -> "Δ +1.2 pts [−0.5, +2.9] vs reference, mcnemar-exact p=0.21, n=251"."""
    details = {}
    for name, cmp in paired.items():
        details["fact recall" if name == "facts" else name] = (
            f"Δ {100 * cmp['difference']:+.1f} pts [{100 * cmp['ci_low']:+.1f}, "
            f"{100 * cmp['ci_high']:+.1f}] vs reference, {cmp['test']} p={cmp['p_value']:.2g}, "
            f"n={cmp['n']}"
        )
    return details


def register(app: typer.Typer) -> None:
    from svdcompress.zoo import DEFAULT_MODEL

    @app.command("eval")
    def eval_command(
        model: Annotated[
            str,
            typer.Argument(help="alias, local folder (plain or compressed), .gguf file or hub id"),
        ] = DEFAULT_MODEL,
        data: Annotated[
            str,
            typer.Option(
                help="text source whose held-out split gives the perplexity (wiki, sotu, news)"
            ),
        ] = DEFAULT_DATA,
        seq_len: Annotated[int, typer.Option(help="tokens per window")] = DEFAULT_SEQ_LEN,
        windows: Annotated[int, typer.Option(help="windows scored")] = DEFAULT_WINDOWS,
        seed: Annotated[int, typer.Option(help="picks the windows")] = DEFAULT_SEED,
        second_domain: Annotated[
            str, typer.Option(help="a second text source; 'none' skips it")
        ] = "sotu",
        facts: Annotated[
            int, typer.Option(help="qa_wikidata facts for fact recall; 0 skips it")
        ] = 300,
        reference: Annotated[
            str | None,
            typer.Option(help="the original: measured the same way side by side, plus logits fidelity"),
        ] = None,
        generation: Annotated[
            bool, typer.Option(help="also score greedy generations for repetition")
        ] = False,
        tasks: Annotated[
            str | None,
            typer.Option(help="benchmark tasks through lm-eval, comma-separated or 'all' "
                         "(truthfulqa_mc1, truthfulqa_mc2, arc_style, winogrande_style, "
                         "hellaswag_style, mmlu, mmlu_cloze, general_knowledge, misconceptions)"),
        ] = None,
        limit: Annotated[
            int | None, typer.Option(help="score only N items of each task (a fixed random subset)")
        ] = None,
        batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass")] = 8,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="also write the full result here")
        ] = None,
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
    ) -> None:
        """Measure MODEL: held-out perplexity, second-domain perplexity, fact recall, and the
        benchmark --tasks; with --reference, side by side with per-item paired statistics."""
        from rich.console import Console

        with handle_errors():
            result = run_eval(
                model,
                reference_spec=reference,
                data=data,
                seq_len=seq_len,
                n_samples=windows,
                seed=seed,
                second_domain=None if second_domain.lower() in _NONE else second_domain,
                facts=facts,
                generation=generation,
                batch_size=batch_size,
                tasks=tasks,
                limit=limit,
                device=device,
            )
            Console().print(render_table(result))
            if json_out is not None:
                write_json(json_out, result)
            _update_card(model, result)
