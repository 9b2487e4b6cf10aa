"""One trial on several processes (``devices_per_trial``): a real trial on 2 gloo processes ends
where the same trial on 1 process ends (loss, encoder weights), also when it was stopped by SIGTERM
and resumed by both ranks from rank 0's checkpoint; a rank that raises or dies fails its trial with
that rank's reason and leaves no process behind; impossible settings are refused with the knob named.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from sqlalchemy import select

from harness import ranks, train
from harness.backbones import ConvBatchNorm2d
from harness.checkpoint import TrialInterrupted, encoder_tensors
from harness.db import Database, TrialRow
from harness.methods import METHODS
from harness.spec import SpecError, load_study, resolve
from harness.study import RunOptions, run_study
from harness.trial_api import TrialPruned

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason=f"needs Fashion-MNIST at {FASHION.parent}")

# 8 steps of 16 images (8 per process). SGD at a small rate: float32 trajectories of two equivalent
# computations drift apart chaotically once the steps are large (measured on BYOL: 1 process with
# other threads and memory layout differs by 4e-3 in the loss by step 10 at lr 0.05), so the
# comparison is made where rounding stays rounding.
TINY: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "train_size": 128,
    "test_size": 32,
    "batch_size": 16,
    "epochs": 1,
    "optimizer": "sgd",
    "lr": 0.01,
    "knn_k": 5,
    "linear_epochs": 1,
    "log_every": 1,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "pred_hidden_dim": 16,
    "device": "cpu",
    # oneDNN's channels-last convolutions take other kernels at 8 and 16 images (measured: 1e-5 in
    # the loss by step 4); contiguous ones round alike.
    "channels_last": False,
    "checkpoint_minutes": 0,
}


def _config(method: str, devices: int, **overrides: Any) -> train.TrialConfig:
    return resolve({**TINY, "method": method, "devices_per_trial": devices, **overrides})


def _one_process(config: train.TrialConfig, folder: Path, monkeypatch: pytest.MonkeyPatch) -> train.TrialRecord:
    """The reference: the same trial in this process, its stem's conv + batch norm run as two layers,
    as on the ranks (where the batch norm is a global one). The fused stem computes the same
    statistics by another formula (tests/test_backbones.py), which alone differs by 1e-5 in the
    first loss and, amplified by training, 20% in the update after 8 steps."""
    with monkeypatch.context() as patch:
        patch.setattr(ConvBatchNorm2d, "folds_statistics", property(lambda self: False))
        return train.run_trial(config, progress=False, checkpoint_dir=folder)


def _initial_encoder(config: train.TrialConfig) -> dict[str, torch.Tensor]:
    context = train._build(config, torch.device("cpu"))
    return {name: t.clone() for name, t in encoder_tensors(config.backbone, context.method.backbone).items()}


def _assert_same_trial(config: train.TrialConfig, one: train.TrialRecord, two: train.TrialRecord) -> None:
    """The same losses, and the same update of every encoder tensor, up to float32 rounding.
    Measured (BYOL): losses within 3e-7, updates within 6e-5 of their size; with the batch norms
    left per process, 3e-2 and 0.5-0.9."""
    assert one.status == two.status == "complete", (one.reason, two.reason)
    losses = [value for _, _, name, value in one.curves if name == "loss"]
    assert len(losses) == 8 and abs(losses[0] - losses[-1]) > 1e-2  # it trained
    assert [v for _, _, n, v in two.curves if n == "loss"] == pytest.approx(losses, rel=1e-5)
    assert two.summary["final_loss"] == pytest.approx(one.summary["final_loss"], rel=1e-5)
    assert one.weights_path and two.weights_path
    start, first, second = _initial_encoder(config), load_file(one.weights_path), load_file(two.weights_path)
    assert first.keys() == second.keys() == start.keys()
    for name in first:
        if not first[name].is_floating_point():
            assert torch.equal(first[name], second[name]), name
            continue
        update, other = first[name] - start[name], second[name] - start[name]
        assert float(update.norm()) > 0, name
        assert float((other - update).norm()) <= 1e-3 * float(update.norm()), name


@pytest.mark.slow
@needs_fashion
def test_run_trial__byol_on_two_processes_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BYOL: batch norms in the backbone and both MLPs, an EMA target; every one synchronized."""
    one = _one_process(_config("byol", 1), tmp_path / "one", monkeypatch)
    two = train.run_trial(_config("byol", 2), progress=False, checkpoint_dir=tmp_path / "two")
    _assert_same_trial(_config("byol", 1), one, two)
    # Global figures: the peak is both processes' (each holds the model and the data).
    assert two.summary["peak_mem_bytes"] > one.summary["peak_mem_bytes"]
    assert two.summary["train_img_per_s"] > 0
    assert two.provenance["device_name"] == f"2 x {one.provenance['device_name']}"
    assert two.data == one.data


