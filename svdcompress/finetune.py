"""Fine-tuning on the Hugging Face ``Trainer``: freezing, LoRA through ``peft``, resumable runs.

The training loop is the ``Trainer``'s (AdamW, linear decay, gradient clipping at 1.0, seeded data
order), so multi-GPU, FSDP and DeepSpeed come from ``accelerate``'s configuration, not from code
here. What this module adds:

- :func:`freeze_layers`: the CF90 protection. The bottom ``ratio`` of the decoder blocks and the
  token embeddings stop training (with tied embeddings that is also the output head).
- LoRA baselines (``FinetuneConfig.lora_rank``): adapters on the same Q/K/O projections CF90
  compresses, merged into the weights before saving, so a LoRA result is an ordinary model that
  every evaluation path reads like any other.
- Data (:func:`load_examples`): plain text (documents separated by blank lines, cut into windows of
  ``seq_len`` tokens) or JSONL with ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``
  records (loss on the completion tokens only).
- A NaN guard: when a step's gradients are not finite the run stops, the weights go back to those
  of the last step whose loss was finite, and the result says so (``stopped="non-finite loss"``).
- Resume: the Trainer's periodic states live in ``state_dir`` beside a fingerprint of the starting
  model, the data and the settings; a resumed run against anything else is refused.

Compressed checkpoints fine-tune like any model: their float factors (or dense rank-r matrices)
are ordinary parameters. A dense-stored rank-r matrix that trains is no longer rank r; factored
modules keep their rank. INT8 factors cannot train (refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdcompress import distributed
from svdcompress.devices import resolve_device
from svdcompress.errors import ConfigError, DatasetError
from svdcompress.provenance import model_digest
from svdcompress.targets import decoder_blocks, find_targets

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "finetune_",
    "freeze_layers",
    "load_examples",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)

SETTINGS_FILE = "finetune_settings.json"
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt tokens, padding)


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults are CF90's gentle regime: 1 epoch, lr 1e-5, batch 4.

    ``freeze`` is the fraction of decoder blocks frozen from the bottom (0.75 in CF90);
    ``lora_rank`` trains LoRA adapters on ``lora_targets`` instead of the weights (the whole model
    stays frozen, ``freeze`` must be 0). ``checkpoint_every`` is how often (in steps) a resumable
    state is written; 0 writes none.
    """

    epochs: float = 1.0
    lr: float = 1e-5
    batch_size: int = 4
    seq_len: int = 256
    freeze: float = 0.0
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 * lora_rank
    lora_targets: tuple[str, ...] = ("qko",)
    seed: int = 0
    weight_decay: float = 0.0
    warmup: float = 0.0  # warm-up steps, or a fraction of all steps when below 1
    max_grad_norm: float = 1.0
    gradient_accumulation: int = 1
    checkpoint_every: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs={self.epochs}: train for a positive number of epochs (e.g. 1).")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr}: the learning rate must be a positive number (e.g. 1e-5).")
        if not 0.0 <= self.freeze <= 1.0:
            raise ConfigError(f"freeze={self.freeze} is outside [0, 1]; it is the fraction of "
                              "decoder blocks frozen from the bottom (CF90 uses 0.75).")
        for name in ("batch_size", "seq_len", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len}: a training window needs at least 2 tokens.")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0: never).")
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ConfigError(f"lora_rank={self.lora_rank} must be at least 1 (e.g. 8 or 16).")
            if self.freeze:
                raise ConfigError("LoRA trains adapters only and keeps every weight frozen already; "
                                  "use either lora_rank or freeze, not both.")

    def fingerprinted(self) -> dict[str, Any]:
        """Settings a resumed run must share (how often states are written is not one of them)."""
        settings = dataclasses.asdict(self)
        for name in ("checkpoint_every", "device"):
            settings.pop(name)
        settings["lora_targets"] = list(self.lora_targets)
        return settings


@dataclass
class FinetuneResult:
    """What a run did: steps, losses, what was frozen, and why it stopped."""

    steps: int
    epochs: float
    n_examples: int
    loss_tokens_per_epoch: int  # target tokens that carry a loss in one pass over the data
    first_loss: float | None
    final_loss: float | None
    losses: list[dict[str, float]]
    trainable_params: int
    frozen_params: int
    freezing: dict[str, Any] | None
    lora: dict[str, Any] | None
    stopped: str  # "completed" or "non-finite loss"
    resumed_from_step: int | None
    wall_seconds: float
    peak_memory_mb: float
    device: str
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Freezing


