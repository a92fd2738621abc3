"""torch.distributed with gloo on CPU, 2 processes: the same factors and loss curves as one process.

Each group of ranks is started once per module (``torch.multiprocessing`` spawn, a few seconds of
imports each); the ranks write what they computed to files and the tests below compare those with
single-process runs of the same settings.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_VOCAB, make_char_tokenizer, make_tiny_model
from safetensors.torch import load_file, save_file

from svdcompress import SVDConfig, WhitenConfig, compress_, distributed
from svdcompress.errors import CalibrationError, ConfigError
from svdcompress.modules import LowRankLinear
from svdcompress.recover import RecoverySettings, balance_, recover_

WORLD = 2
CONFIGS = {  # method -> config: data-aware, data-free with calibration, and the cross statistics
    "whiten": WhitenConfig(param_ratio=0.5, calib_batch_size=2),
    "svd": SVDConfig(param_ratio=0.5, calib_batch_size=2),
    "whiten-update-refine": WhitenConfig(param_ratio=0.5, calib_batch_size=2, update=True,
                                         refine_iters=3),
}
RECOVERY = RecoverySettings(steps=5, lr=1e-2, batch_size=4, seed=3)
FINETUNE_RECORDS = [{"text": "plain words for a tiny model, " * 3 + str(i)} for i in range(8)]


def _windows(n: int = 8) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n, 24), generator=torch.Generator().manual_seed(5))


def _factors(model) -> dict[str, torch.Tensor]:
    """Each low-rank module's stored matrices; pivoted modules by their product (a column
    permutation chosen on factors equal to float tolerance may break a near-tie another way)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) and module.storage == "pivoted":
            found[f"{name}.product"] = module.dense_weight().detach().clone()
        elif isinstance(module, LowRankLinear):
            found.update({f"{name}.{part}": module.matrix(part).detach().clone()
                          for part in module.matrix_names})
    return found


def _student():
    model = make_tiny_model("llama")
    compress_(model, SVDConfig(param_ratio=0.5))
    return model


def _finetune_config():
    from svdcompress.finetune import FinetuneConfig

    return FinetuneConfig(lr=1e-2, batch_size=4, seq_len=16, device="cpu", seed=1)


# --------------------------------------------------------------------------------------------------
# The ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, port: int, worker, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on a shared CPU
    assert distributed.init_from_env() and distributed.world_size() == WORLD
    try:
        worker(rank, out)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(worker, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_entry, args=(_free_port(), worker, out), nprocs=WORLD, join=True,
                       start_method="spawn")
    return out


def _work(rank: int, out: Path) -> None:
    """Everything the equality tests compare, in one group of ranks."""
    for name, config in CONFIGS.items():
        model = make_tiny_model("llama")
        report = compress_(model, config, _windows())
        save_file(_factors(model), str(out / f"{name}.rank{rank}.safetensors"))
        errors = {m.name: m.output_error for m in report.modules}
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(errors))
    student, teacher = _student(), make_tiny_model("llama")
    result = recover_(student, teacher, _windows(), RECOVERY, progress=False)
    save_file(_factors(student), str(out / f"recover.rank{rank}.safetensors"))
    (out / f"recover.rank{rank}.json").write_text(json.dumps(result.losses))
    from svdcompress.finetune import finetune_

    _, tuned = finetune_(make_tiny_model("llama"), make_char_tokenizer(), FINETUNE_RECORDS,
                         _finetune_config(), progress=False)
    (out / f"finetune.rank{rank}.json").write_text(json.dumps([e["loss"] for e in tuned.losses]))


def _refusal(rank: int, out: Path, name: str, call) -> None:
    try:
        call()
    except (ConfigError, CalibrationError) as err:
        (out / f"{name}.rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")


def _work_bad(rank: int, out: Path) -> None:
    """Each rank must refuse, with the same message, before any collective computation."""
    ratio = 0.5 if rank == 0 else 0.6  # rank 1 launched with other settings and another model
    _refusal(rank, out, "disagree",
             lambda: compress_(make_tiny_model("llama", seed=rank), WhitenConfig(param_ratio=ratio),
                               _windows()))
    _refusal(rank, out, "few-batches",  # 1 batch of 4 windows cannot feed 2 ranks
             lambda: compress_(make_tiny_model("llama"), WhitenConfig(param_ratio=0.5), _windows(4)))
    _refusal(rank, out, "owner-fails", _compress_with_a_failing_module)
    from svdcompress.finetune import FinetuneConfig, finetune_

    _refusal(rank, out, "finetune-disagree",
             lambda: finetune_(make_tiny_model("llama"), make_char_tokenizer(), FINETUNE_RECORDS,
                               FinetuneConfig(lr=1e-2 * (rank + 1), device="cpu"), progress=False))
    settings = RecoverySettings(steps=2, lr=1e-2, batch_size=3)
    _refusal(rank, out, "odd-batch",
             lambda: recover_(_student(), make_tiny_model("llama"), _windows(), settings,
                              progress=False))


