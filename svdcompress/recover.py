"""Recovery fine-tuning: distil the original model's next-token distribution into a compressed one.

Only the low-rank factors of :class:`~svdcompress.modules.LowRankLinear` modules are trained
(optionally also the normalisation weights); embeddings, the head and every uncompressed layer stay
frozen, so the result has exactly the ranks and shapes it had before and saves in the same format.
The loss is KL(teacher ‖ student) of the temperature-1 softmax, averaged over tokens, plus, with
``hidden_weight`` > 0, that weight times each block output's relative squared error against the
teacher's (hidden-state distillation: a signal at every depth, not only through the head). Before the
first step each factor pair is rewritten as U√Σ, √ΣVᵀ (the same product): whitened factors put S⁻¹
into ``right``, and with factors on very different scales one Adam step size is too large for one
and too small for the other (the KL jumped 1.3 -> 3.5 after one step at lr 1e-4 without this).

Interruptions: every ``checkpoint_every`` steps the student, the Adam moments and the step are
written atomically to a state folder (a loadable checkpoint in ``model/`` plus
``optimizer.safetensors`` and ``state.json``). ``resume=True`` continues from it, after checking a
fingerprint of the starting student, the teacher, the training windows and the settings, so a
run is never silently continued against another model or other settings. The data order is a pure
function of (seed, step), so a resumed run sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from svdcompress import distributed
from svdcompress.checkpoint import atomic_folder, save
from svdcompress.errors import CheckpointError, ConfigError
from svdcompress.evaluate import kl_divergence
from svdcompress.linalg import balance_factors
from svdcompress.modules import LowRankLinear
from svdcompress.provenance import model_digest, tensor_digest

__all__ = [
    "RecoveryResult",
    "RecoverySettings",
    "balance_",
    "distillation_loss",
    "fingerprint",
    "hidden_state_loss",
    "learning_rate",
    "recover_",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_FOLDER = "model"


@dataclass(frozen=True)
class RecoverySettings:
    """What a recovery run does; every field but ``checkpoint_every`` is part of its fingerprint."""

    steps: int
    lr: float = 1e-4  # peak Adam learning rate
    batch_size: int = 4  # windows per step
    train_norms: bool = False
    warmup_fraction: float = 0.05  # linear warm-up, then cosine decay to 10% of lr
    # Weight of the hidden-state term (each block's output matched to the teacher's, relative
    # squared error) added to the logit KL; 0: logits only.
    hidden_weight: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r}: recovery needs at least 1 training step.")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ConfigError(
                f"lr={self.lr!r} is not a usable learning rate: give a finite value in (0, 1] "
                "(1e-4 is a sensible start)."
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1.")
        if not (isinstance(self.hidden_weight, int | float) and math.isfinite(self.hidden_weight)
                and self.hidden_weight >= 0):
            raise ConfigError(f"hidden_weight={self.hidden_weight!r} must be a finite number >= 0 "
                              "(0: distil the logits only; 1 weighs both terms alike).")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must lie in [0, 1).")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip={self.grad_clip} must be positive and finite.")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 1.")

    def fingerprinted(self) -> dict:
        data = asdict(self)
        data.pop("checkpoint_every")  # how often we save does not change the result
        if not data["hidden_weight"]:  # states written before the field existed still resume
            data.pop("hidden_weight")
        return data


@dataclass
class RecoveryResult:
    steps_run: int  # steps completed, including those of an earlier run that was resumed
    resumed_from: int  # 0 unless resumed
    first_loss: float | None  # loss of the first step of this run (KL in nats per token + hidden term)
    final_loss: float | None  # mean loss over the last 10 steps of this run
    stopped: str  # "completed", "nan-loss", "nonfinite-gradient"
    wall_seconds: float
    trainable_params: int
    losses: list[float] = field(default_factory=list)  # per step of this run
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module, train_norms: bool = False) -> dict[str, nn.Parameter]:
    """The low-rank factors (and, with ``train_norms``, normalisation weights), by name."""
    chosen: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            if module.storage == "dense":
                # A dense rank-r matrix trained freely would stop being rank r; dense INT8 layers
                # and the INT8 head and embeddings hold codes: leave them alone.
                logger.info("%s is stored dense; recovery leaves it frozen", name)
                continue
            if module.quant_bits is not None:
                raise ConfigError(
                    f"{name} holds int{module.quant_bits} factors, which cannot be trained; run "
                    "recovery on the float checkpoint and quantize afterwards."
                )
            # Any values of the factors (left/right, or pivoted left/coupling) keep the rank r.
            chosen.update({f"{name}.{m}": getattr(module, m) for m in module.matrix_names})
        elif train_norms and "norm" in type(module).__name__.lower():
            # Matched by type (LayerNorm, LlamaRMSNorm, ...), not by architecture-specific names.
            for pname, param in module.named_parameters(recurse=False):
                chosen[f"{name}.{pname}"] = param
    if not chosen:
        raise ConfigError("the model has no low-rank factors to train; is it a compressed checkpoint?")
    return chosen


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-1 softmax, mean over tokens, in float32."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float(), dim=-1)  # (tokens, vocab)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    return kl_divergence(teacher, student).mean()


def hidden_state_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over blocks of ‖h_s − h_t‖² / ‖h_t‖² per block output (the embeddings, shared by both
    models, are skipped). Relative, so blocks with large activations do not dominate the sum: the
    hidden states of the last blocks are several times larger than those of the first."""
    terms = [
        (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
        for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)
    ]
    return torch.stack(terms).mean()


