"""What each trial trained and evaluated on: stored with the trial (``harness_trial.data``, schema
version 6), exposed by ``trials_frame``, stated in the report's protocol line, and a pretraining
split the dataset lacks refused in validation (issue 14)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from harness import cli
from harness.db import SUMMARY_METRICS, Database, open_existing, utcnow
from harness.reports.render import build_report
from harness.results import TRIAL_COLUMNS, trials_frame
from harness.spec import UNLABELED_DATASETS, SpecError, load_study, parse_study
from harness.study import RunOptions, run_study

WAVE1 = Path(__file__).parent / "fixtures" / "wave1"
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _write_stl10(root: Path, n_train: int, n_test: int, n_unlabeled: int) -> None:
    """STL-10's binary format (``*_X.bin`` column-major uint8, ``*_y.bin`` labels 1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")


def _study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_trial_data__a_real_trial_stores_its_splits_and_the_report_states_them(tmp_path: Path) -> None:
    _write_stl10(tmp_path / "data", n_train=40, n_test=20, n_unlabeled=60)
    study = _study(
        tmp_path,
        f"study: stl\ndataset: stl10\nfixed: {{data_root: {tmp_path / 'data'}, pretrain_split: train+unlabeled, "
        "backbone: small_cnn, epochs: 1, batch_size: 20, linear_epochs: 1, knn_k: 5, device: cpu}\n"
        "grid: {method: [simclr]}\nseeds: [0]\n",
    )
    db_path = tmp_path / "h.db"
    result = run_study(load_study(study), RunOptions(db=str(db_path)), echo=lambda _: None)
    assert result.exit_code == 0 and result.tally.complete == 1

    with sqlite3.connect(db_path) as connection:  # the stored JSON itself, not the ORM's view of it
        (raw,) = connection.execute("SELECT data FROM harness_trial").fetchone()
    stored = json.loads(raw)
    assert stored["pretrain"]["split"] == "train+unlabeled"
    assert stored["pretrain"]["images"] == 100 and stored["pretrain"]["labeled"] == 40
    assert stored["knn_probe_train"]["class_counts"] == dict.fromkeys(STL10_CLASSES, 4)
    assert stored["knn_probe_test"]["class_counts"] == dict.fromkeys(STL10_CLASSES, 2)
    assert stored["knn_probe_test"]["dataset"] == "stl10" and stored["knn_probe_test"]["split"] == "test"

    db = open_existing(db_path)
    frame = trials_frame(db, "stl")
    assert "data" in TRIAL_COLUMNS and frame.loc[0, "data"] == stored
    markdown = (build_report(db, "stl", tmp_path / "report") / "report.md").read_text()
    assert (
        "Data: pretrained on stl10 train+unlabeled (100 images, labels unused); "
        "k-NN and linear probe on train (40) / test (20), 10 classes." in markdown
    )
    db.dispose()


@dataclass
class _Record:
    status: str
    reason: str | None
    summary: dict[str, float | None]
    curves: list[tuple[float, int, str, float]]
    provenance: dict[str, Any]
    started_at: datetime
    ended_at: datetime = field(default_factory=utcnow)
    data: dict[str, Any] = field(default_factory=dict)


def _split(split: str, images: int, labeled: int, per_class: int) -> dict[str, Any]:
    out: dict[str, Any] = {"dataset": "stl10", "split": split, "images": images, "shape": [3, 96, 96],
                           "streamed": False, "labeled": labeled}
    if per_class:
        out["class_counts"] = dict.fromkeys(STL10_CLASSES, per_class)
    return out


# What describe_data gives for the full STL-10 protocol (the recorded splits, not trained here).
STL10_FULL = {
    "pretrain": _split("train+unlabeled", 105_000, 5_000, 500),
    "knn_probe_train": _split("train", 5_000, 5_000, 500),
    "knn_probe_test": _split("test", 8_000, 8_000, 800),
}
# An untrained baseline's record: its "pretraining" split is the train split (it trains nothing).
UNTRAINED = {**STL10_FULL, "pretrain": STL10_FULL["knn_probe_train"]}


