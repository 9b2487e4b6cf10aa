"""Optuna searches whose storage is the harness database itself.

Optuna's tables sit beside ours (``optuna.load_study(study_name=..., storage=URL)`` and
``optuna-dashboard URL`` open them). Every Optuna trial that trains has a harness trial row
(``optuna_number``), claimed and heartbeated like a grid trial, so several processes can run one
search and a dead worker's trial is rerun: its Optuna trial is marked failed and superseded
(user attribute ``harness_superseded``) and a new Optuna trial with the same parameters replaces
it. ``n_trials`` counts Optuna trials (complete, pruned, failed or running), superseded ones
excepted, across all processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from harness.db import Database, sqlite_file
from harness.runtime import retry
from harness.spec import SearchParam, SearchSpec, SpecError, Study, config_hash, resolve
from harness.study import store
from harness.study.store import Claim, SyncReport
from harness.study.worker import SKIPPED, Finished, Job, Skipped, WorkerContext
from harness.trial_api import TrialPruned
from harness.units import metric_text

T = TypeVar("T")

SQLITE_TIMEOUT_S = 30.0
_STORAGE_RETRIES = 8
SUPERSEDED = "harness_superseded"
HARNESS_TRIAL = "harness_trial_id"
REUSED = "harness_reused_trial_id"
SETUP_FAILED = "harness_setup_failed"
# A RUNNING Optuna trial that no harness row points at (its process died between sampling and
# registering the sample) stops counting against n_trials after this long.
ORPHAN_AFTER_S = 120.0


class SearchSetupError(Exception):
    """The search cannot run against this database or this environment (nothing was run)."""


def search_problems(study: Study) -> list[str]:
    """Problems of a valid study file that only the search machinery sees (reported like
    validation problems, before anything is written)."""
    spec = study.search
    if spec is None:
        return []
    problems: list[str] = []
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append(
                f"{study.path}: search.sampler: cmaes needs the `cmaes` package, which is not installed "
                "(pip install cmaes), or choose sampler tpe"
            )
    return problems


def grid_values(param: SearchParam) -> list[Any]:
    """The values of one dimension under sampler: grid."""
    if param.choices is not None:
        return list(param.choices)
    assert param.low is not None and param.high is not None and param.step is not None
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    if param.is_int:
        return [int(param.low + i * param.step) for i in range(count)]
    return [round(param.low + i * param.step, 12) for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Optuna objects


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_storage(db: Database) -> Any:
    """Optuna's RDB storage on our database URL.

    On SQLite every Optuna transaction starts with BEGIN IMMEDIATE: Optuna reads then writes in
    one transaction, and a deferred transaction whose read snapshot went stale fails at once with
    "database is locked" (the busy timeout does not apply to it); an immediate one waits its turn.
    """
    optuna = _optuna()
    from sqlalchemy import event

    kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": SQLITE_TIMEOUT_S, "isolation_level": None}}
        if db.is_sqlite
        else {"pool_pre_ping": True}
    )
    storage = _retry(lambda: optuna.storages.RDBStorage(db.url, engine_kwargs=kwargs))
    if db.is_sqlite:
        event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_transient(error: BaseException) -> bool:
    text = " ".join(str(e).lower() for e in (error, error.__cause__, error.__context__) if e is not None)
    return "locked" in text or "busy" in text or "already exists" in text or "unique constraint" in text


def _retry(work: Callable[[], T]) -> T:
    """Optuna storage calls, retried when SQLite is busy or two processes create the tables at once."""
    return retry(work, attempts=_STORAGE_RETRIES, transient=_is_transient)


def make_sampler(spec: SearchSpec, seed: int | None = None) -> Any:
    """The file's sampler, seeded with ``seed`` (the study's first seed): one worker running the
    same file proposes the same points (docs/STUDIES.md says what holds with several)."""
    optuna = _optuna()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.name: grid_values(p) for p in spec.space}, seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # constant_liar: parallel workers see each other's running trials as bad guesses, so they
    # do not all sample the same point.
    return optuna.samplers.TPESampler(constant_liar=True, seed=seed)


def sampler_seed(seed: int, held_trials: int) -> int:
    """The seed of the sampler that proposes a search's next point: the study's seed for the first
    point, then one derived from it and the number of trials the study already holds. Each ask
    (serialized across processes by ``sampling_lock``) so gets its own seed: one worker running the
    same file proposes the same points; a resumed search draws new points instead of replaying its
    earlier ones; two workers never draw from the same stream."""
    if held_trials == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{held_trials}".encode()).digest()[:4], "big")


def reseed(search: _Search, seed: int) -> None:
    """Give the search a sampler seeded for its next point (``sampler_seed``). Optuna's samplers
    keep their state in the storage (NSGA-II generations, CMA-ES), so a fresh one loses nothing."""
    if search.spec.sampler == "grid":
        # The grid sampler numbers its points in an order shuffled by its seed, and skips the
        # points already visited: it needs one seed throughout, and never replays a point.
        search.study.sampler = make_sampler(search.spec, seed)
        return
    held = len(_retry(lambda: search.study.get_trials(deepcopy=False)))
    search.study.sampler = make_sampler(search.spec, sampler_seed(seed, held))


def make_pruner(study: Study) -> Any:
    optuna = _optuna()
    spec = study.search
    assert spec is not None
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs(study))
    return optuna.pruners.NopPruner()


def max_epochs(study: Study) -> int:
    epochs = int(study.base_config().epochs)
    for param in study.search.space if study.search else ():
        if param.name == "epochs":
            epochs = max(epochs, int(max(param.choices)) if param.choices else int(param.high or epochs))
    return max(1, epochs)


def distribution(param: SearchParam, value: Any = None) -> Any:
    """The Optuna distribution of one dimension, widened to contain ``value`` when given (a trial
    rerun after the file's space changed)."""
    optuna = _optuna()
    dists = optuna.distributions
    if param.choices is not None:
        choices = list(param.choices)
        if value is not None and value not in choices:
            choices.append(value)
        return dists.CategoricalDistribution(choices)
    low, high = param.low, param.high
    if value is not None:
        low, high = min(low, value), max(high, value)
    if param.is_int:
        step = int(param.step or 1)
        if value is not None and (int(value) - int(low)) % step:
            step = 1
        return dists.IntDistribution(int(low), int(high), log=param.log, step=step)
    step = param.step
    if (
        value is not None
        and step is not None
        and abs((value - low) / step - round((value - low) / step)) > 1e-8
    ):
        step = None
    return dists.FloatDistribution(float(low), float(high), log=param.log, step=step)


def suggest(trial: Any, param: SearchParam) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.is_int:
        return trial.suggest_int(
            param.name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
        )
    return trial.suggest_float(
        param.name, float(param.low), float(param.high), step=param.step, log=param.log
    )


@dataclass
class _Search:
    """The Optuna study of a harness search, opened by one process."""

    study: Any  # optuna.Study
    storage: Any
    study_id: int
    spec: SearchSpec


def open_search(db: Database, study: Study) -> _Search:
    """Create or load the Optuna study named like the harness study (its tables on first use)."""
    optuna = _optuna()
    spec = study.search
    assert spec is not None
    storage = make_storage(db)
    directions = [direction for _, direction in spec.all_objectives]
    optuna_study = _retry(
        lambda: optuna.create_study(
            storage=storage,
            study_name=study.name,
            sampler=make_sampler(spec, study.seeds[0]),
            pruner=make_pruner(study),
            directions=directions,
            load_if_exists=True,
        )
    )
    existing = [d.name.lower() for d in optuna_study.directions]
    if existing != directions:
        raise SearchSetupError(
            f"the Optuna study {study.name!r} in this database has other objective directions "
            f"({', '.join(existing)}) than the file ({', '.join(directions)}); rename the study to start "
            "a new search"
        )
    metrics = [metric for metric, _ in spec.all_objectives]
    if optuna_study.metric_names is not None and list(optuna_study.metric_names) != metrics:
        raise SearchSetupError(
            f"the Optuna study {study.name!r} in this database optimizes {', '.join(optuna_study.metric_names)}, "
            f"the file {', '.join(metrics)}; rename the study to start a new search"
        )
    return _Search(optuna_study, storage, storage.get_study_id_from_name(study.name), spec)


def describe_in_optuna(search: _Search, study: Study) -> None:
    """What optuna-dashboard (or ``optuna.load_study``) shows about the search: the objectives by
    name ("knn_top1", not "Objective 0"), and the study's description, fixed configuration,
    seed and file hash as study user attributes."""
    metrics = [metric for metric, _ in search.spec.all_objectives]
    if search.study.metric_names is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2; the dashboard reads it
            warnings.simplefilter("ignore", category=optuna_warning())
            _retry(lambda: search.study.set_metric_names(metrics))
    attributes = {
        "description": study.description,
        "fixed": {k: _plain(v) for k, v in study.base_config(study.seeds[0]).to_dict().items() if k in study.fixed},
        "objectives": [f"{direction} {metric}" for metric, direction in search.spec.all_objectives],
        "sampler": f"{search.spec.sampler} (seed {study.seeds[0]})",
        "harness_study_file_sha256": study.text_hash,
    }
    current = search.study.user_attrs
    for key, value in attributes.items():
        if current.get(key) != value:
            _retry(lambda key=key, value=value: search.study.set_user_attr(key, value))


def optuna_warning() -> type[Warning]:
    return _optuna().exceptions.ExperimentalWarning


def _plain(value: Any) -> Any:
    """A JSON value for a user attribute (Optuna stores them as JSON)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def prepare(db: Database, study: Study) -> None:
    """Before the workers start: Optuna's tables and study exist, and the file's ``enqueue``
    points are queued (once: points already in the study are skipped)."""
    search = open_search(db, study)
    describe_in_optuna(search, study)
    if not search.spec.enqueue:
        return
    # Under the search's lock: runners that start together must not each find a point missing
    # and each enqueue it (skip_if_exists alone is check-then-insert).
    with sampling_lock(db, study.name):
        for point in search.spec.enqueue:
            _retry(lambda point=point: search.study.enqueue_trial(dict(point), skip_if_exists=True))


def counts_toward_n_trials(state: str, user_attrs: Mapping[str, Any], linked: bool) -> bool:
    """Whether an Optuna trial (``state``: a TrialState name) uses one of the search's ``n_trials``.

    A running trial does, and so does a finished one with a result in the harness: a row that
    points at it (``linked``), a reused row, or a sample that could not be set up. A superseded
    trial does not (a replacement runs its configuration), nor a failed trial that nothing in the
    harness accounts for: an older harness failed duplicate samples that way, and a rerun of the
    study now runs the trial they took the place of.
    """
    if user_attrs.get(SUPERSEDED) or state == "WAITING":
        return False
    if state in ("RUNNING", "COMPLETE", "PRUNED"):
        return True
    return linked or any(user_attrs.get(key) is not None for key in (HARNESS_TRIAL, REUSED, SETUP_FAILED))


def trials_used_in_database(db: Database, study_name: str, study_id: int) -> int | None:
    """``trials_used`` read from Optuna's tables with plain queries (for ``harness status``: no
    Optuna import, nothing written); None when the database has no Optuna study of that name."""
    from sqlalchemy import inspect, text

    if not inspect(db.engine).has_table("trials"):
        return None

    def query(session: Any) -> tuple[bool, list[Any]]:
        found = session.execute(
            text("SELECT study_id FROM studies WHERE study_name = :name"), {"name": study_name}
        ).first()
        if found is None:
            return False, []
        rows = session.execute(
            text(
                "SELECT t.number, t.state, a.key, a.value_json FROM trials t "
                "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id WHERE t.study_id = :id"
            ),
            {"id": found[0]},
        ).all()
        return True, list(rows)

    exists, rows = db.run(query)
    if not exists:
        return None
    trials: dict[int, tuple[str, dict[str, Any]]] = {}
    for number, state, key, value in rows:
        state_name = getattr(state, "name", str(state))  # an enum on some drivers, its name on others
        _, attrs = trials.setdefault(int(number), (state_name, {}))
        if key is not None:
            attrs[key] = json.loads(value)
    linked = store.optuna_numbers(db, study_id)
    return sum(
        counts_toward_n_trials(state, attrs, number in linked or attrs.get(HARNESS_TRIAL) is not None)
        for number, (state, attrs) in trials.items()
    )


def trials_used(search: _Search, db: Database, study_id: int) -> int:
    """Optuna trials that count against ``n_trials`` (all processes together). Call it under
    ``sampling_lock``: it also retires orphans, RUNNING trials that no harness row points at,
    older than ``ORPHAN_AFTER_S``."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    trials = _retry(
        lambda: search.study.get_trials(
            deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING)
        )
    )
    linked = store.optuna_numbers(db, study_id)
    orphaned_before = datetime.now() - timedelta(seconds=ORPHAN_AFTER_S)  # Optuna's local times
    used = 0
    for trial in trials:
        is_linked = trial.number in linked or trial.user_attrs.get(HARNESS_TRIAL) is not None
        if (
            trial.state == states.RUNNING
            and not is_linked
            and not trial.user_attrs.get(SUPERSEDED)
            and trial.datetime_start is not None
            and trial.datetime_start < orphaned_before
        ):
            supersede(search, trial.number)
            continue
        used += counts_toward_n_trials(trial.state.name, trial.user_attrs, is_linked)
    return used