def freeze_layers(model: nn.Module, ratio: float = 0.75) -> dict[str, Any]:
    """Freeze the bottom ``ratio`` of decoder blocks and, when any block is frozen, the token
    (and position) embeddings. Everything else is left as it was (call on a fully trainable model).

    ``n_frozen = floor(ratio * n_layers)``: 0.75 of SmolLM2's 30 blocks freezes blocks 0-21.
    Embeddings are frozen with the blocks because they feed only the frozen bottom; with tied
    embeddings (SmolLM2, GPT-2) this also freezes the output head, which is the same tensor. The
    final norm and an untied head keep training. Returns ``n_frozen``, ``n_layers``,
    ``frozen_blocks``, ``embeddings_frozen``, ``head_frozen``, ``frozen_params`` and
    ``trainable_params`` (each tensor counted once).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"freeze ratio {ratio} is outside [0, 1]; it is the fraction of decoder "
                          "blocks frozen from the bottom (CF90 uses 0.75).")
    _, blocks = decoder_blocks(model)
    n_frozen = math.floor(ratio * len(blocks) + 1e-9)
    for block in list(blocks)[:n_frozen]:
        block.requires_grad_(False)
    # Every embedding outside the blocks: the token one, and the learned positions of GPT-2 (wpe),
    # GPT-Neo and OPT (embed_positions).
    inside = {id(m) for block in blocks for m in block.modules()}
    embeddings = [model.get_input_embeddings()]
    embeddings += [m for m in model.modules() if isinstance(m, nn.Embedding)
                   and id(m) not in inside and m is not embeddings[0]]
    if n_frozen:
        for embedding in embeddings:
            embedding.requires_grad_(False)
    head = model.get_output_embeddings()
    counts = parameter_counts(model)
    return {
        "n_frozen": n_frozen,
        "n_layers": len(blocks),
        "ratio": ratio,
        "frozen_blocks": list(range(n_frozen)),
        "embeddings_frozen": bool(n_frozen),
        # an int8 head (head_quant_bits) holds codes, no weight parameter: it cannot train
        "head_frozen": head is not None and not any(p.requires_grad for p in head.parameters(recurse=False)
                                                    if p.dim() == 2),
        **counts,
    }


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameters, each tensor counted once (tied weights are one tensor)."""
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {"trainable_params": trainable,
            "frozen_params": sum(p.numel() for p in unique) - trainable}


# --------------------------------------------------------------------------------------------------
# Data