def learning_rate(settings: RecoverySettings, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 10% of it at the last step."""
    warmup = round(settings.warmup_fraction * settings.steps)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(settings.steps - warmup - 1, 1)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _batch_indices(n_windows: int, settings: RecoverySettings, step: int) -> torch.Tensor:
    """Windows of one step: epochs of seeded permutations, a pure function of (seed, step)."""
    per_epoch = max(n_windows // settings.batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
    order = torch.randperm(n_windows, generator=generator)
    start = position * settings.batch_size
    return order[start:start + settings.batch_size]


# --------------------------------------------------------------------------------------------------
# Fingerprint and state


def fingerprint(student: nn.Module, teacher: nn.Module, windows: torch.Tensor,
                settings: RecoverySettings) -> dict:
    """What a resumed run must share with the run that wrote the state."""
    return {
        "student": model_digest(student),
        "teacher": model_digest(teacher),
        "windows": tensor_digest({"windows": windows}),
        "settings": settings.fingerprinted(),
    }


def _fingerprint_mismatch(saved: dict, current: dict) -> list[str]:
    problems = [
        f"the {key} differs from the one the checkpoint was trained with"
        for key in ("student", "teacher", "windows") if saved.get(key) != current[key]
    ]
    old, new = saved.get("settings", {}), current["settings"]
    problems += [
        f"{key}={new.get(key)!r} but the checkpoint used {old.get(key)!r}"
        for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)
    ]
    return problems


def _save_state(state_dir: Path, student, tokenizer, optimizer, params, step, meta) -> None:
    moments = {}
    for name, param in params.items():
        state = optimizer.state.get(param)
        if state:
            moments[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            moments[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
    with atomic_folder(state_dir, overwrite=True) as tmp:
        save(student, tmp / MODEL_FOLDER, tokenizer=tokenizer)
        save_file(moments, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**meta, "step": step}, indent=2))
    logger.info("recovery state at step %d written to %s", step, state_dir)


def _load_state(state_dir: Path, current: dict, optimizer, params) -> tuple[int, dict]:
    state_file = state_dir / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_dir} holds no {STATE_FILE}: there is nothing to resume.")
    meta = json.loads(state_file.read_text())
    problems = _fingerprint_mismatch(meta.get("fingerprint", {}), current)
    if problems:
        raise CheckpointError(
            f"refusing to resume from {state_dir}: " + "; ".join(problems)
            + ". Resume with the original settings, or delete the folder to start afresh."
        )
    weights = _read_model_tensors(state_dir / MODEL_FOLDER)
    moments = load_file(str(state_dir / OPTIMIZER_FILE))
    step = int(meta["step"])
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
            if f"{name}.exp_avg" in moments:
                optimizer.state[param] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": moments[f"{name}.exp_avg"].to(param.device),
                    "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(param.device),
                }
    return step, meta


def _read_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# --------------------------------------------------------------------------------------------------
# Training


class _Snapshot:
    """The last weights that gave a finite loss, so a NaN step can be undone."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self.copies = {name: p.detach().clone() for name, p in params.items()}
        self.step = 0

    @torch.no_grad()
    def take(self, step: int) -> None:
        for name, param in self.params.items():
            self.copies[name].copy_(param)
        self.step = step

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.copies[name])