@contextmanager
def sampling_lock(db: Database, study_name: str) -> Iterator[None]:
    """Serializes "count the trials, then ask for one" across processes, so that several workers
    together make exactly ``n_trials`` trials: a file lock for SQLite (its processes share one
    machine), an advisory lock for PostgreSQL, none elsewhere."""
    path = sqlite_file(db.url)
    key = hashlib.sha256(f"{db.url}|{study_name}".encode()).hexdigest()
    if path is not None:
        import fcntl

        lock_file = Path(tempfile.gettempdir()) / f"harness-search-{key[:16]}.lock"
        with open(lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if db.engine.dialect.name == "postgresql":
        from sqlalchemy import text

        lock_id = int(key[:15], 16)
        with db.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})
                connection.commit()
        return
    yield


def supersede(search: _Search, number: int | None) -> None:
    """Fail the Optuna trial of a harness trial that is handed back or taken over, marked so that
    it does not count against ``n_trials`` (a new Optuna trial replaces it)."""
    if number is None:
        return
    optuna = _optuna()
    states = optuna.trial.TrialState
    try:
        trial_id = _retry(
            lambda: search.storage.get_trial_id_from_study_id_trial_number(search.study_id, number)
        )
        if _retry(lambda: search.storage.get_trial(trial_id)).state not in (states.RUNNING, states.WAITING):
            return
        _retry(lambda: search.storage.set_trial_user_attr(trial_id, SUPERSEDED, True))
        _retry(lambda: search.storage.set_trial_state_values(trial_id, states.FAIL))
    except (KeyError, RuntimeError):  # gone, or finished meanwhile by its old owner
        return


