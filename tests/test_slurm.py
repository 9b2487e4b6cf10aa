"""``harness run --launcher slurm``: the parts that need no cluster, and a real one-node Slurm.

The cluster test starts Debian's ``munged``, ``slurmctld`` and ``slurmd`` on this machine (2 CPUs,
no GPUs, no cgroups; state, spool, logs and the munge key in a temporary directory; its own
ports), submits a 6-trial grid as 3 jobs against a throwaway PostgreSQL database, cancels one
job while its trial trains (SIGTERM: the trial checkpoints and is handed back) and warns another
of its end (SIGUSR2, what Slurm sends before a time limit: the same, and submitit requeues the
job), and checks that every trial completed exactly once and that each interrupted trial was
finished by a job that resumed it from the checkpoint written when it was stopped. Skipped only
when the Slurm or munge binaries are absent (``bash scripts/setup.sh test`` installs them).
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select

from harness.cli import main
from harness.db import Database, SlurmJobRow, TrialRow, resolve_url
from harness.spec import load_study
from harness.study.artifacts import trial_folder
from harness.study.slurm import (
    SlurmOptions,
    _use_allotted_cpus,
    executor_parameters,
    pinned_checkpoint_dir,
    sbatch_lines,
    slurm_states,
    sqlite_refusal,
    time_minutes,
)

REPO = Path(__file__).resolve().parent.parent
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")

TINY_STUDY = """\
study: {name}
description: six tiny trials for the Slurm test
fixed:
  dataset: synthetic
  train_size: {train_size}
  test_size: 32
  batch_size: 32
  proj_hidden_dim: 32
  proj_dim: 16
  linear_epochs: 1
  knn_k: 5
  epochs: {epochs}
  eval_every: 0
  device: cpu
{extra}grid:
  lr: [0.001, 0.002, 0.003]
  weight_decay: [0.0, 0.0001]