@torch.no_grad()
def balance_(model: nn.Module) -> None:
    """Rewrite each trainable factor pair as U√Σ, √ΣVᵀ: same product, comparable scales."""
    for module in model.modules():
        if isinstance(module, LowRankLinear) and module.storage == "factored" and module.quant_bits is None:
            factors = balance_factors(module.left, module.right)
            module.left.copy_(factors.left)
            module.right.copy_(factors.right)


def _freeze_except(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    chosen = {id(p) for p in params.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)


def _forward_loss(student, teacher, batch: torch.Tensor, hidden_weight: float = 0.0) -> torch.Tensor:
    hidden = hidden_weight > 0
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False, output_hidden_states=hidden)
    output = student(input_ids=batch, use_cache=False, output_hidden_states=hidden)
    loss = distillation_loss(output.logits, target.logits)  # logits: (B, T, vocab)
    if hidden:
        loss = loss + hidden_weight * hidden_state_loss(output.hidden_states, target.hidden_states)
    return loss


class _Run:
    """One recovery run's moving parts, so each step stays a short function."""

    def __init__(self, student, teacher, windows, settings, params, tokenizer, state_dir, meta):
        self.student, self.teacher, self.windows = student, teacher, windows
        self.settings, self.params, self.tokenizer = settings, params, tokenizer
        self.state_dir, self.meta = state_dir, meta
        self.device = next(iter(params.values())).device
        self.optimizer = torch.optim.Adam(list(params.values()), lr=settings.lr)
        self.snapshot = _Snapshot(params)
        self.losses: list[float] = []
        self.notes: list[str] = []

    def step(self, step: int) -> str | None:
        """One optimisation step; returns a stop reason, or None to go on."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.settings, step)
        loss = self.loss(step)
        value = self.global_loss(loss)  # the whole batch's, so every rank takes the same decision
        if not torch.isfinite(value):
            self.snapshot.restore()
            self.notes.append(f"loss became {value.item()} at step {step}; stopped and restored the "
                              f"weights of step {self.snapshot.step}; lower the learning rate")
            return "nan-loss"
        self.snapshot.take(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        norm = self.clip_gradients()
        if not torch.isfinite(norm):
            self.notes.append(f"gradient norm {norm.item()} at step {step}; stopped before applying "
                              "it (weights of that step kept); lower the learning rate")
            return "nonfinite-gradient"
        self.optimizer.step()
        self.losses.append(value.item())
        return None

    def loss(self, step: int) -> torch.Tensor:
        batch = self.windows[_batch_indices(len(self.windows), self.settings, step)].to(self.device)
        return _forward_loss(self.student, self.teacher, batch, self.settings.hidden_weight)

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss.detach()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.settings.grad_clip)

    def save_state(self, step: int) -> None:
        if self.state_dir is not None:
            _save_state(self.state_dir, self.student, self.tokenizer, self.optimizer, self.params,
                        step, self.meta)

    def train(self, first_step: int, progress: bool) -> tuple[int, str]:
        settings, step, stopped = self.settings, first_step, "completed"
        bar = tqdm(total=settings.steps, initial=first_step, desc="recovery (KD)", unit="step",
                   disable=not progress)
        with bar:
            while step < settings.steps:
                reason = self.step(step)
                if reason is not None:
                    stopped = reason
                    break
                step += 1
                bar.update(1)
                bar.set_postfix(kl=f"{self.losses[-1]:.4f}")
                if step % settings.checkpoint_every == 0 and step < settings.steps:
                    self.save_state(step)
        return step, stopped


class _StepBatches(torch.utils.data.Sampler):
    """The global batches of steps ``first``… as :func:`_batch_indices` picks them, so a resumed
    or distributed run sees the windows a single uninterrupted run would see."""

    def __init__(self, n_windows: int, settings: RecoverySettings, first: int) -> None:
        self.n_windows, self.settings, self.first = n_windows, settings, first
        self.batch_size = settings.batch_size  # accelerate splits batches of this size evenly

    def __iter__(self):
        for step in range(self.first, self.settings.steps):
            yield _batch_indices(self.n_windows, self.settings, step).tolist()

    def __len__(self) -> int:
        return self.settings.steps - self.first


class _DistributedRun(_Run):
    """A run launched by ``torchrun``/``accelerate launch``: accelerate wraps the student (DDP, or
    FSDP/DeepSpeed when its configuration asks) and gives each rank ``batch_size / world`` windows
    of every global batch, so the run follows the single-process loss curve at that batch size."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        self.accelerator = Accelerator(cpu=self.device.type == "cpu",
                                       dataloader_config=DataLoaderConfiguration(split_batches=True))
        distributed.per_rank_batch(self.settings.batch_size, len(self.windows))
        current = self.meta.get("fingerprint") or fingerprint(
            self.student, self.teacher, self.windows, self.settings)
        # Before prepare(): DDP would silently copy rank 0's student over a different one.
        distributed.check_agreement(**{k: distributed.digest(v) for k, v in current.items()})
        self.device = self.accelerator.device
        self.teacher.to(self.device)
        self.model, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        self.batches = None

    def loss(self, step: int) -> torch.Tensor:
        if self.batches is None:  # first step known only now (after a resume)
            loader = torch.utils.data.DataLoader(
                self.windows, batch_sampler=_StepBatches(len(self.windows), self.settings, step),
                collate_fn=torch.stack)
            self.batches = iter(self.accelerator.prepare(loader))
        return _forward_loss(self.model, self.teacher, next(self.batches), self.settings.hidden_weight)

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        # Every rank holds the same number of tokens, so the mean of means is the batch's mean.
        return self.accelerator.reduce(loss.detach(), reduction="mean")

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_gradients(self) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)

    def save_state(self, step: int) -> None:
        if self.accelerator.is_main_process:
            super().save_state(step)
        self.accelerator.wait_for_everyone()

    def train(self, first_step: int, progress: bool) -> tuple[int, str]:
        return super().train(first_step, progress and self.accelerator.is_main_process)