def objective_values(spec: SearchSpec, summary: Mapping[str, Any] | None) -> list[float] | None:
    """The search's objective values from a trial's summary, in file order; None unless every one
    is a finite number (Optuna records a trial without all of them as failed)."""
    values = []
    for metric, _ in spec.all_objectives:
        value = (summary or {}).get(metric)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            return None
        values.append(float(value))
    return values


def _tell(search: _Search, trial: Any, *, values: list[float] | None = None, state: str = "complete") -> None:
    optuna = _optuna()
    states = optuna.trial.TrialState
    try:
        if state == "complete" and values is not None:
            told = values if search.spec.multi_objective else values[0]
            _retry(lambda: search.study.tell(trial, told, skip_if_finished=True))
        elif state == "pruned":
            _retry(lambda: search.study.tell(trial, state=states.PRUNED, skip_if_finished=True))
        else:
            _retry(lambda: search.study.tell(trial, state=states.FAIL, skip_if_finished=True))
    except (KeyError, RuntimeError, ValueError):  # superseded meanwhile by another worker
        return


# ----------------------------------------------------------------------------------------------
# One worker's trials


class SearchSource:
    """A search's trials for one worker: claimed rows get a new Optuna trial with the same
    parameters; new trials are sampled while the study has used fewer than ``n_trials``."""

    def __init__(self, ctx: WorkerContext) -> None:
        assert ctx.study.search is not None
        self.ctx = ctx
        self.search = open_search(ctx.db, ctx.study)
        self.seed = ctx.study.seeds[0]

    def adopt(self, claim: Claim) -> Job | None:
        """A claimed harness trial (interrupted, its worker dead, or a failure to retry) gets a new
        Optuna trial with the same parameters."""
        optuna = _optuna()
        search = self.search
        supersede(search, claim.optuna_number)
        params = {p.name: claim.config.get(p.name) for p in search.spec.space}
        template = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            params=params,
            distributions={p.name: distribution(p, params[p.name]) for p in search.spec.space},
            # fixed_params: a GridSampler must not assign this trial a grid point of its own.
            system_attrs={"fixed_params": params},
            user_attrs={HARNESS_TRIAL: claim.row_id},
        )
        trial_id = _retry(lambda: search.storage.create_new_trial(search.study_id, template_trial=template))
        trial = optuna.trial.Trial(search.study, trial_id)
        number = trial.number
        if not store.set_optuna_number(self.ctx.db, claim, number):
            _tell(search, trial, state="failed")
            return None
        return self._job(trial, replace(claim, optuna_number=number))

    def propose(self) -> Job | Skipped | None:
        """Sample one point in a new Optuna trial, claimed; SKIPPED when nothing needs training
        (the point was invalid, or the study already has a result for it)."""
        search = self.search
        ctx = self.ctx
        with sampling_lock(ctx.db, ctx.study.name):
            used = trials_used(search, ctx.db, ctx.study_id)
            trial = None
            if used < search.spec.n_trials:
                reseed(search, self.seed)
                trial = _retry(search.study.ask)
        if trial is None:
            return None
        try:
            claim = _configure(ctx, search, trial, self.seed)
        except KeyboardInterrupt:
            supersede(search, trial.number)
            raise
        except Exception as error:  # e.g. an enqueued value Optuna rejects: a failed sample, not a crash
            reason = f"{type(error).__name__}: {error}"
            # The mark makes the failure count against n_trials (so a sample that always fails
            # cannot loop); if even it cannot be written, the failure is still reported below.
            with contextlib.suppress(Exception):
                _retry(lambda: trial.set_user_attr(SETUP_FAILED, reason))
            _tell(search, trial, state="failed")
            ctx.echo(f"optuna trial {trial.number}: could not be set up ({reason}); counted as failed")
            return SKIPPED
        return claim if claim is SKIPPED else self._job(trial, claim)

    def _job(self, trial: Any, claim: Claim) -> Job:
        ctx, search = self.ctx, self.search
        spec = search.spec
        # Intermediate values are the k-NN accuracy (what training measures as it goes); they rank
        # trials the right way round only when the objective is maximized. Optuna prunes
        # single-objective studies only.
        report = spec.direction == "maximize" and not spec.multi_objective

        def on_eval(epoch: int, value: float) -> None:
            if not report or value is None or not math.isfinite(value):
                return
            try:
                trial.report(float(value), int(epoch))
                prune = trial.should_prune()
            except Exception as error:  # a busy database must not fail the trial; it just is not pruned now
                ctx.echo(
                    f"optuna trial {trial.number}: could not report epoch {epoch} ({type(error).__name__}: {error})"
                )
                return
            if prune:
                raise TrialPruned(f"pruned at epoch {epoch} (k-NN top-1 {metric_text('knn_top1', value)})")

        def on_finished(finished: Finished | None) -> None:
            if finished is None:  # taken over by another worker, which owns the Optuna side now
                return
            _tell(search, trial, values=objective_values(spec, finished.summary), state=finished.status)

        return Job(
            claim,
            on_eval=on_eval,
            on_finished=on_finished,
            on_interrupted=lambda: supersede(search, trial.number),
        )


