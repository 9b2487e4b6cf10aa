"""Checkpoints and weights: atomic checksummed files, exact resume, the encoder as safetensors."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harness import checkpoint, train
from harness.backbones import build_backbone
from harness.checkpoint import CheckpointPolicy, CheckpointProblem, TrialCheckpoints, TrialInterrupted
from harness.spec import resolve

TINY = {
    "dataset": "synthetic",
    "train_size": 96,
    "test_size": 40,
    "batch_size": 32,  # 3 steps per epoch
    "epochs": 3,
    "knn_k": 5,
    "linear_epochs": 3,
    "log_every": 1,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
}
METHOD_KNOBS = {
    "moco": {"queue_size": 64},
    "dino": {"dino_out_dim": 64, "local_crops": 2},
    "swav": {"queue_size": 64, "swav_prototypes": 10},
}
# Quality metrics: what must not depend on an interruption (times and memory naturally do).
RESULTS = (
    "final_loss",
    "knn_top1",
    "linear_top1",
    "linear_top5",
    "alignment",
    "uniformity",
    "effective_rank",
    "feature_std",
)


def _config(method: str = "simclr", **overrides: object) -> train.TrialConfig:
    return resolve({**TINY, "method": method, **METHOD_KNOBS.get(method, {}), **overrides})


class _Killed(KeyboardInterrupt):
    """Stands in for SIGKILL in-process: the run stops dead, with no chance to checkpoint."""


def _die_at(step: int) -> Callable[[list[tuple[float, int, str, float]]], None]:
    def on_curves(points: list[tuple[float, int, str, float]]) -> None:
        if any(name == "lr" and at == step for _, at, name, _ in points):
            raise _Killed

    return on_curves


def _assert_same_results(reference: train.TrialRecord, resumed: train.TrialRecord) -> None:
    assert resumed.status == reference.status == "complete", (reference.reason, resumed.reason)
    assert {k: resumed.summary[k] for k in RESULTS} == {k: reference.summary[k] for k in RESULTS}
    assert resumed.curves == reference.curves
    assert resumed.weights_sha256 == reference.weights_sha256
    assert Path(resumed.weights_path).read_bytes() == Path(reference.weights_path).read_bytes()


# -- files ---------------------------------------------------------------------------------------


def test_decode__round_trip_and_damage_is_detected(tmp_path: Path) -> None:
    payload = {"state": {"x": torch.arange(5.0)}, "identity": {"format": 1}}
    data = checkpoint.encode(payload)
    assert torch.equal(checkpoint.decode(data)["state"]["x"], torch.arange(5.0))
    with pytest.raises(CheckpointProblem, match="damaged: incomplete"):
        checkpoint.decode(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    with pytest.raises(CheckpointProblem, match="checksum"):
        checkpoint.decode(bytes(flipped))


def test_atomic_write__replaces_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.bin"
    checkpoint.atomic_write(path, b"old")
    checkpoint.atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_trial_checkpoints__keeps_two_newest_and_skips_damaged_and_foreign(tmp_path: Path) -> None:
    said: list[str] = []
    files = TrialCheckpoints(tmp_path, {"config_hash": "a", "seed": 0}, say=said.append)
    for step in (3, 6, 9):
        files.save({"step": step}, step=step)
    assert [p.name for p in files.files()] == ["step-000000009.ckpt", "step-000000006.ckpt"]
    newest = tmp_path / "step-000000009.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short, as by a full disk
    loaded = files.latest()
    assert loaded is not None and loaded.state == {"step": 6}
    assert len(said) == 1 and "step-000000009.ckpt is damaged: incomplete" in said[0]
    assert said[0].endswith("skipped and deleted")
    assert not newest.exists()
    other_seed = TrialCheckpoints(tmp_path, {"config_hash": "a", "seed": 1}, say=said.append)
    assert other_seed.latest() is None
    assert "seed 0 (now 1)" in said[-1] and "kept as step-000000006.ckpt.rejected" in said[-1]
    assert (tmp_path / "step-000000006.ckpt.rejected").exists()
    assert other_seed.files() == []


def test_capture_rng__restores_every_generator() -> None:
    generator = torch.Generator().manual_seed(3)
    state = checkpoint.capture_rng(generator)
    state = checkpoint.decode(checkpoint.encode({"s": state}))["s"]  # through a file, weights_only
    first = (torch.rand(3, generator=generator), torch.rand(3), random.random(), np.random.rand(3))
    checkpoint.restore_rng(state, generator)
    second = (torch.rand(3, generator=generator), torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2] == second[2] and np.array_equal(first[3], second[3])


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "byol", "dino"])
def test_run_trial__killed_after_a_checkpoint_resumes_bit_identically(method: str, tmp_path: Path) -> None:
    config = _config(method)
    reference = train.run_trial(
        config, progress=False, checkpoint_dir=CheckpointPolicy(tmp_path / "ref", every_epochs=1)
    )
    policy = CheckpointPolicy(tmp_path / "run", every_epochs=1)
    with pytest.raises(_Killed):
        train.run_trial(config, progress=False, checkpoint_dir=policy, on_curves=_die_at(5))
    assert [p.name for p in TrialCheckpoints(policy.directory, {}).files()] == ["step-000000003.ckpt"]
    said: list[str] = []
    resumed = train.run_trial(config, progress=False, checkpoint_dir=policy, say=said.append)
    assert resumed.resumed_from_step == 3 and reference.resumed_from_step is None
    assert any("resuming from checkpoint" in line and "step-000000003.ckpt" in line for line in said)
    _assert_same_results(reference, resumed)
    # Pruned at the end: the final state and the encoder stay.
    assert sorted(p.name for p in policy.directory.iterdir()) == [
        "encoder.json",
        "encoder.safetensors",
        "final.ckpt",
    ]


@pytest.mark.slow
def test_run_trial__resumes_mid_epoch_and_from_the_previous_when_the_newest_is_truncated(
    tmp_path: Path,
) -> None:
    config = _config("swav")
    reference = train.run_trial(
        config, progress=False, checkpoint_dir=CheckpointPolicy(tmp_path / "ref", every_epochs=1)
    )
    # A checkpoint after every step (every_minutes ~ 0): they fall mid-epoch too.
    policy = CheckpointPolicy(tmp_path / "run", every_minutes=1e-9)
    with pytest.raises(_Killed):
        train.run_trial(config, progress=False, checkpoint_dir=policy, on_curves=_die_at(6))
    names = [p.name for p in TrialCheckpoints(policy.directory, {}).files()]
    assert names == ["step-000000005.ckpt", "step-000000004.ckpt"]  # step 6's write never happened
    newest = policy.directory / names[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    said: list[str] = []
    resumed = train.run_trial(config, progress=False, checkpoint_dir=policy, say=said.append)
    assert "step-000000005.ckpt is damaged" in said[0]
    assert "step-000000004.ckpt (step 4, 1 step(s) into epoch 2)" in said[1]
    assert resumed.resumed_from_step == 4
    _assert_same_results(reference, resumed)


@pytest.mark.slow
def test_run_trial__sigterm_checkpoints_at_the_next_step_and_resumes(tmp_path: Path) -> None:
    config = _config("simclr", epochs=2)
    reference = train.run_trial(config, progress=False, checkpoint_dir=CheckpointPolicy(tmp_path / "ref"))
    policy = CheckpointPolicy(tmp_path / "run", every_minutes=0)  # no cadence: only the signal

    def terminate_at_step_4(points: list[tuple[float, int, str, float]]) -> None:
        if any(name == "lr" and step == 4 for _, step, name, _ in points):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrialInterrupted) as stopped:
        train.run_trial(config, progress=False, checkpoint_dir=policy, on_curves=terminate_at_step_4)
    assert signal.getsignal(signal.SIGTERM) is previous  # the trial's handler is gone again
    assert stopped.value.signum == signal.SIGTERM
    assert stopped.value.checkpoint == policy.directory / "step-000000004.ckpt"
    resumed = train.run_trial(config, progress=False, checkpoint_dir=policy)
    assert resumed.resumed_from_step == 4
    _assert_same_results(reference, resumed)


def test_run_trial__failed_trial_leaves_no_checkpoint(tmp_path: Path) -> None:
    policy = CheckpointPolicy(tmp_path, every_minutes=1e-9)
    record = train.run_trial(
        _config("simclr", optimizer="sgd", epochs=1, lr=1e30), progress=False, checkpoint_dir=policy
    )
    assert record.status == "failed" and "diverged" in (record.reason or "")
    assert record.weights_path is None and list(tmp_path.glob("*.ckpt")) == []


def test_run_trial__without_save_weights_writes_no_encoder(tmp_path: Path) -> None:
    config = _config("simclr", epochs=1, train_size=64, save_weights=False, keep_final_checkpoint=False)
    record = train.run_trial(config, progress=False, checkpoint_dir=tmp_path)
    assert record.status == "complete" and record.weights_path is None
    assert list(tmp_path.iterdir()) == []


# -- weights ---------------------------------------------------------------------------------------


def test_write_encoder__resnet18_loads_into_torchvision_with_the_cifar_stem(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", 1, 16)
    backbone.train()(torch.randn(4, 1, 16, 16))  # running statistics away from their initial values
    path, sha256 = checkpoint.write_encoder(tmp_path, "resnet18", backbone, {"backbone": "resnet18"})
    tensors = load_file(path)
    model = resnet18(weights=None)
    model.conv1 = torch.nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    model.load_state_dict(tensors)  # strict: every name and shape matches
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(model.eval()(x), backbone.eval()(x), atol=1e-5)
    info = json.loads((tmp_path / "encoder.json").read_text())
    assert info["sha256"] == sha256 and "maxpool = nn.Identity()" in checkpoint.encoder_layers("resnet18")


def test_read_encoder__small_cnn_in_the_harness_factory_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone, _ = build_backbone("small_cnn", 3, 12)
    info = {"backbone": "small_cnn", "in_channels": 3, "image_size": 12}
    path, sha256 = checkpoint.write_encoder(tmp_path, "small_cnn", backbone, info)
    encoder = checkpoint.read_encoder(path, expected_sha256=sha256)
    assert not encoder.module.training and encoder.info["sha256"] == sha256
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(encoder.module(x), backbone.eval()(x))
    with pytest.raises(ValueError, match="changed since the trial recorded it"):
        checkpoint.read_encoder(path, expected_sha256="0" * 64)