@pytest.mark.slow
@needs_fashion
def test_run_trial__simclr_on_two_processes_stopped_and_resumed_equals_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SimCLR (negatives from the global batch): SIGTERM mid-trial, forwarded to rank 0, which
    checkpoints at the next step and stops; the rerun restores that checkpoint on both ranks."""
    one = _one_process(_config("simclr", 1), tmp_path / "one", monkeypatch)
    config = _config("simclr", 2)
    sent: list[int] = []

    def stop_early(points: list[tuple[float, int, str, float]]) -> None:
        if not sent and any(name == "loss" and step >= 2 for _, step, name, _ in points):
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrialInterrupted) as stopped:
        train.run_trial(config, progress=False, checkpoint_dir=tmp_path / "two", on_curves=stop_early)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.checkpoint is not None
    assert stopped.value.checkpoint.parent == tmp_path / "two"
    lines: list[str] = []
    resumed = train.run_trial(config, progress=False, checkpoint_dir=tmp_path / "two", say=lines.append)
    assert resumed.resumed_from_step is not None and 2 <= resumed.resumed_from_step < 8, lines
    assert any("resuming from checkpoint" in line for line in lines)
    _assert_same_trial(_config("simclr", 1), one, resumed)


@pytest.mark.slow
def test_run_trial__on_two_processes_a_pruning_evaluation_stops_every_rank() -> None:
    """Optuna's pruning: rank 0's k-NN evaluation goes to the caller's ``on_eval`` in this process,
    whose TrialPruned stops rank 0; the other rank, waiting in its next step, is stopped too."""
    seen: list[tuple[int, float]] = []

    def prune(epoch: int, knn: float) -> None:
        seen.append((epoch, knn))
        raise TrialPruned("pruned at epoch 1")

    config = _config("simclr", 2, dataset="synthetic", train_size=32, epochs=3, eval_every=1)
    record = train.run_trial(config, progress=False, on_eval=prune)
    assert record.status == "pruned" and record.reason == "pruned at epoch 1"
    knn = [(epoch, value) for epoch, _, name, value in record.curves if name == "knn_top1"]
    assert [(int(epoch), value) for epoch, value in knn] == seen and len(seen) == 1
    assert multiprocessing.active_children() == []


def _pids_file() -> Path:
    return Path(os.environ["HARNESS_TEST_RANK_PIDS"])


def rank_that_breaks(*args: Any) -> None:
    """``harness.ranks._rank_main``, except that rank 1 breaks at its third training step: SimCLR's
    raises, BYOL's is killed (as the out-of-memory killer would)."""
    rank, config = args[0], args[4]
    with _pids_file().open("a") as pids:
        pids.write(f"{os.getpid()}\n")
    if rank == 1:
        method = METHODS[config.method]
        original = method.training_loss
        calls = [0]

        def breaking(self: Any, views: Any, labels: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                if config.method == "simclr":
                    raise RuntimeError("rank 1 broke on purpose")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, views, labels)

        method.training_loss = breaking  # type: ignore[method-assign]
    ranks._rank_main(*args)