def _configure(ctx: WorkerContext, search: _Search, trial: Any, seed: int) -> Claim | Skipped:
    """The sampled configuration's harness trial, claimed; SKIPPED when there is nothing to train."""
    params = {p.name: suggest(trial, p) for p in search.spec.space}
    overrides = {**ctx.study.fixed, **params, "seed": seed}
    label = " ".join(f"{k}={store.format_value(v)}" for k, v in params.items())
    try:
        config = resolve(overrides)
    except SpecError as error:
        reason = "invalid configuration: " + "; ".join(error.problems)
        store.insert_failed(
            ctx.db, ctx.study_id, overrides, config_hash(overrides), seed, reason, trial.number
        )
        _tell(search, trial, state="failed")
        ctx.echo(f"optuna trial {trial.number} ({label}): {reason}")
        return SKIPPED
    _retry(lambda: trial.set_user_attr("config_hash", config.config_hash))
    claim = store.insert_running(
        ctx.db, ctx.study_id, config.to_dict(), config.config_hash, seed, ctx.worker, trial.number
    )
    if claim is None:
        return _existing(ctx, search, trial, config.config_hash, seed, label)
    _retry(lambda: trial.set_user_attr(HARNESS_TRIAL, claim.row_id))
    return claim


def _existing(
    ctx: WorkerContext, search: _Search, trial: Any, hash_: str, seed: int, label: str
) -> Claim | Skipped:
    """The sampled configuration is already in the study: reuse its result instead of training
    it again, or claim it if it is runnable (pending, abandoned, or failed with --retry-failed).
    A copy of an enqueued point whose result exists, and any sample of a configuration that runs
    in another worker right now, are duplicates: superseded, so that they do not use a trial of
    ``n_trials`` (the latter after a pause, so that the other worker can finish it)."""
    row = store.find_row(ctx.db, ctx.study_id, hash_, seed)
    if row is None:  # deleted meanwhile; treat the sample as failed rather than loop
        _tell(search, trial, state="failed")
        return SKIPPED
    status = row["status"]
    if status in ("complete", "pruned", "failed") and _enqueued(search, trial):
        supersede(search, trial.number)
        ctx.echo(
            f"optuna trial {trial.number} ({label}): an enqueued point already in the study as trial "
            f"#{row['id']}; not counted"
        )
        return SKIPPED
    if status == "complete":
        values = objective_values(search.spec, row)
        _retry(lambda: trial.set_user_attr(REUSED, row["id"]))
        _tell(search, trial, values=values, state="complete" if values is not None else "failed")
        ctx.tally.reused += 1
        shown = ", ".join(f"{m} {metric_text(m, row.get(m))}" for m, _ in search.spec.all_objectives)
        ctx.echo(
            f"optuna trial {trial.number} ({label}): same configuration as trial #{row['id']}, reused its {shown}"
        )
        return SKIPPED
    if status == "pruned" or (status == "failed" and not ctx.options.retry_failed):
        _retry(lambda: trial.set_user_attr(REUSED, row["id"]))
        _tell(search, trial, state=status)
        ctx.tally.reused += 1
        ctx.echo(
            f"optuna trial {trial.number} ({label}): same configuration as trial #{row['id']}, which was {status}; counted as {status}"
        )
        return SKIPPED
    claim = store.claim_row(
        ctx.db,
        row["id"],
        ctx.worker,
        stale_before=ctx.stale_before,
        retry_failed=ctx.options.retry_failed,
        optuna_number=trial.number,
    )
    if claim is None:  # running in another worker right now
        supersede(search, trial.number)
        ctx.echo(
            f"optuna trial {trial.number} ({label}): same configuration as trial #{row['id']}, running in "
            "another worker; not counted"
        )
        # Sampling again at once would likely propose the same point (small spaces); give the
        # other worker time to finish it.
        time.sleep(ctx.poll_seconds)
        return SKIPPED
    if row.get("optuna_number") is not None and row["optuna_number"] != trial.number:
        supersede(search, row["optuna_number"])
    return claim


