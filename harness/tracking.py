"""Optional experiment trackers: MLflow and TensorBoard, fed by the trial through one small
callback interface (``MetricSink``). Off by default; switched on by ``harness run --mlflow`` /
``--tensorboard`` or a ``tracking:`` section of the study file.

The results database stays the source of truth: a tracker only mirrors what a trial records. A
tracker that fails (no package, an unreachable server, a locked store) never fails a trial: the
first error of each tracker is printed once per process, and that tracker is off for the rest of
the process. Nothing here imports torch at import time, nor the database layer.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# A plain folder given to --mlflow becomes a SQLite store inside it (MLflow 3 refuses its old
# plain-file store unless MLFLOW_ALLOW_FILE_STORE is set); artifacts go beside it.
DEFAULT_MLFLOW_DIR = "mlruns"
MLFLOW_DB_NAME = "mlflow.db"
MLFLOW_ARTIFACTS = "artifacts"
DEFAULT_TENSORBOARD_DIR = "runs"
# MLflow retries an unreachable server for minutes by default; a tracker must not hold a trial up.
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^file:|^databricks")


class MetricSink(Protocol):
    """What a trial calls while it trains: one value of a curve (``harness_metric``'s row)."""

    def on_metric(self, name: str, value: float, *, step: int, epoch: float) -> None: ...


@dataclass(frozen=True)
class TrackingSettings:
    """Which trackers a run feeds. ``None`` = off. Not part of any trial's configuration: turning
    a tracker on changes no configuration hash and reruns nothing."""

    mlflow: str | None = None  # tracking URI, or a folder for a local store
    tensorboard: str | None = None  # root folder; one event directory per trial below it

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard is not None

    def merged(self, override: TrackingSettings) -> TrackingSettings:
        """These settings with ``override``'s non-None fields on top (command line over file)."""
        return TrackingSettings(
            mlflow=override.mlflow if override.mlflow is not None else self.mlflow,
            tensorboard=override.tensorboard if override.tensorboard is not None else self.tensorboard,
        )


@dataclass(frozen=True)
class TrialIdentity:
    """What a tracker names a trial's run by."""

    study: str
    trial_id: int | None
    label: str  # the method and the knobs the study varies
    seed: int
    config_hash: str
    config: Mapping[str, Any]
    description: str = ""

    @property
    def run_name(self) -> str:
        prefix = f"#{self.trial_id} " if self.trial_id is not None else ""
        return f"{prefix}{self.label} seed={self.seed}"

    @property
    def folder_name(self) -> str:
        number = f"trial-{self.trial_id}" if self.trial_id is not None else f"trial-{self.config_hash[:12]}"
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label).strip("_")[:80]
        return f"{number}_{slug}_seed{self.seed}" if slug else f"{number}_seed{self.seed}"


def mlflow_store(location: str) -> tuple[str, str | None]:
    """(tracking URI, artifact root or None) for a ``--mlflow`` value: a URI (``http://``,
    ``sqlite://``, ``file:``, ``databricks``) is used as given, with MLflow's own artifact root; a
    plain folder becomes ``sqlite:///FOLDER/mlflow.db`` with artifacts in ``FOLDER/artifacts``."""
    if _URI_SCHEME.match(location):
        return location, None
    folder = Path(location).expanduser().resolve()
    return f"sqlite:///{folder / MLFLOW_DB_NAME}", (folder / MLFLOW_ARTIFACTS).as_uri()


# ---------------------------------------------------------------------------------------------
# Failure handling: warn once per tracker and process, then stay off


_WARNED: set[str] = set()
_BROKEN: set[str] = set()
_LOCK = threading.Lock()


def _warn(tracker: str, error: BaseException, stream: Any = None) -> None:
    with _LOCK:
        _BROKEN.add(tracker)
        if tracker in _WARNED:
            return
        _WARNED.add(tracker)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    print(
        f"warning: {tracker} tracking failed ({type(error).__name__}: {detail[:300]}); "
        f"trials go on without {tracker} in this process (the results database is complete)",
        file=stream or sys.stderr,
        flush=True,
    )


def reset_failures() -> None:
    """Forget earlier failures (tests; a long-lived process whose store came back)."""
    with _LOCK:
        _WARNED.clear()
        _BROKEN.clear()


