"""Fixture databases for the report tests: realistic trials of a grid, an ablation and a search
(with its Optuna study in the same SQLite file), curves, failures and kernel benchmark runs.

Every value comes from a seeded generator and every timestamp is fixed, so one call builds the
same database every time. Configurations come from real study files through harness.spec.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from harness.db import BenchRow, Database, MetricRow, StudyRow, TrialRow
from harness.spec import TrialConfig, parse_study, resolve

GRID_TEXT = """\
study: method-grid
description: >
  SimCLR, MoCo and BYOL against the baselines, at two temperatures and two batch sizes.
dataset: fashion-mnist
fixed:
  backbone: small_cnn
  epochs: 4
  train_size: 1024
  test_size: 256
  knn_k: 20
  linear_epochs: 10
grid:
  method: [simclr, moco, byol, random_init, supervised]
  temperature: [0.1, 0.5]
  batch_size: [64, 256]
seeds: [0, 1, 2]
"""

ABLATION_TEXT = """\
study: moco-ablation
description: MoCo, one factor at a time around the base point; a single seed.
dataset: fashion-mnist
fixed:
  method: moco
  backbone: small_cnn
  epochs: 3
  batch_size: 128
  train_size: 1024
  test_size: 256
  temperature: 0.2
  queue_size: 1024
  knn_k: 20
ablate:
  temperature: [0.05, 0.2, 1.0]
  queue_size: [256, 1024, 16384]
  aug_strength: [0.0, 0.5, 1.0]
seeds: [0]
"""

SEARCH_TEXT = """\
study: lr-search
description: Learning rate and temperature of SimCLR and MoCo, searched by TPE.
dataset: fashion-mnist
fixed:
  backbone: small_cnn
  epochs: 3
  batch_size: 128
  train_size: 1024
  test_size: 256
  knn_k: 20
search:
  n_trials: 10
  sampler: tpe
  pruner: median
  objective: {metric: knn_top1, direction: maximize}
  space:
    lr: {low: 0.0001, high: 0.01, log: true}
    temperature: {low: 0.05, high: 1.0, log: true}
    method: {choices: [simclr, moco]}
seeds: [0]
"""

EMPTY_TEXT = """\
study: not-started
description: Queued, nothing ran yet.
fixed:
  epochs: 2
  train_size: 512
grid:
  method: [simclr, byol]