def _enqueued(search: _Search, trial: Any) -> bool:
    """Whether ``trial`` came from the queue of enqueued points (``enqueue_trial``)."""
    trial_id = _retry(
        lambda: search.storage.get_trial_id_from_study_id_trial_number(search.study_id, trial.number)
    )
    return "fixed_params" in _retry(lambda: search.storage.get_trial_system_attrs(trial_id))


def describe(study: Study) -> list[str]:
    """The search as ``--dry-run`` prints it."""
    spec = study.search
    assert spec is not None
    lines = [
        f"search {study.name}: {spec.n_trials} trial(s), sampler {spec.sampler}, pruner {spec.pruner}, "
        f"{'objectives' if spec.multi_objective else 'objective'} "
        f"{', '.join(f'{d} {m}' for m, d in spec.all_objectives)}, seed {study.seeds[0]}"
    ]
    for param in spec.space:
        if param.choices is not None:
            lines.append(f"  {param.name}: one of {list(param.choices)}")
        else:
            extra = (", log scale" if param.log else "") + (
                f", step {param.step:g}" if param.step is not None else ""
            )
            lines.append(f"  {param.name}: {param.low:g} .. {param.high:g}{extra}")
    for point in spec.enqueue:
        lines.append("  enqueued first: " + (", ".join(f"{k}={v}" for k, v in point.items()) or "(defaults)"))
    base = study.base_config(study.seeds[0]).to_dict()
    fixed = ", ".join(f"{k}={base[k]}" for k in study.fixed)
    if fixed:
        lines.append(f"  fixed: {fixed}")
    if len(study.seeds) > 1:
        lines.append(f"  note: a search uses the first seed ({study.seeds[0]}) of seeds: {list(study.seeds)}")
    return lines


@dataclass(frozen=True)
class SearchKind:
    """``search:`` studies: an Optuna study stored beside the harness tables."""

    study: Study

    def prepare(self, db: Database) -> None:
        prepare(db, self.study)

    def sync_lines(self, report: SyncReport, limit: int = 10) -> list[str]:
        state = "new" if report.created else ("file changed" if report.file_changed else "unchanged")
        return [f"study {self.study.name} (search, {state}): {report.kept} trial(s) in the database so far"]

    def dry_run_lines(self, existing: Mapping[tuple[str, int], str] | None) -> list[str]:
        return describe(self.study) + [f"note: {note}" for note in self.study.notes]

    def source(self, ctx: WorkerContext) -> SearchSource:
        return SearchSource(ctx)


__all__ = [
    "SearchKind",
    "SearchSetupError",
    "SearchSource",
    "describe",
    "distribution",
    "grid_values",
    "make_storage",
    "objective_values",
    "open_search",
    "prepare",
    "search_problems",
    "suggest",
    "supersede",
    "trials_used",
    "trials_used_in_database",
]