@pytest.mark.slow
def test_run_study__a_failing_rank_fails_its_trial_with_the_reason_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    monkeypatch.setenv("HARNESS_TEST_RANK_PIDS", str(pids))
    monkeypatch.setattr(ranks, "RANK_ENTRY", rank_that_breaks)
    fixed = {**TINY, "devices_per_trial": 2}
    fixed.pop("dataset")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": "broken-rank", "dataset": "synthetic", "fixed": fixed,
        "grid": {"method": ["simclr", "byol"]}, "seeds": [0],
    }))
    lines: list[str] = []
    result = run_study(load_study(path), RunOptions(db=str(tmp_path / "h.db"), progress=False), echo=lines.append)
    assert result.exit_code == 0 and result.tally.failed == 2
    assert any(line.endswith("running on 2 processes on cpu (preparing data and model)") for line in lines)
    stored = Database(tmp_path / "h.db").run(lambda s: list(s.scalars(select(TrialRow))))
    rows = {row.config["method"]: row for row in stored}
    raised, killed = rows["simclr"], rows["byol"]
    assert raised.status == "failed"
    assert raised.reason.startswith("rank 1 of 2: RuntimeError: rank 1 broke on purpose (at test_ranks.py:")
    assert killed.status == "failed" and killed.reason == "rank 1 of 2: the process died (killed by SIGKILL)"
    assert raised.knn_top1 is None and raised.git_commit is not None
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 4
    for pid in started:  # every rank gone (and reaped: a zombie would still answer)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_resolve__batch_size_not_divisible_by_devices_per_trial_is_refused_with_the_knob() -> None:
    with pytest.raises(SpecError) as error:
        resolve({"batch_size": 256, "devices_per_trial": 3})
    assert error.value.problems == [
        "devices_per_trial: found 3 with batch_size 256, expected a divisor of batch_size "
        "(batch_size is the global batch, split evenly over the processes)"
    ]
    assert resolve({"batch_size": 256, "devices_per_trial": 4}).devices_per_trial == 4
    # Not what a configuration is: the same trial on 1 or 4 processes has one identity.
    assert resolve({"devices_per_trial": 4}).config_hash == resolve({}).config_hash
    # An untrained baseline has nothing to split: the knob is reset, whatever the batch.
    assert resolve({"method": "random_init", "devices_per_trial": 3}).devices_per_trial == 1


def test_load_study__indivisible_batch_is_located_at_its_grid_point(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "study": "s", "fixed": {"devices_per_trial": 4}, "grid": {"batch_size": [256, 250]}, "seeds": [0],
    }))
    with pytest.raises(SpecError) as error:
        load_study(path)
    assert len(error.value.problems) == 1
    assert "grid point (batch_size=250)" in error.value.problems[0]
    assert "devices_per_trial: found 4 with batch_size 250, expected a divisor of batch_size" in error.value.problems[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_run_trial__devices_per_trial_on_missing_cuda_devices_is_a_failed_trial_with_the_reason() -> None:
    record = train.run_trial(_config("simclr", 2, device="cuda", dataset="synthetic"), progress=False)
    assert record.status == "failed"
    assert record.reason == "'cuda' was asked for, but CUDA is not available on this machine"
    assert record.provenance["device_name"].startswith("2 x ")


def test_rank_devices__one_cuda_device_per_rank_or_gloo_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ranks.rank_devices(_config("simclr", 4, device="cpu")) == (["cpu"] * 4, "gloo")
    monkeypatch.setattr(ranks, "device_problem", lambda name: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert ranks.rank_devices(_config("simclr", 2, device="cuda:2")) == (["cuda:2", "cuda:3"], "nccl")
    with pytest.raises(ValueError) as error:
        ranks.rank_devices(_config("simclr", 4, device="cuda:1"))
    assert str(error.value) == (
        "devices_per_trial: 4 CUDA devices needed (cuda:1 to cuda:4), this machine has 4 (cuda:0 to cuda:3); "
        "lower devices_per_trial or use device: cpu (gloo)"
    )


def test_cli_run__workers_with_devices_per_trial_is_refused_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness import cli

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "study": "s", "dataset": "synthetic", "fixed": {"batch_size": 32}, "grid": {"devices_per_trial": [1, 2]},
        "seeds": [0],
    }))
    db = tmp_path / "h.db"
    assert cli.main(["run", str(path), "--db", str(db), "--workers", "2", "--force-workers"]) == 2
    assert (
        f"--workers 2: {path} runs trials on devices_per_trial = 2 processes each; use one worker"
        in capsys.readouterr().err
    )
    assert not db.exists()
