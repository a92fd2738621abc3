"""``README.md`` model cards in the Hugging Face hub's format, for every saved checkpoint.

The card is rendered from the checkpoint's ``compression_config`` alone (what was done, with which
data and seed, by which command), so it can be rendered again at any time: ``svdcompress eval DIR
--reference BASE`` does, adding its table of measured quality beside the original's.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from svdcompress.checkpoint import SvdCompressQuantizationConfig, guard_names
from svdcompress.errors import CheckpointError
from svdcompress.fetch import atomic_write_text
from svdcompress.recipe import RECIPE_FILE, steps_after

__all__ = ["CARD_FILE", "markdown_table", "render_card", "update_card"]

CARD_FILE = "README.md"

# Built-in aliases (zoo.ALIASES) name the hub model their weights come from, and its license.
_KNOWN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_METHODS = {
    "svd": "truncated SVD (data-free)",
    "whiten": "SVD-LLM truncation-aware whitening",
    "asvd": "ASVD activation-aware scaling",
    "fisher": "Fisher-weighted SVD (FWSVD)",
    "importance": "importance-selected singular directions",
    "int8-rtn": "INT8 round-to-nearest of every targeted layer, no SVD (baseline)",
}


def _base(compression: dict) -> tuple[str | None, str | None, str | None]:
    """(spec as given, hub id, license) of the base model, as far as they are known."""
    spec = compression.get("base_model")
    if not spec:
        return None, None, None
    if spec.lower() in _KNOWN_BASES:
        return (spec, *_KNOWN_BASES[spec.lower()])
    folder = Path(spec)
    if folder.is_dir():  # a local folder: its own card may name the license
        return spec, None, _front_matter(folder / CARD_FILE).get("license")
    return spec, spec if _HUB_ID.match(spec) else None, None


def _front_matter(card: Path) -> dict:
    import yaml

    if not card.is_file():
        return {}
    match = re.match(r"^---\n(.*?)\n---\n", card.read_text(errors="replace"), re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _metadata(compression: dict) -> str:
    import yaml

    _, hub_id, license_id = _base(compression)
    settings = compression.get("config") or {}
    int8 = any(s.get("quant_bits") for s in (compression.get("modules") or {}).values())
    tags = ["svdcompress", "low-rank", "svd", "compressed", settings.get("method", "svd")]
    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
        # Trained after compression (recover, finetune): the hub calls that a fine-tune.
        trained = compression.get("recovery") or compression.get("finetune")
        meta["base_model_relation"] = "finetune" if trained else "quantized"
    meta["library_name"] = "transformers"
    if license_id:
        meta["license"] = license_id
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [*dict.fromkeys(tags), *(["int8"] if int8 else [])]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _ratio(settings: dict) -> str:
    if settings.get("param_ratio") is not None:
        return f"param_ratio {settings['param_ratio']} (parameters kept / before, per targeted matrix)"
    if settings.get("rank_ratio") is not None:
        return f"rank_ratio {settings['rank_ratio']} (rank / min(out, in))"
    if settings.get("rank") is not None:
        return f"rank {settings['rank']} (singular values kept per matrix)"
    return "full rank (no factorization)"


def _what_was_done(compression: dict) -> list[tuple[str, str]]:
    settings = compression.get("config") or {}
    tables = {key: compression[key] for key in ("head", "embeddings") if compression.get(key)}
    modules = {name: spec for name, spec in (compression.get("modules") or {}).items()
               if name not in {table["name"] for table in tables.values()}}
    ranks = [spec["rank"] for spec in modules.values()]
    storage = sorted({spec["storage"] for spec in modules.values()})
    int8 = sum(1 for spec in modules.values() if spec.get("quant_bits"))
    rows = [
        ("method", f"`{settings.get('method')}`: {_METHODS.get(settings.get('method'), 'see config')}"),
        ("ratio", _ratio(settings)),
        ("targets", ", ".join(f"`{t}`" for t in settings.get("targets", [])) or "-"),
        ("modules replaced", f"{len(modules)}" + _rank_range(ranks)),
        ("storage", ", ".join(storage) + (" (dense rank-r matrices: no parameters saved, denoising)"
                                          if storage == ["dense"] else "")),
        ("factors", f"INT8 (per-row float32 scales) in {int8} of {len(modules)} modules" if int8
         else "float (the model's dtype)"),
        ("left dense", _left_dense(settings)),
    ]
    for key, what in (("head", "output head"), ("embeddings", "input embeddings")):
        if key in tables:
            table = tables[key]
            untied = " (untied from the " + ("input embeddings" if key == "head" else "output head") + ")"
            rows.append((what, f"INT{table['quant_bits']} per-row, relative weight error "
                         f"{table['weight_error']:.4f}" + (untied if table["untied"] else "")))
    if settings.get("rank_pattern"):
        rows.append(("per-module ranks", f"{len(settings['rank_pattern'])} rank_pattern entries (recipe)"))
    if settings.get("update") or settings.get("refine_iters"):
        rows.append(("extra steps", ", ".join(
            [*(["least-squares update of the left factor"] if settings.get("update") else []),
             *([f"{settings['refine_iters']} refinement steps"] if settings.get("refine_iters") else [])])))
    rows.append(("calibration data", f"`{compression['calibration']}`" if compression.get("calibration")
                 else "none (data-free)"))
    if compression.get("importance"):
        rows.append(("importance data", f"`{compression['importance']}`"))
    rows.append(("seed", str(settings.get("seed", "-"))))
    rows.append(("svdcompress", str(compression.get("library_version", "?"))))
    return rows


def _rank_range(ranks: list[int]) -> str:
    if not ranks:
        return ""
    if min(ranks) == max(ranks):
        return f", rank {ranks[0]}"
    return f", rank {min(ranks)}–{max(ranks)} (median {statistics.median(ranks):g})"


def _left_dense(settings: dict) -> str:
    embeddings = "" if settings.get("embedding_quant_bits") else "embeddings, "
    head = "" if settings.get("head_quant_bits") else ", the output head"
    kept = f"{embeddings}norms{head} and every layer outside the targets"
    if settings.get("exclude"):
        kept += "; excluded: " + ", ".join(f"`{p}`" for p in settings["exclude"])
    return kept


def markdown_table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside a cell is escaped."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def render_card(compression: dict, *, has_recipe: bool, evaluation: str | None = None) -> str:
    """The card of a checkpoint whose ``config.json`` holds ``compression``; ``evaluation`` is the
    markdown of a measured comparison (see :func:`update_card`)."""
    spec, hub_id, _ = _base(compression)
    base = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{spec or 'unknown'}`"
    parts = [
        _metadata(compression),
        f"# {spec or 'A model'}, low-rank compressed with svdcompress\n",
        f"Linear layers of {base} replaced by low-rank (SVD) factors with "
        "[svdcompress](https://pypi.org/project/svdcompress/).\n",
        "## What was done\n",
        markdown_table(["", ""], _what_was_done(compression)) + "\n",
    ]
    steps = steps_after(compression)
    if steps:
        parts.append(f"Then: {', '.join(steps)} (see `compression_config` in `config.json`).\n")
    parts += ["## How it was made\n", _how_made(compression, has_recipe, steps), "## Use\n",
              _USAGE + _without_svdcompress(compression), "## Quality\n", evaluation or f"Not measured yet: `svdcompress eval THIS_FOLDER --reference "
              f"{spec or 'BASE_MODEL'}` writes the comparison here.\n"]
    return "\n".join(parts)


def _how_made(compression: dict, has_recipe: bool, steps: list[str]) -> str:
    command = compression.get("command")
    text = f"```bash\n{command}\n```\n\n" if command else "Made through the Python API.\n\n"
    if has_recipe:
        text += (f"`{RECIPE_FILE}` beside this card holds every setting: `svdcompress compress "
                 f"{compression.get('base_model') or 'BASE_MODEL'} --recipe {RECIPE_FILE} --out NEW` "
                 "rebuilds these weights bit for bit from the same base model.\n")
    else:
        why = ", ".join(steps) if steps else "the INT8 baseline is not a compress method"
        text += f"No `{RECIPE_FILE}`: no single compress call reproduces these weights ({why}).\n"
    return text


_USAGE = """\
```python
import svdcompress  # registers the svdcompress loader with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")   # or svdcompress.load("THIS_FOLDER")
dense = model.dequantize()                                     # a plain transformers model
```
"""


def _without_svdcompress(compression: dict) -> str:
    """What stock transformers does with the folder (see checkpoint.guard_names)."""
    layout = SvdCompressQuantizationConfig(modules=compression.get("modules"), fused=compression.get("fused"))
    if guard_names(layout):
        return ("\nWithout `import svdcompress`, transformers refuses this folder (a size-mismatch "
                "error on the compressed layers) rather than loading it with random weights.\n")
    return ("\nWithout `import svdcompress`, transformers loads it as a plain model: every replaced "
            "layer holds its dense rank-r weight under the original name.\n")


def update_card(folder: str | Path, evaluation: str) -> Path:
    """Render ``folder``'s card again with ``evaluation`` (markdown); the file is replaced atomically."""
    folder = Path(folder)
    try:
        compression = json.loads((folder / "config.json").read_text())["compression_config"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder} is not a compressed checkpoint folder ({err}).") from None
    card = folder / CARD_FILE
    atomic_write_text(card, render_card(compression, has_recipe=(folder / RECIPE_FILE).is_file(),
                                        evaluation=evaluation))
    return card