seeds: [0]
"""


def _write_study(
    tmp_path: Path, name: str = "slurmtiny", epochs: int = 1, train_size: int = 64, **extra: object
) -> Path:
    path = tmp_path / f"{name}.yaml"
    lines = "".join(f"  {knob}: {value}\n" for knob, value in extra.items())
    path.write_text(TINY_STUDY.format(name=name, epochs=epochs, train_size=train_size, extra=lines))
    return path


# ----------------------------------------------------------------------------------------------
# Without a cluster


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("30", 30), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0-0:0:59", 1)],
)
def test_time_minutes__slurm_formats(text: str, minutes: int) -> None:
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "1:2:3:4", "-5"])
def test_time_minutes__refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="expected a"):
        time_minutes(text)


def test_sqlite_refusal__names_the_reason_and_postgres_passes() -> None:
    refusal = sqlite_refusal(None)
    assert refusal is not None and "SQLite" in refusal and "shared filesystems" in refusal
    assert sqlite_refusal("postgresql://u@h/db") is None


def test_harness_run__slurm_with_sqlite_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "h.db"
    code = main(["run", str(_write_study(tmp_path)), "--launcher", "slurm", "--jobs", "2", "--db", str(db)])
    assert code == 2
    assert "SQLite" in capsys.readouterr().err
    assert not db.exists()


def test_sbatch_lines__every_option_reaches_the_script(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    study = load_study(_write_study(tmp_path))
    options = SlurmOptions(
        jobs=3, partition="gpu", gpus_per_job=2, cpus_per_job=8, time="1-00:00", mem="32G", folder=tmp_path / "jobs"
    )
    lines = sbatch_lines(study, options)
    for line in (
        "#SBATCH --array=0-2%3",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=1440",
        "#SBATCH --mem=32G",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --job-name=harness-slurmtiny",
    ):
        assert "  " + line in lines
    assert any("submitit.core._submit" in line for line in lines)
    assert not (tmp_path / "jobs").exists()


def test_harness_run__slurm_dry_run_prints_the_script_and_writes_nothing(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("submitit")
    args = ["run", str(_write_study(tmp_path)), "--launcher", "slurm", "--jobs", "2", "--dry-run"]
    assert main([*args, "--db", postgres_url, "--slurm-folder", str(tmp_path / "jobs")]) == 0
    out = capsys.readouterr().out
    assert "6 trial(s)" in out and "#SBATCH --array=0-1%2" in out
    assert not (tmp_path / "jobs").exists()
    engine = create_engine(resolve_url(postgres_url))
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "2"], "--jobs: only with --launcher slurm"),
        (["--launcher", "slurm", "--workers", "2"], "each job is one worker"),
        (["--launcher", "slurm", "--max-trials", "2"], "--max-trials cannot be shared"),
    ],
)
def test_harness_run__launcher_arguments_that_do_not_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    db = tmp_path / "h.db"
    assert main(["run", str(_write_study(tmp_path)), "--db", str(db), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists()


def test_executor_parameters__only_what_was_asked(tmp_path: Path) -> None:
    study = load_study(_write_study(tmp_path))
    parameters = executor_parameters(study, SlurmOptions(jobs=4, time="10"))
    assert parameters == {
        "job_name": "harness-slurmtiny",
        "time": 10,
        "nodes": 1,
        "ntasks_per_node": 1,
        "signal_delay_s": 90,
        "array_parallelism": 4,
    }
    assert sbatch_lines(study, SlurmOptions(jobs=4))[0].startswith("slurm job array of 4 job(s)")


def test_pinned_checkpoint_dir__absolute_on_the_submitting_machine_unless_the_study_sets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.study.worker import RunOptions

    monkeypatch.chdir(tmp_path)
    url = "postgresql://u@db.example/harness"
    study = load_study(_write_study(tmp_path))
    assert pinned_checkpoint_dir(study, RunOptions(db=url)) == str(tmp_path / "results" / "harness-checkpoints")
    assert pinned_checkpoint_dir(study, RunOptions(db=url, checkpoint_dir="ckpt")) == str(tmp_path / "ckpt")
    own = load_study(_write_study(tmp_path, name="own", checkpoint_dir="/scratch/me"))
    assert pinned_checkpoint_dir(own, RunOptions(db=url)) == "/scratch/me"
    relative = load_study(_write_study(tmp_path, name="relative", checkpoint_dir="ckpt/here"))
    assert pinned_checkpoint_dir(relative, RunOptions(db=url)) == str(tmp_path / "ckpt" / "here")


def test_slurm_states__one_squeue_call_per_array_and_its_states_parsed() -> None:
    calls: list[list[str]] = []

    def fake_squeue(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        out = "7_0|RUNNING\n7_1|CANCELLED\n7_2|PENDING\n9_0|COMPLETED\n"
        return subprocess.CompletedProcess(command, 0, stdout=out, stderr="")

    states = slurm_states(["7_0", "7_1", "9_0"], run=fake_squeue)
    assert states["7_0"] == "RUNNING" and states["7_1"] == "CANCELLED" and states["9_0"] == "COMPLETED"
    assert calls == [["squeue", "-h", "--states=all", "-j", "7,9", "-o", "%i|%T"]]
    assert slurm_states([], run=fake_squeue) == {} and len(calls) == 1


@pytest.mark.parametrize("allotted", ["other", None, ""])
def test_use_allotted_cpus__a_job_trains_on_the_cpus_it_asked_for(
    monkeypatch: pytest.MonkeyPatch, allotted: str | None
) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    if allotted is not None:  # "other": a number of CPUs that is not torch's current thread count
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(before + 1) if allotted == "other" else allotted)
    try:
        _use_allotted_cpus()
        # Without --cpus-per-job (no variable, or an empty one) torch's own choice stands.
        assert torch.get_num_threads() == (before + 1 if allotted == "other" else before)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# A real one-node cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sbin(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


class Cluster:
    """A single-node Slurm (and its munged) started in ``root``; ``env`` points clients at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        user = getpass.getuser()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=harnesstest",
                    f"SlurmctldHost={host}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r}/munge.sock",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    # No cgroups: processes are tracked through /proc, tasks are not confined.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MinJobAge=600",
                    "KillWait=10",
                    f"NodeName={host} CPUs=2 RealMemory=1000 State=UNKNOWN",
                    f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    def start(self) -> None:
        r = self.root
        munged = [
            _sbin("munged") or "munged",
            "--force",
            f"--key-file={r}/munge.key",
            f"--socket={r}/munge.sock",
            f"--pid-file={r}/munged.pid",
            f"--log-file={r}/log/munged.log",
            f"--seed-file={r}/munged.seed",
        ]
        subprocess.run(munged, check=True, capture_output=True, timeout=30)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_sbin(daemon) or daemon, "-f", str(self.conf)], check=True, env=self.env, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm did not come up (sinfo says {out!r}); logs:\n{self.logs()}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def logs(self) -> str:
        return "\n".join(
            f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in sorted((self.root / "log").glob("*"))
        )

    def stop(self) -> None:
        # Our jobs first (slurmd does not take its running steps down with it), then the daemons
        # we started, by the pids they wrote.
        jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if jobs:
            self.run("scancel", *sorted(set(jobs)), check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:  # still there after 10 s (slurmd waiting on a step): it was ours, end it
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [name for name in DAEMONS if _sbin(name) is None] + [n for n in CLIENTS if shutil.which(n) is None]
    if missing:
        pytest.skip(
            f"no Slurm here ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
            "(`bash scripts/setup.sh test` does)"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs; run the Slurm test as root (as CI does)")
    pytest.importorskip("submitit", reason="the `slurm` extra (submitit) is not installed")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    cluster.write_config()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _job_logs(folder: Path) -> dict[str, str]:
    """Each job's stdout (submitit names them ARRAYID_TASK_0_log.out)."""
    return {p.name.rsplit("_0_log.out", 1)[0]: p.read_text(errors="replace") for p in folder.glob("*_0_log.out")}


def _wait(
    what: str, condition: object, timeout: float, cluster: Cluster, folder: Path, poll: float = 0.5
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()  # type: ignore[operator]
        if value:
            return value
        time.sleep(poll)
    logs = "\n".join(f"== {k}\n{v[-2000:]}" for k, v in sorted(_job_logs(folder).items()))
    queue = cluster.run("squeue", check=False).stdout
    raise AssertionError(f"timed out waiting for {what}\nsqueue:\n{queue}\njob logs:\n{logs}\n{cluster.logs()}")


# The cluster test's trials train 4 steps an epoch for 6 epochs and checkpoint after each epoch: a
# step file in a trial's folder says it is training (optimizer steps done, so a checkpoint to resume
# from holds step >= 1). A job is signalled only while its trial's newest checkpoint is from its
# first two epochs, so that 16 steps or more are left to stop in (a trial seen later, e.g. one that
# ran on while the test stopped another, is passed over for the next one).
STEPS_PER_EPOCH, EPOCHS = 4, 6
TRAINING = {"train_size": 32 * STEPS_PER_EPOCH, "checkpoint_epochs": 1}  # batch_size 32
EARLY = 2 * STEPS_PER_EPOCH


def _step(checkpoint: Path) -> int:
    """The step a step file was written at (``step-000000012.ckpt``: 12)."""
    return int(checkpoint.name.split("-")[1].split(".")[0])


def _training_job(folder: Path, checkpoints: Path, exclude: set[str], skip: set[int]) -> tuple[str, int, int] | None:
    """A job whose trial is training now, early in its run, and the step of the trial's newest
    checkpoint: the job's log says it runs the trial (its last line is "running"), and the trial's
    checkpoint folder holds a step file, of step ``EARLY`` at most. Jobs in ``exclude`` and trials
    in ``skip`` are passed over (an interrupted trial keeps its step files while its next attempt
    prepares)."""
    for job, text in sorted(_job_logs(folder).items()):
        if job in exclude:
            continue
        lines = [line for line in text.splitlines() if line.startswith("[slurm ")]
        match = re.search(r"trial #(\d+) .*: running on ", lines[-1]) if lines else None
        if not match or int(match.group(1)) in skip:
            continue
        trial = int(match.group(1))
        steps = sorted(trial_folder(checkpoints, "slurmtiny", trial).glob("step-*.ckpt"))
        if steps and _step(steps[-1]) <= EARLY:
            return job, trial, _step(steps[-1])
    return None


def _handed_back(log: str, trial: int) -> Path | None:
    """The checkpoint that a job's hand-back line of ``trial`` names (None: it names none)."""
    match = re.search(rf"trial #{trial}: interrupted; set back to pending \(.* from checkpoint (\S+)\)", log)
    return Path(match.group(1)) if match else None


@pytest.mark.slow
def test_harness_run__slurm_jobs_complete_every_trial_once_across_scancel_and_requeue(
    slurm_cluster: Cluster,
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # for `harness status` and `harness cancel`
    folder = tmp_path / "jobs"
    # With PostgreSQL, a job keeps checkpoints under results/harness-checkpoints/ of its working
    # directory, which Slurm makes the submission's: one folder that every job shares.
    checkpoints = tmp_path / "results" / "harness-checkpoints"
    study = _write_study(tmp_path, epochs=EPOCHS, **TRAINING)
    submit = subprocess.run(
        [
            *(sys.executable, "-m", "harness", "run", str(study), "--launcher", "slurm", "--jobs", "3"),
            *("--db", postgres_url, "--slurm-folder", str(folder), "--cpus-per-job", "1", "--time", "10"),
        ],
        env={**cluster.env, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    assert "submitted 3 Slurm job(s)" in submit.stdout
    db = Database(postgres_url, create=False)
    try:
        jobs = db.run(lambda s: [row.job_id for row in s.scalars(select(SlurmJobRow))])
        assert len(jobs) == 3 and all(re.fullmatch(r"\d+_[012]", job) for job in jobs)
        stopped: dict[int, tuple[str, Path]] = {}  # trial -> the job stopped in it, the checkpoint it wrote

        def stop_while_training(what: str, exclude: set[str], *scancel: str) -> tuple[str, int]:
            """Signal a job once its trial has trained an epoch; it must checkpoint where it is and
            hand the trial back, naming that checkpoint."""
            job, trial, seen = _wait(  # type: ignore[misc]
                what, lambda: _training_job(folder, checkpoints, exclude, set(stopped)), 120, cluster, folder, 0.05
            )
            cluster.run("scancel", *scancel, job)
            line = f"trial #{trial}: interrupted; set back to pending"
            _wait(f"job {job} to hand trial #{trial} back", lambda: line in _job_logs(folder)[job], 60, cluster, folder)
            log = _job_logs(folder)[job]
            checkpoint = _handed_back(log, trial)
            # Stopped while training: a step file of the trial's folder, at or after the one seen,
            # before the last step (the final checkpoint would mean training had ended).
            assert checkpoint is not None and checkpoint.parent == trial_folder(checkpoints, "slurmtiny", trial), log
            assert seen <= _step(checkpoint) < STEPS_PER_EPOCH * EPOCHS, (seen, checkpoint)
            stopped[trial] = (job, checkpoint)
            return job, trial

        # One job cancelled while its trial trains: SIGTERM checkpoints the trial and hands it back.
        cancelled, cancelled_trial = stop_while_training("a job whose trial has trained an epoch", set())
        # Another warned of its time limit (what Slurm sends 90 s before it) while its trial trains:
        # the trial is checkpointed and handed back the same way, and the job is requeued.
        warned, warned_trial = stop_while_training(
            "a second job whose trial has trained an epoch", {cancelled}, "--signal=USR2"
        )
        _wait(
            f"job {warned} to be requeued",
            lambda: "Requeued job" in _job_logs(folder).get(warned, ""),
            60,
            cluster,
            folder,
        )

        def all_complete() -> bool:
            return db.run(lambda s: [t.status for t in s.scalars(select(TrialRow))]) == ["complete"] * 6

        _wait("every trial to complete", all_complete, 240, cluster, folder)
        trials = db.run(lambda s: list(s.scalars(select(TrialRow).order_by(TrialRow.id))))
        assert len({(t.config_hash, t.seed) for t in trials}) == 6
        logs = _job_logs(folder)
        for trial in trials:
            # Exactly once: each trial's result was written by one job, in one "complete" line.
            writers = [job for job, text in logs.items() if re.search(rf"trial #{trial.id}\b[^\n]*: complete", text)]
            assert len(writers) == 1, (trial.id, writers)
            # Every attempt of a trial used the one folder (the row keeps the last attempt's).
            assert trial.checkpoint_dir == str(trial_folder(checkpoints, "slurmtiny", trial.id))
            resumes = [
                (job, line.split("] ", 1)[1])
                for job, text in logs.items()
                for line in text.splitlines()
                if f"trial #{trial.id}: resuming from checkpoint" in line
            ]
            if trial.id not in stopped:  # never interrupted: one attempt, from step 0
                assert trial.attempts == 1 and resumes == [], (trial.id, resumes)
                continue
            # Interrupted: a second attempt, by the job that wrote the result, resumed from the
            # checkpoint the stopped job wrote (not from zero, not from a later one).
            _, checkpoint = stopped[trial.id]
            assert trial.attempts == 2
            assert len(resumes) == 1 and resumes[0][0] == writers[0], (trial.id, resumes, writers)
            resumed = f"trial #{trial.id}: resuming from checkpoint {checkpoint} (step {_step(checkpoint)}"
            assert re.fullmatch(re.escape(resumed) + r"(\)|, .*\))", resumes[0][1]), (resumed, resumes)
        finisher = next(j for j, t in logs.items() if re.search(rf"trial #{cancelled_trial}\b[^\n]*: complete", t))
        assert finisher != cancelled
        assert not re.search(rf"trial #{warned_trial}\b[^\n]*: complete", logs[warned].split("Requeued job")[0])

        # harness status lists the jobs with Slurm's states; harness cancel stops what is left.
        capsys.readouterr()
        assert main(["status", "slurmtiny", "--db", postgres_url]) == 0
        status = capsys.readouterr().out
        assert "6 complete" in status and "slurm jobs (3)" in status
        assert re.search(rf"{cancelled}: CANCELLED", status), status
        assert main(["cancel", "slurmtiny", "--db", postgres_url]) == 0
        out = capsys.readouterr().out
        assert re.search(r"cancelled \d+ Slurm job\(s\): .*" + re.escape(warned), out), out  # requeued, pending
        assert "PENDING" not in cluster.run("squeue", "-h", "-o", "%T").stdout
    finally:
        db.dispose()