def _recording_trainer(config: Any, **_: Any) -> _Record:
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
    summary.update(knn_top1=0.5 if config.method == "simclr" else 0.3, linear_top1=0.6)
    data = UNTRAINED if config.method == "random_init" else STL10_FULL
    return _Record("complete", None, summary, [(1.0, 1, "loss", 1.0)], {}, utcnow(), data=data)


def test_protocol_line__states_the_stored_pretraining_and_evaluation_splits(tmp_path: Path) -> None:
    study = _study(
        tmp_path,
        "study: full\ndataset: stl10\nfixed: {pretrain_split: train+unlabeled, epochs: 1}\n"
        "grid: {method: [simclr, random_init]}\nseeds: [0, 1]\n",
    )
    run_study(load_study(study), RunOptions(db=str(tmp_path / "h.db")), run_trial=_recording_trainer, echo=lambda _: None)
    db = open_existing(tmp_path / "h.db")
    frame = trials_frame(db, "full")
    assert len(frame) == 4
    for method, data in zip(frame["method"], frame["data"]):
        assert data == (STL10_FULL if method == "simclr" else UNTRAINED)
    for fmt in ("csv", "parquet"):  # exported as one JSON text per trial
        out = tmp_path / f"full.{fmt}"
        assert cli.main(["export", "full", "--db", str(tmp_path / "h.db"), "--format", fmt, "--out", str(out)]) == 0
        exported = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
        assert sorted(exported["data"]) == sorted(json.dumps(d, sort_keys=True) for d in frame["data"])
    markdown = (build_report(db, "full", tmp_path / "report") / "report.md").read_text()
    # The untrained baseline pretrains on nothing, so only simclr's pretraining split is stated.
    assert (
        "Data: pretrained on stl10 train+unlabeled (105,000 images, labels unused); "
        "k-NN and linear probe on train (5,000) / test (8,000), 10 classes." in markdown
    )
    db.dispose()


def test_protocol_line__a_wave1_database_states_the_splits_from_the_configuration(tmp_path: Path) -> None:
    copy = tmp_path / "wave1.db"
    shutil.copyfile(WAVE1 / "harness.db", copy)
    Database(copy).dispose()  # what `harness run` does first: upgrade in place
    db = open_existing(copy)
    frame = trials_frame(db, "quickstart")
    assert len(frame) == 3 and frame["data"].isna().all()  # stored before the column existed
    markdown = (build_report(db, "quickstart", tmp_path / "report") / "report.md").read_text()
    # Wave 1 had no pretrain_split knob: it pretrained on the train split (the knob's legacy value).
    assert (
        "Data: pretrained on fashion-mnist train (5,000 images, labels unused); "
        "k-NN and linear probe on train (5,000) / test (1,000)." in markdown
    )
    db.dispose()


@pytest.mark.parametrize("split", ["unlabeled", "train+unlabeled"])
def test_cross_check__pretrain_split_the_dataset_lacks_is_a_located_error(split: str) -> None:
    text = f"study: s\ndataset: cifar10\ngrid: {{method: [simclr], pretrain_split: [train, {split}]}}\n"
    with pytest.raises(SpecError) as error:
        parse_study(text, source="s.yaml")
    assert error.value.problems == [
        f"s.yaml: grid point (method=simclr, pretrain_split={split}): pretrain_split: found {split} for "
        "dataset cifar10, which has no unlabeled split, expected train (only stl10, imagefolder, imagenet100 have one)"
    ]


@pytest.mark.parametrize("dataset", UNLABELED_DATASETS)
def test_cross_check__datasets_with_an_unlabeled_split_accept_it(dataset: str) -> None:
    text = f"study: s\ndataset: {dataset}\nfixed: {{pretrain_split: unlabeled}}\ngrid: {{method: [simclr]}}\n"
    assert parse_study(text).fixed["pretrain_split"] == "unlabeled"