def recover_(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    settings: RecoverySettings,
    *,
    tokenizer=None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RecoveryResult:
    """Train ``student``'s low-rank factors in place to match ``teacher``'s logits on ``windows``.

    ``windows``: (n, seq_len) token ids. ``state_dir``: where periodic checkpoints go (none when
    None); with ``resume`` the run continues from the state found there, after its fingerprint
    (starting student, teacher, windows, settings) is checked. The device is the student's.
    """
    start = time.perf_counter()
    if windows.ndim != 2 or len(windows) < 1:
        raise ConfigError(f"windows must be a non-empty (n, seq_len) tensor, got {tuple(windows.shape)}")
    params = trainable_parameters(student, settings.train_norms)
    state_dir = None if state_dir is None else Path(state_dir)
    if resume and state_dir is None:
        raise ConfigError("resume=True needs the state_dir of the interrupted run.")
    if state_dir is not None and not resume and (state_dir / STATE_FILE).exists():
        raise CheckpointError(
            f"{state_dir} holds the state of an earlier recovery run; resume it, or delete the "
            "folder to start afresh."
        )
    teacher.to(next(iter(params.values())).device).eval().requires_grad_(False)
    student.eval()  # no dropout: the student should match the teacher's deterministic outputs
    _freeze_except(student, params)
    meta = {"fingerprint": fingerprint(student, teacher, windows, settings)} if state_dir else {}
    if not resume:  # a resumed run loads weights that were balanced before they were trained
        balance_(student)
    run_type = _DistributedRun if distributed.launched() else _Run  # torchrun: through accelerate
    run = run_type(student, teacher, windows, settings, params, tokenizer, state_dir, meta)
    first_step = _load_state(state_dir, meta["fingerprint"], run.optimizer, params)[0] if resume else 0
    if first_step:
        logger.info("resuming recovery at step %d of %d", first_step, settings.steps)
    run.snapshot.take(first_step)  # after loading: a NaN on the first resumed step restores these
    with torch.enable_grad():
        steps_run, stopped = run.train(first_step, progress)
    _freeze_except(student, {})
    losses = run.losses
    return RecoveryResult(
        steps_run=steps_run, resumed_from=first_step,
        first_loss=losses[0] if losses else None,
        final_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        stopped=stopped, wall_seconds=time.perf_counter() - start,
        trainable_params=sum(p.numel() for p in params.values()), losses=losses, notes=run.notes,
    )
