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

import hashlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from harness.db import Database, sqlite_file
from harness.spec import SearchParam, SearchSpec, SpecError, Study, config_hash, resolve
from harness.study import store
from harness.study.runner import WorkerContext, run_claim
from harness.study.store import Claim
from harness.units import metric_text

T = TypeVar("T")

SQLITE_TIMEOUT_S = 30.0
_STORAGE_RETRIES = 8
SUPERSEDED = "harness_superseded"
HARNESS_TRIAL = "harness_trial_id"


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
    for attempt in range(_STORAGE_RETRIES):
        try:
            return work()
        except Exception as error:
            if not _is_transient(error) or attempt == _STORAGE_RETRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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


def _plain(value: Any) -> Any:
    """A JSON value for a user attribute (Optuna stores them as JSON)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def prepare(db: Database, study: Study) -> None:
    """Before the workers start: Optuna's tables and study exist, and the file's ``enqueue``
    points are queued (once: points already in the study are skipped)."""
    search = open_search(db, study)
    describe_in_optuna(search, study)
    for point in search.spec.enqueue:
        _retry(lambda point=point: search.study.enqueue_trial(dict(point), skip_if_exists=True))


def trials_used(search: _Search) -> int:
    """Optuna trials that count against ``n_trials`` (all processes together)."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    trials = _retry(
        lambda: search.study.get_trials(
            deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING)
        )
    )
    return sum(1 for t in trials if not t.user_attrs.get(SUPERSEDED))


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
# The worker loop


def search_loop(ctx: WorkerContext) -> None:
    """Rerun the search's trials that need it, then sample new ones until ``n_trials`` is used."""
    study = ctx.study
    assert study.search is not None
    search = open_search(ctx.db, study)
    seed = study.seeds[0]
    waiting_said = False
    while ctx.budget.take():
        claim = store.claim_next(
            ctx.db,
            ctx.study_id,
            ctx.worker,
            stale_before=ctx.stale_before,
            retry_failed_before=ctx.retry_failed_before,
        )
        if claim is not None:
            _rerun(ctx, search, claim)
            waiting_said = False
            continue
        with sampling_lock(ctx.db, study.name):
            trial = None
            if trials_used(search) < search.spec.n_trials:
                reseed(search, seed)
                trial = _retry(search.study.ask)
        if trial is not None:
            if not _ask_and_run(ctx, search, trial, seed):
                ctx.budget.give_back()  # nothing trained (a reused or invalid point)
            waiting_said = False
            continue
        ctx.budget.give_back()
        others = store.live_running(ctx.db, ctx.study_id, stale_before=ctx.stale_before)
        if others == 0:
            return
        if not waiting_said:
            ctx.echo(
                f"waiting for {others} trial(s) running in other workers (to take over any whose worker dies)"
            )
            waiting_said = True
        time.sleep(ctx.poll_seconds)


def _rerun(ctx: WorkerContext, search: _Search, claim: Claim) -> None:
    """A claimed harness trial (interrupted, its worker dead, or a failure to retry) gets a new
    Optuna trial with the same parameters."""
    optuna = _optuna()
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
    if not store.set_optuna_number(ctx.db, claim, number):
        _tell(search, trial, state="failed")
        return
    _run(ctx, search, trial, replace(claim, optuna_number=number))


def _ask_and_run(ctx: WorkerContext, search: _Search, trial: Any, seed: int) -> bool:
    """Sample one point in a new Optuna trial and run it; False when nothing was trained (the
    point was invalid, or the study already has a result for it)."""
    try:
        claim = _configure(ctx, search, trial, seed)
    except KeyboardInterrupt:
        supersede(search, trial.number)
        raise
    except Exception as error:  # e.g. an enqueued value Optuna rejects: a failed sample, not a crash
        _tell(search, trial, state="failed")
        ctx.echo(
            f"optuna trial {trial.number}: could not be set up ({type(error).__name__}: {error}); counted as failed"
        )
        return False
    if claim is None:
        return False
    _run(ctx, search, trial, claim)
    return True


def _configure(ctx: WorkerContext, search: _Search, trial: Any, seed: int) -> Claim | None:
    """The sampled configuration's harness trial, claimed; None when there is nothing to train."""
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
        return None
    _retry(lambda: trial.set_user_attr("config_hash", config.config_hash))
    claim = store.insert_running(
        ctx.db, ctx.study_id, config.to_dict(), config.config_hash, seed, ctx.worker, trial.number
    )
    if claim is None:
        claim = _existing(ctx, search, trial, config.config_hash, seed, label)
    if claim is not None:
        _retry(lambda: trial.set_user_attr(HARNESS_TRIAL, claim.row_id))
    return claim


def _existing(
    ctx: WorkerContext, search: _Search, trial: Any, hash_: str, seed: int, label: str
) -> Claim | None:
    """The sampled configuration is already in the study: reuse its result instead of training
    it again, or claim it if it is runnable (pending, abandoned, or failed with --retry-failed)."""
    row = store.find_row(ctx.db, ctx.study_id, hash_, seed)
    if row is None:  # deleted meanwhile; treat the sample as failed rather than loop
        _tell(search, trial, state="failed")
        return None
    status = row["status"]
    if status == "complete":
        values = objective_values(search.spec, row)
        _retry(lambda: trial.set_user_attr("harness_reused_trial_id", row["id"]))
        _tell(search, trial, values=values, state="complete" if values is not None else "failed")
        ctx.tally.reused += 1
        shown = ", ".join(f"{m} {metric_text(m, row.get(m))}" for m, _ in search.spec.all_objectives)
        ctx.echo(
            f"optuna trial {trial.number} ({label}): same configuration as trial #{row['id']}, reused its {shown}"
        )
        return None
    if status == "pruned" or (status == "failed" and not ctx.options.retry_failed):
        _retry(lambda: trial.set_user_attr("harness_reused_trial_id", row["id"]))
        _tell(search, trial, state=status)
        ctx.tally.reused += 1
        ctx.echo(
            f"optuna trial {trial.number} ({label}): same configuration as trial #{row['id']}, which was {status}; counted as {status}"
        )
        return None
    claim = store.claim_row(
        ctx.db,
        row["id"],
        ctx.worker,
        stale_before=ctx.stale_before,
        retry_failed=ctx.options.retry_failed,
        optuna_number=trial.number,
    )
    if claim is None:  # running in another worker right now
        _tell(search, trial, state="failed")
        ctx.echo(
            f"optuna trial {trial.number} ({label}): same configuration as trial #{row['id']}, running elsewhere; counted as failed"
        )
        return None
    if row.get("optuna_number") is not None and row["optuna_number"] != trial.number:
        supersede(search, row["optuna_number"])
    return claim


def _run(ctx: WorkerContext, search: _Search, trial: Any, claim: Claim) -> None:
    from harness.train import TrialPruned

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

    try:
        finished = run_claim(ctx, claim, on_eval=on_eval)
    except KeyboardInterrupt:
        supersede(search, trial.number)
        raise
    if finished is None:  # taken over by another worker, which owns the Optuna side now
        return
    _tell(search, trial, values=objective_values(spec, finished.summary), state=finished.status)


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


__all__ = [
    "SearchSetupError",
    "describe",
    "distribution",
    "grid_values",
    "make_storage",
    "open_search",
    "prepare",
    "search_loop",
    "search_problems",
    "suggest",
    "supersede",
    "trials_used",
]