def _compress_with_a_failing_module() -> None:
    """Rank 1 owns this gate_proj (see test_owners_spread_modules_by_size); its factorization fails."""
    from svdcompress import compress as compress_module

    original = compress_module.Compressor.factorize

    def factorize(self, name, stats):
        if name == FAILING and distributed.rank() == 1:
            raise CalibrationError(f"{name}: factorization produced NaN/inf (degenerate statistics).")
        return original(self, name, stats)

    compress_module.Compressor.factorize = factorize
    try:
        compress_(make_tiny_model("llama"), WhitenConfig(param_ratio=0.5, calib_batch_size=2),
                  _windows())
    finally:
        compress_module.Compressor.factorize = original


FAILING = "model.layers.1.mlp.gate_proj"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(_work, tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def bad_ranks(tmp_path_factory):
    return _spawn(_work_bad, tmp_path_factory.mktemp("bad-ranks"))


# --------------------------------------------------------------------------------------------------
# Compression: the same factors as one process


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_give_the_single_process_factors(ranks, name):
    single = make_tiny_model("llama")
    report = compress_(single, CONFIGS[name], _windows())
    expected = _factors(single)
    by_rank = [load_file(str(ranks / f"{name}.rank{r}.safetensors")) for r in range(WORLD)]
    assert by_rank[0].keys() == expected.keys() and len(expected) == 2 * 7 * 3  # 7 per block
    for key, value in expected.items():
        assert torch.equal(by_rank[0][key], by_rank[1][key]), key  # broadcast: bitwise equal
        scale = value.abs().max().item()
        assert (by_rank[0][key] - value).abs().max().item() <= 1e-5 * scale, key
    errors = json.loads((ranks / f"{name}.rank0.json").read_text())
    for module in report.modules:  # the reduced statistics are the whole calibration set's
        assert errors[module.name] == pytest.approx(module.output_error, rel=1e-6, abs=1e-9)


def test_owners_spread_modules_by_size():
    sizes = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64, "gate": 96 * 64,
             "up": 96 * 64, "down": 64 * 96}
    owners = distributed.assign_owners(sizes, 2)
    loads = [sum(sizes[n] for n in sizes if owners[n] == r) for r in range(2)]
    # Largest first (ties by name) to the lighter rank (ties to the lower): down, up, k, v | gate, o, q
    assert owners == {"down": 0, "gate": 1, "up": 0, "o": 1, "q": 1, "k": 0, "v": 0}
    assert loads == [16384, 14336]  # within one smallest module of an even split
    assert owners == distributed.assign_owners(dict(reversed(sizes.items())), 2)  # order-free
    assert set(distributed.assign_owners(sizes, 1).values()) == {0}


def test_single_process_leaves_everything_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    batches = list(_windows().split(2))
    assert distributed.shard_batches(batches) is batches
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    distributed.check_agreement(config="anything")  # nothing to compare with
    assert distributed.per_rank_batch(4) == 4


def test_global_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.per_rank_batch(4) == 2
    with pytest.raises(ConfigError, match="cannot be shared evenly by 2 processes"):
        distributed.per_rank_batch(3)


# --------------------------------------------------------------------------------------------------
# Recovery and fine-tuning: the same loss curve at the same global batch


def test_recovery_follows_the_single_process_loss_curve(ranks):
    student, teacher = _student(), make_tiny_model("llama")
    single = recover_(student, teacher, _windows(), RECOVERY, progress=False)
    for rank in range(WORLD):
        losses = json.loads((ranks / f"recover.rank{rank}.json").read_text())
        assert losses == pytest.approx(single.losses, rel=1e-4)
    trained = load_file(str(ranks / "recover.rank0.safetensors"))
    start = _student()
    balance_(start)  # what recover_ trains from
    moved = []
    for key, value in _factors(student).items():
        scale = value.abs().max().item()
        assert (trained[key] - value).abs().max().item() <= 1e-4 * scale, key
        moved.append((value - _factors(start)[key]).abs().max().item() / scale)
    assert max(moved) > 1e-2  # training moved the factors 100x further than the ranks differ