class _Guarded:
    """Calls into one tracker; the first exception warns (once) and switches it off."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def alive(self) -> bool:
        return self.name not in _BROKEN

    def call(self, action: Callable[[], Any]) -> Any:
        if not self.alive:
            return None
        try:
            return action()
        except Exception as error:  # a tracker never fails a trial
            _warn(self.name, error)
            return None


# ---------------------------------------------------------------------------------------------
# The trackers


def _number_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text[:_PARAM_CHARS]


class _MlflowRun:
    def __init__(self, location: str, identity: TrialIdentity) -> None:
        for key, value in _MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient  # optional dependency: pip install -e '.[tracking]'

        uri, artifacts = mlflow_store(location)
        if artifacts is not None:
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(identity.study)
        if experiment is None:
            experiment_id = self.client.create_experiment(
                identity.study,
                artifact_location=f"{artifacts}/{identity.study}" if artifacts else None,
                tags={"harness.description": identity.description[:5000]} if identity.description else None,
            )
        else:
            experiment_id = experiment.experiment_id
        tags = {
            "harness.study": identity.study,
            "harness.config_hash": identity.config_hash,
            "harness.seed": str(identity.seed),
            "harness.label": identity.label,
        }
        if identity.trial_id is not None:
            tags["harness.trial_id"] = str(identity.trial_id)
        run = self.client.create_run(experiment_id, run_name=identity.run_name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(str(k), _param_text(v)) for k, v in sorted(identity.config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def metric(self, name: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, name, value, step=step)

    def finish(self, status: str, reason: str | None, summary: Mapping[str, Any], step: int, artifacts: Sequence[Path]) -> None:
        from mlflow.entities import Metric as MlflowMetric

        millis = _now_millis()
        metrics = [
            MlflowMetric(f"final/{k}", float(v), millis, step)
            for k, v in sorted(summary.items())
            if _number_or_none(v) is not None
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.client.set_tag(self.run_id, "harness.status", status)
        if reason:
            self.client.set_tag(self.run_id, "harness.reason", reason[:5000])
        for path in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))
            elif Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=Path(path).name)
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FAILED"))


_MLFLOW_STATUS = {"complete": "FINISHED", "failed": "FAILED", "pruned": "KILLED", "interrupted": "KILLED"}


def _now_millis() -> int:
    import time

    return int(time.time() * 1000)


class _TensorBoardRun:
    def __init__(self, root: str, identity: TrialIdentity) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.folder = Path(root).expanduser() / _safe(identity.study) / identity.folder_name
        self.writer = SummaryWriter(log_dir=str(self.folder))
        lines = ["| knob | value |", "|---|---|"]
        lines += [f"| {k} | {_param_text(v)} |" for k, v in sorted(identity.config.items())]
        self.writer.add_text("configuration", "\n".join(lines), 0)
        self.identity = identity

    def metric(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def finish(self, status: str, reason: str | None, summary: Mapping[str, Any], step: int, artifacts: Sequence[Path]) -> None:
        final = {f"final/{k}": float(v) for k, v in sorted(summary.items()) if _number_or_none(v) is not None}
        for key, value in final.items():
            self.writer.add_scalar(key, value, step)
        self.writer.add_text("status", status + (f": {reason}" if reason else ""), step)
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else _param_text(v)
            for k, v in sorted(self.identity.config.items())
        }
        # The HPARAMS tab's row of this trial, written into this trial's own event directory
        # (SummaryWriter.add_hparams would open a second run and log the metrics again).
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for summary_proto in hparams_summary(hparams, {k: v for k, v in final.items() if math.isfinite(v)}):
            self.writer.file_writer.add_summary(summary_proto)
        self.writer.close()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "study"


class TrialTracker:
    """The trackers of one trial. A ``MetricSink`` for ``run_trial``; ``finish`` after the trial.
    Every call is guarded: a failing tracker warns once and is skipped from then on."""

    def __init__(self, settings: TrackingSettings, identity: TrialIdentity) -> None:
        self.identity = identity
        self._runs: list[tuple[_Guarded, Any]] = []
        self._last_step = 0
        makers: list[tuple[str, str | None, Callable[[str, TrialIdentity], Any]]] = [
            ("MLflow", settings.mlflow, _MlflowRun),
            ("TensorBoard", settings.tensorboard, _TensorBoardRun),
        ]
        for name, location, maker in makers:
            if location is None:
                continue
            guard = _Guarded(name)
            run = guard.call(lambda maker=maker, location=location: maker(location, identity))
            if run is not None:
                self._runs.append((guard, run))

    @property
    def active(self) -> list[str]:
        return [guard.name for guard, _ in self._runs if guard.alive]

    def on_metric(self, name: str, value: float, *, step: int, epoch: float) -> None:
        self._last_step = max(self._last_step, step)
        for guard, run in self._runs:
            guard.call(lambda run=run: run.metric(name, float(value), step))

    def finish(
        self,
        status: str,
        reason: str | None = None,
        summary: Mapping[str, Any] | None = None,
        artifacts: Iterable[Path | str] = (),
    ) -> None:
        paths = [Path(p) for p in artifacts]
        for guard, run in self._runs:
            guard.call(lambda run=run: run.finish(status, reason, dict(summary or {}), self._last_step, paths))
        self._runs = []


def open_tracker(settings: TrackingSettings | None, identity: TrialIdentity) -> TrialTracker | None:
    """The trial's tracker, or None when no tracker is switched on."""
    if settings is None or not settings.enabled:
        return None
    return TrialTracker(settings, identity)


def missing_packages(settings: TrackingSettings) -> list[str]:
    """The optional packages the switched-on trackers need and this environment lacks, as a
    pip hint each (``harness run`` says so before it starts, once)."""
    import importlib.util

    missing = []
    if settings.mlflow is not None and importlib.util.find_spec("mlflow") is None:
        missing.append("mlflow (pip install -e '.[tracking]')")
    if settings.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        missing.append("tensorboard (pip install -e '.[tracking]')")
    return missing