def load_examples(path: str | Path) -> list[dict[str, str]]:
    """Training records from a file: ``.jsonl`` (``text`` or ``prompt``/``completion`` per line) or
    plain text (documents separated by blank lines).

    Errors name the file and the line: an empty file, a line that is not JSON, a record without
    the fields, a record mixing both kinds.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--data {path}: no such file; pass a .txt or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        records = _jsonl_records(path, text)
    else:
        records = [{"text": doc.strip()} for doc in text.split("\n\n") if doc.strip()]
    if not records:
        raise DatasetError(f"{path} holds no training text; it is empty.")
    return records


def _jsonl_records(path: Path, text: str) -> list[dict[str, str]]:
    records, kinds = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be one "
                               'object like {"text": ...} or {"prompt": ..., "completion": ...}.') from None
        if isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip():
            kinds.add("text")
            records.append({"text": record["text"]})
        elif (isinstance(record, dict) and isinstance(record.get("prompt"), str)
              and isinstance(record.get("completion"), str) and record["completion"].strip()):
            kinds.add("prompt/completion")
            records.append({"prompt": record["prompt"], "completion": record["completion"]})
        else:
            raise DatasetError(f'{path}:{number}: expected {{"text": "..."}} or {{"prompt": "...", '
                               f'"completion": "..."}} with non-empty strings, got {line[:80]!r}.')
    if len(kinds) > 1:
        raise DatasetError(f"{path} mixes text and prompt/completion records; use one kind per file.")
    return records


def tokenize_examples(tokenizer: Any, records: list[dict[str, str]], seq_len: int) -> list[dict]:
    """``input_ids`` and ``labels`` per training row.

    Text records are cut into windows of at most ``seq_len`` tokens (every token scored);
    prompt/completion records become one row each, the prompt's labels set to -100 so only the
    completion carries loss; a row longer than ``seq_len`` loses tokens from the prompt's start.
    """
    rows = []
    for record in records:
        if "text" in record:
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), seq_len):
                window = ids[start : start + seq_len]
                if len(window) >= 2:
                    rows.append({"input_ids": window, "labels": list(window)})
        else:
            prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[-seq_len:]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[-seq_len:]
            rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise DatasetError("the training data gives no row of at least 2 tokens.")
    return [{**row, "attention_mask": [1] * len(row["input_ids"])} for row in rows]


# --------------------------------------------------------------------------------------------------
# Fingerprints (what a resumed run must share with the one that wrote the state)


def _rows_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[r["input_ids"], r["labels"]] for r in rows]).encode()).hexdigest()


def _check_resume(state_dir: Path, fingerprint: dict, resume: bool) -> None:
    saved_file = state_dir / SETTINGS_FILE
    if not resume:
        if state_dir.exists() and any(state_dir.glob("checkpoint-*")):
            raise ConfigError(f"{state_dir} holds an interrupted fine-tuning run; pass --resume to "
                              "continue it, or delete the folder to start afresh.")
        return
    if not saved_file.is_file():
        raise ConfigError(f"--resume: no interrupted run to resume ({saved_file} is missing).")
    saved = json.loads(saved_file.read_text())
    problems = [f"the {key} differs from the run being resumed" for key in ("model", "data")
                if saved.get(key) != fingerprint[key]]
    old, new = saved.get("settings", {}), fingerprint["settings"]
    problems += [f"{k}={new.get(k)!r} but the interrupted run used {old.get(k)!r}"
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if problems:
        raise ConfigError(f"cannot resume from {state_dir}: {'; '.join(problems)}. Rerun with the "
                          "original model and settings, or delete the folder to start afresh.")


# --------------------------------------------------------------------------------------------------
# The run


def _check_trainable(model: nn.Module) -> None:
    from svdcompress.modules import LowRankLinear

    for name, module in model.named_modules():
        # Dense INT8 layers, head and embeddings hold codes that stay as they are: they run, frozen.
        if isinstance(module, LowRankLinear) and module.quant_bits is not None and module.storage != "dense":
            raise ConfigError(f"{name} holds int{module.quant_bits} factors, which cannot be "
                              "fine-tuned; fine-tune the float checkpoint, then quantize it.")


def _add_lora(model: nn.Module, config: FinetuneConfig) -> tuple[nn.Module, dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    from svdcompress.targets import linear_shape

    targets = find_targets(model, config.lora_targets)
    for target in targets:
        module = model.get_submodule(target.name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"LoRA needs nn.Linear targets, but {target.name} is "
                              f"{type(module).__name__}; its factors train directly without LoRA "
                              "(drop --lora-rank), or export the checkpoint dense first.")
    narrowest = min(targets, key=lambda t: min(linear_shape(model.get_submodule(t.name))))
    smallest = min(linear_shape(model.get_submodule(narrowest.name)))
    if config.lora_rank > smallest:
        raise ConfigError(f"lora_rank={config.lora_rank} is larger than {narrowest.name} allows "
                          f"(min(out, in) = {smallest}); choose a rank of at most {smallest}.")
    alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_rank
    lora = LoraConfig(r=config.lora_rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                      target_modules=[t.name for t in targets], task_type="CAUSAL_LM")
    info = {"rank": config.lora_rank, "alpha": alpha, "modules": len(targets),
            "targets": list(config.lora_targets)}
    return get_peft_model(model, lora), info


class _NanGuard:
    """Trainer callback: before each optimizer step, keep the weights that just gave a finite loss;
    when the gradients are not finite, put those weights back and stop the run."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        from transformers import TrainerCallback

        self.params = params
        self.copies = [torch.empty_like(p) for p in params]
        self.has_copy = False  # a resumed run's weights arrive after this object is made
        self.stopped_at: int | None = None
        guard = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                return guard.check(state, control)

        self.callback = Callback()

    @torch.no_grad()
    def check(self, state, control):
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            torch._foreach_copy_(self.copies, [p.detach() for p in self.params])
            self.has_copy = True
            return control
        if self.has_copy:  # otherwise the weights are still those the run started (or resumed) from
            torch._foreach_copy_([p.data for p in self.params], self.copies)
        for p in self.params:
            p.grad = None  # AdamW skips parameters without a gradient: this step changes nothing
        self.stopped_at = state.global_step + 1
        control.should_training_stop = True
        return control