def test_finetuning_on_the_trainer_follows_the_single_process_loss_curve(ranks):
    from svdcompress.finetune import finetune_

    _, single = finetune_(make_tiny_model("llama"), make_char_tokenizer(), FINETUNE_RECORDS,
                          _finetune_config(), progress=False)
    expected = [e["loss"] for e in single.losses]
    assert len(expected) == 12  # 8 texts cut into 48 windows of 16 tokens, global batch 4
    assert expected[-1] < 0.7 * expected[0]
    for rank in range(WORLD):
        losses = json.loads((ranks / f"finetune.rank{rank}.json").read_text())
        assert losses == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Bad input: refused on every rank, before computing


def _message(folder: Path, name: str) -> list[str]:
    return [(folder / f"{name}.rank{r}.txt").read_text() for r in range(WORLD)]


def test_ranks_that_disagree_are_refused_naming_what_differs(bad_ranks):
    first, second = _message(bad_ranks, "disagree")
    assert first == second  # both ranks stop with the same explanation
    assert first.startswith("ConfigError: the 2 ranks disagree on config (ranks [0] have ")
    assert "model (ranks [0] have" in first and "calibration" not in first


def test_finetuning_ranks_that_disagree_are_refused(bad_ranks):
    first, second = _message(bad_ranks, "finetune-disagree")
    assert first == second and "disagree on settings (ranks [0] have" in first
    assert "model (" not in first and "data (" not in first  # same weights and data: only lr


def test_a_failing_factorization_on_its_owner_stops_every_rank(bad_ranks):
    first, second = _message(bad_ranks, "owner-fails")
    assert first == second == f"CalibrationError: {FAILING}: factorization produced NaN/inf " \
        "(degenerate statistics)."


def test_too_few_calibration_batches_for_the_ranks_are_refused(bad_ranks):
    for message in _message(bad_ranks, "few-batches"):
        assert message.startswith("CalibrationError: 1 calibration batches cannot be shared by 2")


def test_a_global_batch_that_does_not_split_is_refused(bad_ranks):
    for message in _message(bad_ranks, "odd-batch"):
        assert "batch size 3 cannot be shared evenly by 2 processes" in message


# --------------------------------------------------------------------------------------------------
# The command line under torchrun: the same checkpoint and loss curve, one writer


def _corpus_cache(root: Path) -> None:
    """A tiny 'wiki' corpus already in the (isolated) cache, so nothing is fetched."""
    from svdcompress.datasets import _CLEANING_VERSION

    docs = [{"title": f"doc {i}", "text": f"Plain words number {i} for a tiny model. " * 30}
            for i in range(40)]
    folder = root / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"wiki-v{_CLEANING_VERSION}.json").write_text(json.dumps({"documents": docs}))


def _torchrun(args: list[str], cache: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "SVDCOMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "svdcompress.cli", "--threads", "1", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_compress_and_recover_commands_under_torchrun(tmp_path, tiny_folder, isolated_cache):
    from typer.testing import CliRunner

    from svdcompress.checkpoint import load
    from svdcompress.cli import app

    _corpus_cache(isolated_cache)
    compress = ["compress", str(tiny_folder), "--method", "whiten", "--param-ratio", "0.5",
                "--windows", "8", "--seq-len", "32", "--no-stream", "--device", "cpu"]
    recover = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2",
               "--device", "cpu"]
    _torchrun([*compress, "--out", str(tmp_path / "two")], isolated_cache)
    single = CliRunner().invoke(app, [*compress, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    two, one = load(tmp_path / "two")[0], load(tmp_path / "one")[0]
    expected = _factors(one)
    for key, value in _factors(two).items():
        assert (value - expected[key]).abs().max() <= 1e-5 * expected[key].abs().max(), key

    _torchrun(["recover", str(tmp_path / "one"), *recover, "--out", str(tmp_path / "two-rec"),
               "--json", str(tmp_path / "two.json")], isolated_cache)
    single = CliRunner().invoke(app, ["recover", str(tmp_path / "one"), *recover, "--out",
                                      str(tmp_path / "one-rec"), "--json", str(tmp_path / "one.json")])
    assert single.exit_code == 0, single.output
    losses = [json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("two", "one")]
    assert len(losses[1]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert not (tmp_path / "two-rec.recovery-state").exists()