seeds: [0]
"""

T0 = datetime(2024, 5, 1, 9, 0, 0)
PROVENANCE: dict[str, Any] = {
    "git_commit": "3f2c9a1b7d4e5f60718293a4b5c6d7e8f9012345",
    "git_dirty": False,
    "torch_version": "2.4.1+cu124",
    "cuda_version": "12.4",
    "device_name": "NVIDIA H100 80GB HBM3",
    "host": "gpu-node-1",
}
_BASE_KNN: dict[str, float] = {
    "simclr": 0.78,
    "moco": 0.76,
    "byol": 0.74,
    "random_init": 0.64,
    "supervised": 0.90,
}
_BASE_LOSS: dict[str, float] = {"simclr": 4.9, "moco": 6.8, "byol": 0.35, "supervised": 0.28}
# A diverged trial (NaN loss; SQLite stores it as NULL) and a failed one, fixed by (label, seed).
DIVERGED = ("simclr", 0.1, 256, 2)
FAILED = ("moco", 0.5, 256, 1)


def _noise(key: Any, scale: float) -> float:
    return random.Random(repr(key)).gauss(0.0, scale)


def _summary(config: TrialConfig, seed: int) -> dict[str, float | None]:
    """Plausible summary metrics of one trial (accuracies as fractions, the database's unit)."""
    method = config.method
    key = (config.config_hash, seed)
    knn = _BASE_KNN[method] + _noise((key, "knn"), 0.006)
    if method in ("simclr", "moco"):
        knn -= 0.05 * abs(math.log10(config.temperature / 0.3))
        knn -= (
            0.02 * abs(math.log10(config.queue_size / 4096))
            if method == "moco" and config.queue_size
            else 0.0
        )
    knn -= 0.04 * abs(config.aug_strength - 1.0)
    trained = method != "random_init"
    throughput = (2500 + 14 * config.batch_size) * (1.0 + _noise((key, "speed"), 0.02)) if trained else None
    memory = (220 + 1.6 * config.batch_size + (0.004 * config.queue_size if method == "moco" else 0)) * 2**20
    return {
        "final_loss": _BASE_LOSS[method] + _noise((key, "loss"), 0.05) if trained else None,
        "knn_top1": knn,
        "linear_top1": knn + 0.03 + _noise((key, "lin"), 0.004),
        "linear_top5": min(0.999, 0.97 + _noise((key, "top5"), 0.004)),
        "alignment": 0.55 + _noise((key, "align"), 0.03),
        "uniformity": -2.9 + _noise((key, "unif"), 0.08),
        "effective_rank": 42.0 + 20 * (method == "supervised") + _noise((key, "rank"), 2.0),
        "feature_std": 0.06 + _noise((key, "std"), 0.002),
        "train_img_per_s": throughput,
        "peak_mem_bytes": memory if trained else None,
        "train_seconds": config.epochs * (config.train_size or 60000) / throughput if throughput else 0.0,
        "eval_seconds": 2.1 + _noise((key, "eval"), 0.1),
    }


def _curves(
    trial_id: int, config: TrialConfig, seed: int, final: Mapping[str, float | None]
) -> list[MetricRow]:
    rows: list[MetricRow] = []
    steps_per_epoch = max(1, (config.train_size or 60000) // config.batch_size)
    total = steps_per_epoch * config.epochs
    start_loss = (final["final_loss"] or 1.0) * 1.8
    for step in range(0, total + 1, 2):
        fraction = step / total
        loss = (final["final_loss"] or 1.0) + (start_loss - (final["final_loss"] or 1.0)) * math.exp(
            -4 * fraction
        )
        loss += _noise((trial_id, step), 0.02)
        rows.append(
            MetricRow(trial_id=trial_id, epoch=step / steps_per_epoch, step=step, name="loss", value=loss)
        )
        rows.append(
            MetricRow(
                trial_id=trial_id,
                epoch=step / steps_per_epoch,
                step=step,
                name="lr",
                value=config.lr * min(1.0, fraction * 4),
            )
        )
    for epoch in range(1, config.epochs + 1):
        knn = float(final["knn_top1"] or 0.0) - 0.08 * (config.epochs - epoch) / config.epochs
        rows.append(
            MetricRow(
                trial_id=trial_id,
                epoch=float(epoch),
                step=epoch * steps_per_epoch,
                name="knn_top1",
                value=knn,
            )
        )
    return rows


def _add_study(db: Database, text: str, created: datetime) -> int:
    study = parse_study(text)

    def insert(session: Any) -> int:
        row = StudyRow(
            name=study.name,
            kind=study.kind,
            description=study.description,
            file_text=text,
            file_hash=study.text_hash,
            created_at=created,
            updated_at=created,
        )
        session.add(row)
        session.flush()
        return row.id

    return db.run(insert)


def _add_trial(
    db: Database,
    study_id: int,
    config: TrialConfig,
    index: int,
    *,
    status: str = "complete",
    reason: str | None = None,
    summary: Mapping[str, float | None] | None = None,
    curves: bool = True,
    optuna_number: int | None = None,
    attempts: int = 1,
) -> int:
    started = T0 + timedelta(minutes=3 * index)
    ended = started + timedelta(seconds=150) if status != "pending" else None

    def insert(session: Any) -> int:
        row = TrialRow(
            study_id=study_id,
            config=config.to_dict(),
            config_hash=config.config_hash,
            seed=config.seed,
            status=status,
            reason=reason,
            worker="gpu-node-1:1234" if status != "pending" else None,
            attempts=attempts if status != "pending" else 0,
            optuna_number=optuna_number,
            created_at=T0,
            started_at=started if status != "pending" else None,
            ended_at=ended,
            **(PROVENANCE if status != "pending" else {}),
            **(dict(summary) if summary else {}),
        )
        session.add(row)
        session.flush()
        if curves and summary is not None:
            session.add_all(_curves(row.id, config, config.seed, summary))
        return row.id

    return db.run(insert)


def fill_grid(db: Database) -> None:
    study = parse_study(GRID_TEXT)
    study_id = _add_study(db, GRID_TEXT, T0)
    for index, config in enumerate(study.trials()):
        key = (config.method, config.temperature, config.batch_size, config.seed)
        if key == FAILED:
            _add_trial(
                db,
                study_id,
                config,
                index,
                status="failed",
                reason="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)",
                attempts=2,
            )
            continue
        summary = _summary(config, config.seed)
        if key == DIVERGED:
            summary = {**summary, "final_loss": math.nan, "alignment": math.nan}
        _add_trial(db, study_id, config, index, summary=summary)


def fill_ablation(db: Database) -> None:
    study = parse_study(ABLATION_TEXT)
    study_id = _add_study(db, ABLATION_TEXT, T0 + timedelta(hours=2))
    for index, config in enumerate(study.trials()):
        if config.aug_strength == 0.0:
            _add_trial(
                db,
                study_id,
                config,
                100 + index,
                status="pruned",
                reason="pruned at epoch 2: k-NN top-1 0.31 below the median 0.70 of earlier trials",
                summary={"knn_top1": 0.31},
                curves=False,
            )
            continue
        _add_trial(db, study_id, config, 100 + index, summary=_summary(config, config.seed))


SEARCH_POINTS: tuple[tuple[str, float, float, str], ...] = (
    # (method, lr, temperature, state)
    ("simclr", 1e-3, 0.5, "complete"),
    ("moco", 3e-3, 0.2, "complete"),
    ("simclr", 2e-4, 0.08, "pruned"),
    ("simclr", 5e-3, 0.35, "complete"),
    ("moco", 8e-3, 0.9, "pruned"),
    ("moco", 1.5e-3, 0.15, "complete"),
    ("simclr", 2.5e-3, 0.3, "complete"),
    ("simclr", 4e-4, 0.6, "failed"),
)


def fill_search(
    db: Database, with_optuna: bool = True, points: tuple[tuple[str, float, float, str], ...] = SEARCH_POINTS
) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    study = parse_study(SEARCH_TEXT)
    study_id = _add_study(db, SEARCH_TEXT, T0 + timedelta(hours=4))
    optuna_study = None
    if with_optuna:
        optuna_study = optuna.create_study(study_name=study.name, storage=db.url, direction="maximize")
    distributions = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "temperature": FloatDistribution(0.05, 1.0, log=True),
        "method": CategoricalDistribution(["simclr", "moco"]),
    }
    for number, (method, lr, temperature, state) in enumerate(points):
        config = resolve({**study.fixed, "method": method, "lr": lr, "temperature": temperature, "seed": 0})
        summary = _summary(config, 0)
        summary["knn_top1"] = float(summary["knn_top1"] or 0) - 0.03 * abs(math.log10(lr / 2e-3))
        params = {"lr": lr, "temperature": temperature, "method": method}
        if state == "complete":
            _add_trial(db, study_id, config, 200 + number, summary=summary, optuna_number=number)
            frozen = create_trial(
                params=params,
                distributions=distributions,
                value=summary["knn_top1"],
                intermediate_values={
                    1: float(summary["knn_top1"] or 0) - 0.05,
                    2: float(summary["knn_top1"] or 0) - 0.02,
                },
            )
        elif state == "pruned":
            _add_trial(
                db,
                study_id,
                config,
                200 + number,
                status="pruned",
                reason="pruned by the median pruner at epoch 1",
                summary={"knn_top1": 0.42},
                curves=False,
                optuna_number=number,
            )
            frozen = create_trial(
                params=params,
                distributions=distributions,
                state=TrialState.PRUNED,
                intermediate_values={1: 0.42},
            )
        else:
            _add_trial(
                db,
                study_id,
                config,
                200 + number,
                status="failed",
                reason="ValueError: loss is NaN at step 12",
                curves=False,
                optuna_number=number,
            )
            frozen = create_trial(params=params, distributions=distributions, state=TrialState.FAIL)
        if optuna_study is not None:
            optuna_study.add_trial(frozen)


def fill_empty(db: Database) -> None:
    study = parse_study(EMPTY_TEXT)
    study_id = _add_study(db, EMPTY_TEXT, T0 + timedelta(hours=6))
    for index, config in enumerate(study.trials()):
        _add_trial(db, study_id, config, 300 + index, status="pending", curves=False)


BENCH_KERNELS: dict[str, float] = {"nt_xent": 0.45, "infonce": 0.6, "barlow_twins": 0.3}
BENCH_RUNS: tuple[tuple[str, str | None, float], ...] = (
    # (run id, saved as, how much slower than today the fast kernels were)
    ("run-a", "baseline", 1.9),
    ("run-b", None, 1.4),
    ("run-c", "fused-v1", 1.1),
    ("run-d", None, 1.0),
)


def fill_bench(db: Database) -> None:
    rows = []
    for run_index, (run_id, saved, slowdown) in enumerate(BENCH_RUNS):
        created = T0 + timedelta(days=run_index)
        for kernel, speed in BENCH_KERNELS.items():
            for n in (256, 1024):
                for direction in ("forward", "forward+backward"):
                    reference = 1e-4 * (n / 256) ** 1.5 * (2.5 if direction != "forward" else 1.0)
                    fast = reference * speed * slowdown * (1 + _noise((run_id, kernel, n, direction), 0.02))
                    for impl, median in (("reference", reference), ("fast", fast)):
                        rows.append(
                            BenchRow(
                                run_id=run_id,
                                saved_as=saved,
                                created_at=created,
                                kernel=kernel,
                                impl=impl,
                                case=f"N={n},D=128",
                                params={"N": n, "D": 128},
                                device="cuda",
                                dtype="bf16",
                                direction=direction,
                                median_s=median,
                                iqr_s=median * 0.03,
                                min_s=median * 0.97,
                                rounds=50,
                                peak_mem_bytes=float(n * 128 * 4 * 6),
                                ratio_to_reference=median / reference,
                                **PROVENANCE,
                            )
                        )
    db.run(lambda session: session.add_all(rows))


def make_database(path: Path, *, optuna_study: bool = True, bench: bool = True) -> Database:
    """A SQLite database at ``path`` with the four fixture studies and (optionally) bench runs."""
    db = Database(path)
    fill_grid(db)
    fill_ablation(db)
    fill_search(db, with_optuna=optuna_study)
    fill_empty(db)
    if bench:
        fill_bench(db)
    return db