def finetune_(
    model: nn.Module,
    tokenizer: Any,
    records: list[dict[str, str]],
    config: FinetuneConfig,
    *,
    state_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune ``model`` on ``records`` (see :func:`load_examples`) with the Hugging Face Trainer.

    Returns the trained model (with LoRA the adapters are merged, so it is a new plain model;
    otherwise ``model`` itself, trained in place) and what happened. ``state_dir`` holds resumable
    states every ``config.checkpoint_every`` steps; it is left for the caller to delete once the
    result is saved. Frozen tensors are never touched (``requires_grad=False``: no gradient, no
    optimizer state, no weight decay).
    """
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    start = time.perf_counter()
    device = resolve_device(config.device)
    _check_trainable(model)
    rows = tokenize_examples(tokenizer, records, config.seq_len)
    state_path = Path(state_dir) if state_dir is not None else None
    fingerprint = {"model": model_digest(model), "data": _rows_digest(rows),
                   "settings": config.fingerprinted()}
    if distributed.init_from_env():  # torchrun: refuse disagreeing ranks before the Trainer starts
        distributed.check_agreement(**{k: distributed.digest(v) for k, v in fingerprint.items()})
    if state_path is not None:
        _check_resume(state_path, fingerprint, resume)
    elif resume:
        raise ConfigError("resume needs the state folder of the interrupted run (state_dir).")

    model.requires_grad_(True)
    freezing = freeze_layers(model, config.freeze) if config.freeze else None
    lora = None
    if config.lora_rank is not None:
        model, lora = _add_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing left to train: freeze=1.0 freezes every decoder block and the "
                          "embeddings; lower --freeze.")
    counts = parameter_counts(model)
    if tokenizer.pad_token is None:  # the collator pads; padded positions carry no loss anyway
        tokenizer.pad_token = tokenizer.eos_token

    guard = _NanGuard(params)
    scratch = state_path or Path(_scratch_dir())
    scratch.mkdir(parents=True, exist_ok=True)
    if state_path is not None:
        (state_path / SETTINGS_FILE).write_text(json.dumps(fingerprint, indent=1))
    args = TrainingArguments(
        output_dir=str(scratch),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        # Under torchrun batch_size stays the global batch: the loss curve is the 1-process one.
        per_device_train_batch_size=distributed.per_rank_batch(config.batch_size),
        gradient_accumulation_steps=config.gradient_accumulation,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 500,
        save_total_limit=1,
        save_only_model=False,
        logging_steps=1,
        logging_nan_inf_filter=False,
        report_to=[],
        disable_tqdm=not progress,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[guard.callback],
    )
    _quiet_progress(trainer, progress)
    resumed = _last_checkpoint_step(scratch) if resume else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train(resume_from_checkpoint=str(scratch / f"checkpoint-{resumed}") if resumed else None)
    losses = [{"step": int(e["step"]), "loss": float(e["loss"]), "lr": float(e["learning_rate"])}
              for e in trainer.state.log_history if "loss" in e and "learning_rate" in e]
    notes = []
    stopped = "completed"
    if guard.stopped_at is not None:
        stopped = "non-finite loss"
        notes.append(f"the loss stopped being finite at step {guard.stopped_at}; the run stopped and "
                     f"kept the weights of step {guard.stopped_at - 1}. Lower the learning rate.")
    if lora is not None:
        model = model.merge_and_unload()
    if freezing is None and config.lora_rank is None and any(
            getattr(m, "storage", None) == "dense" for m in model.modules()):
        notes.append("dense-stored rank-r matrices were trained; they are no longer rank r.")
    model.requires_grad_(False)
    model.eval()
    if state_path is None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    result = FinetuneResult(
        steps=trainer.state.global_step,
        epochs=config.epochs,
        n_examples=len(rows),
        loss_tokens_per_epoch=sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows),
        first_loss=losses[0]["loss"] if losses else None,
        final_loss=next((e["loss"] for e in reversed(losses) if math.isfinite(e["loss"])), None),
        losses=losses,
        trainable_params=counts["trainable_params"],
        frozen_params=counts["frozen_params"],
        freezing=freezing,
        lora=lora,
        stopped=stopped,
        resumed_from_step=resumed,
        wall_seconds=time.perf_counter() - start,
        peak_memory_mb=_peak_memory_mb(device),
        device=str(device),
        settings=config.fingerprinted(),
        notes=notes,
    )
    return model, result


def _quiet_progress(trainer: Any, progress: bool) -> None:
    """A progress bar when asked for, without the Trainer printing every logged step (we log each
    step to keep the whole loss curve)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(BarOnly())


def _scratch_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="svdcompress-finetune-")


def _last_checkpoint_step(state_dir: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in state_dir.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and _complete_state(p)]
    if not steps:
        raise ConfigError(f"--resume: {state_dir} holds no complete Trainer checkpoint yet; start "
                          "afresh (delete the folder).")
    return max(steps)


def _complete_state(checkpoint: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last: a state killed before (or while) writing it
    is incomplete and never resumed from."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
