"""``harness run STUDY.yaml --set KEY=VALUE``: overrides applied before validation, problems named
by their argument, the overridden run stored as its own study."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from harness import cli
from harness.db import Database, StudyRow, TrialRow
from harness.overrides import OverrideError, derived_name, load_study_with_overrides, parse_override
from harness.spec import SpecError, parse_study
from harness.study import RunOptions, run_study

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import STUDY, fake_trainer

SEARCH = """\
study: s
dataset: synthetic
fixed: {train_size: 64, test_size: 32, batch_size: 32, epochs: 1}
search:
  n_trials: 8
  sampler: random
  objective: {metric: knn_top1, direction: maximize}
  space:
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
seeds: [0]
"""


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "cli-tiny.yaml"
    path.write_text(STUDY)
    return path


def test_parse_override__values_are_yaml_and_bare_knobs_go_to_fixed() -> None:
    assert parse_override("epochs=1").path == ("fixed", "epochs")
    assert parse_override("epochs=1").value == 1
    assert parse_override("lr=1e-3").value == 0.001  # a number, as in a study file
    assert parse_override("train_size=null").value is None
    assert parse_override("seeds=[0, 1]").path == ("seeds",) and parse_override("seeds=[0, 1]").value == [0, 1]
    assert parse_override("search.n_trials=4").path == ("search", "n_trials")
    assert parse_override("study=smoke").path == ("study",)
    assert parse_override("fixed.device=cpu").value == "cpu"


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("epochs", "--set epochs: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
        ("epochs=", "--set epochs: no value after '='"),
        ("a..b=1", "--set a..b: expected a key or a dotted path"),
        ("lr=[1, 2", "--set lr: the value '[1, 2' is not YAML"),
    ],
)
def test_parse_override__malformed_arguments_are_named(argument: str, message: str) -> None:
    with pytest.raises(OverrideError) as error:
        parse_override(argument)
    assert str(error.value).startswith(message)


def test_load_study_with_overrides__applied_to_fixed_before_validation(study_file: Path) -> None:
    study, overrides = load_study_with_overrides(study_file, ["epochs=3", "train_size=48", "seeds=[0, 1]"])
    assert [o.key for o in overrides] == ["epochs", "train_size", "seeds"]
    assert study.name == "cli-tiny.set.epochs-3.train_size-48.seeds-_0_1_." + study.name.rsplit(".", 1)[1]
    trials = study.trials()
    assert len(trials) == 3 * 2  # random_init ignores lr (and epochs)
    assert {t.epochs for t in trials if t.method == "simclr"} == {3}
    assert {t.train_size for t in trials} == {48} and {t.seed for t in trials} == {0, 1}
    # The stored text is the study as run: it parses to the same trials, and says how it came about.
    again = parse_study(study.text)
    assert [t.config_hash for t in again.trials()] == [t.config_hash for t in trials]
    assert study.text.startswith(f"# {study_file}, run with: --set epochs=3 --set train_size=48 --set seeds=[0, 1]")


def test_load_study_with_overrides__none_is_the_file_as_it_is(study_file: Path) -> None:
    study, overrides = load_study_with_overrides(study_file, [])
    assert overrides == [] and study.name == "cli-tiny" and study.text == STUDY


def test_load_study_with_overrides__problems_name_the_argument(study_file: Path) -> None:
    with pytest.raises(SpecError) as error:
        load_study_with_overrides(study_file, ["epochs=-1", "bogus=2", "lr=0.1", "study=.hidden"])
    problems = error.value.problems
    assert problems == [
        "--set lr: the study varies lr (grid.lr); set that entry instead, for example --set grid.lr=[0.1]"
    ]
    with pytest.raises(SpecError) as error:
        load_study_with_overrides(study_file, ["epochs=-1", "bogus=2", "study=.hidden"])
    text = "\n".join(error.value.problems)
    assert "--set epochs: found -1, expected an integer in [0, " in text
    assert "--set bogus: unknown knob" in text
    assert "--set study: found '.hidden'" in text
    assert str(study_file) not in text.replace("run with", "")


def test_load_study_with_overrides__dotted_paths_reach_the_search(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH)
    study, _ = load_study_with_overrides(path, ["search.n_trials=2", "study=s-smoke"])
    assert study.search is not None and study.search.n_trials == 2 and study.name == "s-smoke"
    with pytest.raises(SpecError) as error:
        load_study_with_overrides(path, ["lr=0.01"])
    assert error.value.problems[0].startswith("--set lr: the study varies lr (search.space.lr)")
    with pytest.raises(SpecError) as error:
        load_study_with_overrides(path, ["search.n_trials=0"])
    assert error.value.problems[0].startswith("--set search.n_trials: ")


def test_derived_name__readable_when_it_can_be_unique_always() -> None:
    from harness.overrides import Override

    def o(key: str, text: str) -> Override:
        return Override(key, ("fixed", key), None, text)

    assert derived_name("q", [o("epochs", "1"), o("temperature", "0.1")]) == "q.set.epochs-1.temperature-0.1"
    odd = derived_name("q", [o("data_root", "/data/x")])
    other = derived_name("q", [o("data_root", "/data_x")])
    assert odd.startswith("q.set.data_root-_data_x.") and odd != other
    assert len(derived_name("q", [o("description", "x" * 300)])) <= 100


def test_run__an_overridden_run_is_its_own_study_with_the_overrides_stored(study_file: Path, tmp_path: Path) -> None:
    db_path = tmp_path / "h.db"
    study, _ = load_study_with_overrides(study_file, ["epochs=2"])
    run_study(study, RunOptions(db=str(db_path)), run_trial=fake_trainer, echo=lambda _: None)
    db = Database(db_path)
    rows = db.run(lambda s: [(r.name, r.file_text) for r in s.scalars(select(StudyRow))])
    assert [name for name, _ in rows] == ["cli-tiny.set.epochs-2"]
    assert rows[0][1].startswith(f"# {study_file}, run with: --set epochs=2\n")
    configs = db.run(lambda s: [t.config for t in s.scalars(select(TrialRow))])
    assert {c["epochs"] for c in configs if c["method"] == "simclr"} == {2}
    db.dispose()


def test_cli__run_set_prints_the_study_it_becomes_and_errors_exit_2(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", str(study_file), "--set", "epochs=2", "--set", "knn_k=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "overrides: epochs=2, knn_k=3; running them as study cli-tiny.set.epochs-2.knn_k-3" in out
    assert "study cli-tiny.set.epochs-2.knn_k-3 (grid): 3 configuration(s)" in out
    assert cli.main(["run", str(study_file), "--set", "epochs=two", "--dry-run"]) == 2
    assert "--set epochs: found 'two', expected an integer" in capsys.readouterr().err


def test_derived_name__knobs_outside_the_identity_keep_the_study() -> None:
    from harness.overrides import Override

    def o(key: str, text: str) -> Override:
        return Override(key, ("fixed", key), None, text)

    assert derived_name("q", [o("devices_per_trial", "2"), o("checkpoint_minutes", "1")]) == "q"
    assert derived_name("q", [o("compile_augmentation", "true"), o("epochs", "1")]) == "q.set.epochs-1"
    assert derived_name("q", [o("seed", "3")]) == "q.set.seed-3"
    # The device is outside the identity but not the numbers (bf16 autocast on CUDA): its own study.
    assert derived_name("q", [o("device", "cpu")]) == "q.set.device-cpu"


def test_cli__run_set_of_a_knob_outside_the_identity_resumes_the_same_study(
    study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db_path = tmp_path / "h.db"
    study, _ = load_study_with_overrides(study_file, [])
    run_study(study, RunOptions(db=str(db_path)), run_trial=fake_trainer, echo=lambda _: None)
    db = Database(db_path)
    before = db.run(lambda s: sorted((t.id, t.status, t.config_hash) for t in s.scalars(select(TrialRow))))
    db.dispose()
    assert cli.main(["run", str(study_file), "--db", str(db_path), "--set", "checkpoint_minutes=1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "so this is study cli-tiny itself" in out
    assert "study cli-tiny (grid)" in out
    overridden, _ = load_study_with_overrides(study_file, ["checkpoint_minutes=1", "save_weights=false"])
    assert overridden.name == "cli-tiny"
    run_study(overridden, RunOptions(db=str(db_path)), run_trial=fake_trainer, echo=lambda _: None)
    db = Database(db_path)
    names = db.run(lambda s: [r.name for r in s.scalars(select(StudyRow))])
    after = db.run(lambda s: sorted((t.id, t.status, t.config_hash) for t in s.scalars(select(TrialRow))))
    db.dispose()
    assert names == ["cli-tiny"]
    assert after == before  # nothing rerun, nothing added
