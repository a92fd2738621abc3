"""``svdcompress eval``: perplexity, fact recall, optional benchmark tasks (lm-eval), fidelity and
generation quality; with a reference, per-item paired statistics."""

from __future__ import annotations

import platform
import time
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

__all__ = ["comparison_rows", "register", "render_table", "run_eval"]

_NONE = ("", "none", "off")


def _check_tasks(tasks: str | None, limit: int | None) -> list[str]:
    """Task names to run, checked before any model is loaded (fail fast on a typo)."""
    from svdcompress.errors import TaskError

    if not tasks:
        if limit is not None:
            raise TaskError("--limit applies to --tasks; give --tasks too (e.g. --tasks mmlu)")
        return []
    from svdcompress.tasks import check_task_request

    return check_task_request(tasks, limit)


def _paired(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per-item paired comparisons (model − reference) of the task scores and fact recall."""
    from svdcompress.stats import mcnemar_exact

    paired: dict[str, Any] = {}
    if "tasks" in result and "tasks" in reference:
        from svdcompress.tasks import compare_task_results

        paired.update(compare_task_results(result["tasks"], reference["tasks"]))
    if "facts" in result and "facts" in reference:
        hits = [[float(h["correct"]) for h in r["facts"]["hits"]] for r in (reference, result)]
        paired["facts"] = {"metric": "accuracy", **mcnemar_exact(*hits).to_dict()}
    return paired


def run_eval(
    model_spec: str,
    *,
    reference_spec: str | None = None,
    tasks: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    **settings: Any,
) -> dict[str, Any]:
    """Load the model (and reference) and run :func:`svdcompress.evaluate.evaluate_model`, plus the
    benchmark ``tasks`` (comma-separated, :func:`svdcompress.tasks.evaluate_tasks`) when given.

    With a reference, both are measured the same way and the per-item paired comparisons go to
    ``result["paired"]``. ``device``: where both models run (``auto``, ``cpu``, ``cuda``, ...).
    """
    import torch

    from svdcompress import __version__
    from svdcompress.datasets import check_window_request
    from svdcompress.devices import resolve_device
    from svdcompress.evaluate import evaluate_model
    from svdcompress.zoo import load_model

    task_names = _check_tasks(tasks, limit)
    device = resolve_device(device)
    # Everything that needs no model is checked first: fail before a minute of loading.
    check_window_request(settings.get("seq_len", 512), settings.get("n_samples", 64),
                         source=settings.get("data", "wiki"))
    if settings.get("second_domain"):
        check_window_request(settings.get("seq_len", 512), settings.get("n_samples", 64),
                             source=settings["second_domain"])
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, device=device)
    reference, reference_tokenizer = (load_model(reference_spec, device=device) if reference_spec
                                      else (None, None))
    result = evaluate_model(model, tokenizer, reference=reference, **settings)
    batch_size = settings.get("batch_size", 8)
    if task_names:
        from svdcompress.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(
            model, tokenizer, task_names, limit=limit, batch_size=batch_size
        )
    if reference is not None:  # the same measurements of the original, for side-by-side columns
        result["reference"] = evaluate_model(reference, reference_tokenizer, **settings)
        if task_names:
            result["reference"]["tasks"] = evaluate_tasks(
                reference, reference_tokenizer, task_names, limit=limit, batch_size=batch_size
            )
        result["paired"] = _paired(result, result["reference"])
    result["run"] = {
        "model_spec": model_spec,
        "reference_spec": reference_spec,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "svdcompress": __version__,
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "machine": platform.machine(),
    }
    return result


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
