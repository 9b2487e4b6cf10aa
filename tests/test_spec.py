"""Study files: every validation rule, located messages, expansion, and property-based tests that
malformed YAML and malformed values always give a clean SpecError naming the file."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.docs import DOCS, GENERATED, generated_text, knob_table
from harness.spec import (
    DEFAULT_TRIAL_LIMIT,
    DEFAULTS,
    KNOB_NAMES,
    SpecError,
    Study,
    TrialConfig,
    at_least,
    config_hash,
    declared_knobs,
    load_study,
    parse_study,
    resolve,
)


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_study(path)
    problems = caught.value.problems
    assert problems, "a SpecError carries at least one problem"
    for problem in problems:
        assert problem.startswith(str(path)), f"not located in the file: {problem}"
    return problems


def one_problem(tmp_path: Path, text: str, *fragments: str) -> str:
    problems = problems_of(tmp_path, text)
    matching = [p for p in problems if all(f in p for f in fragments)]
    assert matching, f"no problem mentions {fragments}: {problems}"
    return matching[0]


GRID = """\
study: t
dataset: synthetic
fixed:
  epochs: 1
grid:
  method: [simclr, moco]
  temperature: [0.1, 0.2]
seeds: [0, 1]
"""


# ----------------------------------------------------------------------------------------------
# Valid files


def test_load_study__grid_expands_the_cartesian_product(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GRID))
    assert study.name == "t" and study.kind == "grid" and study.dataset == "synthetic"
    trials = study.trials()
    assert len(trials) == 2 * 2 * 2
    assert {(t.method, t.temperature, t.seed) for t in trials} == {
        (m, temp, s) for m in ("simclr", "moco") for temp in (0.1, 0.2) for s in (0, 1)
    }
    assert all(t.epochs == 1 and t.dataset == "synthetic" for t in trials)
    assert study.swept_knobs == ("method", "temperature")


def test_load_study__ablate_varies_one_knob_at_a_time(tmp_path: Path) -> None:
    study = load_study(
        write(
            tmp_path,
            """\
            study: a
            fixed: {method: simclr, temperature: 0.5, batch_size: 128}
            ablate:
              temperature: [0.1, 0.5, 1.0]
              batch_size: [64, 128, 256]
            seeds: [0]
            """,
        )
    )
    configs = {(t.temperature, t.batch_size) for t in study.trials()}
    # the base point once, then each value that differs from it, the other knob at its base
    assert configs == {(0.5, 128), (0.1, 128), (1.0, 128), (0.5, 64), (0.5, 256)}


def test_study_trials__knob_a_method_ignores_does_not_multiply_its_trials(tmp_path: Path) -> None:
    study = load_study(
        write(
            tmp_path,
            """\
            study: n
            grid:
              method: [simclr, byol]
              temperature: [0.1, 0.2, 0.5]
            seeds: [0]
            """,
        )
    )
    trials = study.trials()
    assert sum(t.method == "simclr" for t in trials) == 3
    assert sum(t.method == "byol" for t in trials) == 1
    assert any("temperature" in note and "byol" in note for note in study.notes)


def test_study_trials__order_is_stable_and_hashes_are_unique(tmp_path: Path) -> None:
    path = write(tmp_path, GRID)
    first = [(t.config_hash, t.seed) for t in load_study(path).trials()]
    second = [(t.config_hash, t.seed) for t in load_study(path).trials()]
    assert first == second
    assert len(set(first)) == len(first)


def test_config_hash__excludes_seed_and_device() -> None:
    base = resolve({"method": "simclr", "seed": 0})
    assert base.config_hash == base.replace(seed=5).config_hash
    assert base.config_hash == base.replace(device="cuda:1").config_hash
    assert base.config_hash != base.replace(temperature=0.3).config_hash
    assert config_hash(base.to_dict()) == base.config_hash


def test_resolve__applies_method_defaults_and_resets_unused_knobs() -> None:
    moco = resolve({"method": "moco", "batch_size": 64})
    assert moco.queue_size == 4096 and moco.temperature == 0.2
    byol = resolve({"method": "byol", "temperature": 0.05})
    assert byol.temperature == DEFAULTS.temperature


def test_load_study__search_parses_space_and_enqueue(tmp_path: Path) -> None:
    study = load_study(
        write(
            tmp_path,
            """\
            study: s
            fixed: {method: simclr}
            search:
              n_trials: 12
              sampler: random
              pruner: hyperband
              objective: {metric: linear_top1, direction: maximize}
              space:
                temperature: {low: 0.05, high: 1.0, log: true}
                batch_size: {choices: [64, 128]}
              enqueue:
                - {temperature: 0.5, batch_size: 128}
            seeds: [3, 4]
            """,
        )
    )
    assert study.kind == "search" and study.search is not None
    spec = study.search
    assert (spec.n_trials, spec.sampler, spec.pruner, spec.metric) == (
        12,
        "random",
        "hyperband",
        "linear_top1",
    )
    assert [p.name for p in spec.space] == ["temperature", "batch_size"]
    assert spec.space[0].log and spec.space[1].choices == (64, 128)
    assert dict(spec.enqueue[0]) == {"temperature": 0.5, "batch_size": 128}
    assert study.swept_knobs == ("temperature", "batch_size")


def test_load_study__exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML's default) reads 1e-3 as a string; study files mean a number.
    study = load_study(
        write(
            tmp_path,
            """\
            study: s
            fixed: {method: simclr, weight_decay: 5E-4}
            search:
              n_trials: 4
              space:
                lr: {low: 1e-4, high: 1.5e+1, log: true}
            """,
        )
    )
    assert study.fixed["weight_decay"] == 5e-4
    assert study.search is not None and study.search.space[0].low == 1e-4 and study.search.space[0].high == 15.0
    grid = load_study(write(tmp_path, "study: g\ngrid:\n  lr: [1e-3, 2.5E-2, 3e2]\n", name="g.yaml"))
    assert sorted(trial.lr for trial in grid.trials()) == [1e-3, 2.5e-2, 300.0]


def test_study__text_hash_follows_the_file_text(tmp_path: Path) -> None:
    first = load_study(write(tmp_path, GRID))
    second = load_study(write(tmp_path, GRID + "# a comment\n", name="other.yaml"))
    assert first.text_hash != second.text_hash
    assert isinstance(first, Study) and first.text == GRID


# ----------------------------------------------------------------------------------------------
# Syntax and structure


def test_load_study__yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    problem = one_problem(
        tmp_path, "study: t\ngrid:\n  method: [simclr, moco\nseeds: [0]\n", "YAML syntax error"
    )
    assert "line " in problem


def test_load_study__unreadable_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_study(tmp_path / "missing.yaml")
    assert "missing.yaml" in caught.value.problems[0]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_load_study__top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    one_problem(tmp_path, text, "mapping")


def test_load_study__unknown_top_level_key_suggests(tmp_path: Path) -> None:
    one_problem(tmp_path, GRID.replace("seeds:", "sedes:"), "sedes", "did you mean 'seeds'")


def test_load_study__exactly_one_kind(tmp_path: Path) -> None:
    one_problem(tmp_path, "study: t\nfixed: {epochs: 1}\n", "exactly one of grid:, ablate: or search:")
    one_problem(tmp_path, GRID + "ablate:\n  lr: [0.1]\n", "exactly one of")


@pytest.mark.parametrize("name", ["", "has space", "a/b", "null"])
def test_load_study__study_name_is_checked(tmp_path: Path, name: str) -> None:
    text = GRID.replace("study: t", f"study: {name!r}" if name != "null" else "study: null")
    one_problem(tmp_path, text, ": study:")


def test_load_study__every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """\
        study: t
        fixed:
          temprature: 0.1
          batch_size: 1
        grid:
          method: [simclr, mocoo]
          aug_strength: [0.5, 3.0]
        seeds: [0, x]
        """,
    )
    text = "\n".join(problems)
    for fragment in (
        "fixed.temprature",
        "fixed.batch_size",
        "grid.method[1]",
        "grid.aug_strength[1]",
        "seeds[1]",
    ):
        assert fragment in text
    assert len(problems) >= 5


# ----------------------------------------------------------------------------------------------
# Values: one rule each, located by key path, with what was found and what was expected


def test_load_study__unknown_knob_suggests(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, GRID.replace("epochs: 1", "temprature: 0.1"), "fixed.temprature")
    assert "did you mean 'temperature'" in problem


def test_load_study__unknown_swept_knob_suggests(tmp_path: Path) -> None:
    one_problem(
        tmp_path,
        GRID.replace("  temperature:", "  temperatur:"),
        "grid.temperatur",
        "did you mean 'temperature'",
    )


def test_load_study__temperature_must_be_positive(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, GRID.replace("[0.1, 0.2]", "[0.1, -0.2]"), "grid.temperature[1]")
    assert "found -0.2" in problem and "expected a number > 0" in problem


def test_load_study__batch_size_at_least_two(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, GRID.replace("epochs: 1", "batch_size: 1"), "fixed.batch_size")
    assert "found 1" in problem and ">= 2" in problem


def test_load_study__wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, GRID.replace("epochs: 1", "epochs: ten"), "fixed.epochs")
    assert "found 'ten'" in problem and "integer" in problem


def test_load_study__queue_size_at_least_batch_size_for_moco(tmp_path: Path) -> None:
    text = """\
    study: q
    fixed: {method: moco, batch_size: 256}
    grid:
      queue_size: [128, 4096]
    seeds: [0]
    """
    problem = one_problem(tmp_path, text, "queue_size")
    assert "128" in problem and "queue_size >= batch_size" in problem


@pytest.mark.parametrize("value", [-0.1, 2.5])
def test_load_study__aug_strength_in_0_2(tmp_path: Path, value: float) -> None:
    problem = one_problem(tmp_path, GRID.replace("epochs: 1", f"aug_strength: {value}"), "fixed.aug_strength")
    assert "[0, 2]" in problem


@pytest.mark.parametrize(
    ("knob", "value", "suggestion"),
    [
        ("method", "simclrr", "simclr"),
        ("backbone", "resnet19", "resnet18"),
        ("dataset", "fashion_mnist", "fashion-mnist"),
    ],
)
def test_load_study__names_are_known_with_suggestions(
    tmp_path: Path, knob: str, value: str, suggestion: str
) -> None:
    problem = one_problem(tmp_path, GRID.replace("epochs: 1", f"{knob}: {value}"), f"fixed.{knob}")
    assert f"did you mean {suggestion!r}" in problem


@pytest.mark.parametrize("value", ["timm:", "timm:vit_small_patch16_224.augreg_in21k", "timm:res net", "timm:a/b"])
def test_load_study__timm_backbone_form_is_checked(tmp_path: Path, value: str) -> None:
    problem = one_problem(tmp_path, GRID.replace("epochs: 1", f"backbone: '{value}'"), "fixed.backbone")
    assert "timm:NAME" in problem and "vit_small" in problem


def test_load_study__timm_backbone_validates_without_importing_timm_or_torch(tmp_path: Path) -> None:
    """Whether timm is installed and knows the name is the trial's business (a failed trial with
    the reason); validation only checks the form, torch-free."""
    study = tmp_path / "study.yaml"
    study.write_text(GRID.replace("epochs: 1", "backbone: timm:resnet18"))
    code = (
        "import sys; from harness.spec import load_study; "
        f"spec = load_study({str(study)!r}); "
        "assert {t.backbone for t in spec.trials()} == {'timm:resnet18'}; "
        "sys.exit(1 if {'torch', 'timm'} & set(sys.modules) else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_load_study__top_level_dataset_is_checked(tmp_path: Path) -> None:
    one_problem(tmp_path, GRID.replace("dataset: synthetic", "dataset: imagenet"), "dataset", "imagenet")


def test_load_study__dataset_contradiction(tmp_path: Path) -> None:
    one_problem(tmp_path, GRID.replace("epochs: 1", "dataset: mnist"), "fixed.dataset", "contradicts")


@pytest.mark.parametrize("lists", ["[]", "0.1", "{a: 1}"])
def test_load_study__swept_values_are_non_empty_lists(tmp_path: Path, lists: str) -> None:
    one_problem(tmp_path, GRID.replace("[0.1, 0.2]", lists), "grid.temperature", "non-empty list")


def test_load_study__empty_grid(tmp_path: Path) -> None:
    one_problem(tmp_path, "study: t\ngrid: {}\n", "grid", "at least one knob")


def test_load_study__duplicate_swept_values(tmp_path: Path) -> None:
    one_problem(tmp_path, GRID.replace("[0.1, 0.2]", "[0.1, 0.1]"), "grid.temperature[1]", "twice")


@pytest.mark.parametrize(
    ("seeds", "where"),
    [
        ("[0, 1.5]", "seeds[1]"),
        ("[x]", "seeds[0]"),
        ("[-1]", "seeds[0]"),
        ("[]", "seeds"),
        ("3", "seeds"),
        ("[1, 1]", "seeds[1]"),
        ("[true]", "seeds[0]"),
    ],
)
def test_load_study__seeds_are_distinct_non_negative_integers(tmp_path: Path, seeds: str, where: str) -> None:
    one_problem(tmp_path, GRID.replace("seeds: [0, 1]", f"seeds: {seeds}"), f": {where}:")


def test_load_study__seed_is_not_a_swept_knob(tmp_path: Path) -> None:
    one_problem(tmp_path, GRID.replace("  temperature: [0.1, 0.2]", "  seed: [0, 1]"), "grid.seed")


def test_load_study__non_finite_number(tmp_path: Path) -> None:
    one_problem(tmp_path, GRID.replace("[0.1, 0.2]", "[0.1, .inf]"), "grid.temperature[1]", "finite")


def test_load_study__device_names(tmp_path: Path) -> None:
    load_study(write(tmp_path, GRID.replace("epochs: 1", "device: cuda:1")))
    one_problem(tmp_path, GRID.replace("epochs: 1", "device: gpu"), "fixed.device")


# ----------------------------------------------------------------------------------------------
# Cross-checks between knobs and methods


def test_load_study__fixed_knob_unused_by_the_method_is_an_error(tmp_path: Path) -> None:
    text = """\
    study: u
    fixed: {method: simclr, queue_size: 4096}
    grid:
      temperature: [0.1, 0.2]
    seeds: [0]
    """
    one_problem(tmp_path, text, "fixed.queue_size", "not used by simclr")


def test_load_study__swept_knob_no_method_uses_is_an_error(tmp_path: Path) -> None:
    text = """\
    study: u
    grid:
      method: [simclr, byol]
      barlow_lambda: [0.001, 0.01]
    seeds: [0]
    """
    one_problem(tmp_path, text, "grid.barlow_lambda", "not used")


def test_load_study__swept_knob_for_some_methods_is_a_note(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, GRID.replace("[simclr, moco]", "[simclr, byol]")))
    assert len(study.notes) == 1
    assert "grid.temperature" in study.notes[0] and "byol" in study.notes[0]


def test_load_study__batch_size_larger_than_train_size(tmp_path: Path) -> None:
    one_problem(
        tmp_path,
        GRID.replace("epochs: 1", "{train_size: 64, batch_size: 128}").replace("fixed:\n  ", "fixed: "),
        "batch_size",
    )


def test_load_study__searched_batch_size_on_a_small_subset(tmp_path: Path) -> None:
    # The default batch size (256) must not fail a search whose every batch size fits the subset.
    text = "study: s\ndataset: synthetic\nfixed: {train_size: 200}\nsearch:\n  n_trials: 2\n  space:\n"
    study = load_study(write(tmp_path, text + "    batch_size: {choices: [16, 32]}\n"))
    assert study.base_config().batch_size in (16, 32)
    problem = one_problem(
        tmp_path, text + "    batch_size: {choices: [512, 1024]}\n", "search.space", "no corner", "found 512"
    )
    assert "expected batch_size <= train_size" in problem


def test_load_study__a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    # YAML keeps the last one: a second study: line would write into another study.
    problem = one_problem(tmp_path, "study: a\ndescription: x\nstudy: b\ngrid:\n  lr: [0.1]\n", "'study' appears twice")
    assert "line 3" in problem and "first on line 1" in problem
    one_problem(tmp_path, "study: a\nfixed:\n  lr: 0.1\n  lr: 0.2\ngrid:\n  epochs: [1]\n", "'lr' appears twice")


def test_load_study__seed_in_fixed_points_to_seeds(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, "study: a\nfixed: {seed: 3}\ngrid:\n  lr: [0.1]\n", "fixed.seed")
    assert "seeds: [3]" in problem


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b"])
def test_load_study__a_name_that_is_not_a_plain_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    one_problem(tmp_path, f"study: '{name}'\ngrid:\n  lr: [0.1]\n", "study", "it names a folder")


def test_load_study__ablated_knob_the_base_method_ignores_is_refused(tmp_path: Path) -> None:
    # The queue_size points run with the base method (simclr), not with the method: entry's moco.
    text = "study: a\ndataset: synthetic\nfixed: {batch_size: 32}\nablate:\n  method: [moco]\n  queue_size: [64, 128]\n"
    problem = one_problem(tmp_path, text, "ablate.queue_size", "is not used by simclr")
    assert "method: moco in fixed:" in problem
    study = load_study(write(tmp_path, text.replace("fixed: {batch_size: 32}", "fixed: {batch_size: 32, method: moco}")
                             .replace("  method: [moco]\n", ""), name="ok.yaml"))
    assert sorted(t.queue_size for t in study.trials()) == [64, 128, 4096]


def test_load_study__a_knob_in_both_fixed_and_grid_is_refused(tmp_path: Path) -> None:
    one_problem(tmp_path, "study: a\nfixed: {lr: 0.1}\ngrid:\n  lr: [0.2, 0.3]\n", "grid.lr", "also in fixed:")


def test_load_study__an_unused_knob_is_reported_beside_other_problems(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "study: m\nfixed: {barlow_lambda: 0.1, lr: -1}\ngrid:\n  temperature: [0.1]\n")
    assert any("fixed.lr" in p for p in problems) and any("fixed.barlow_lambda: is not used" in p for p in problems)


def test_load_study__a_refused_space_entry_is_not_blamed_again_in_enqueue(tmp_path: Path) -> None:
    text = (
        "study: s\nsearch:\n  n_trials: 2\n  space:\n    temperature: {low: -1, high: 1}\n"
        "  enqueue:\n    - {temperature: 0.5}\n"
    )
    problems = problems_of(tmp_path, text)
    assert any("search.space.temperature" in p for p in problems)
    assert not any("enqueue" in p for p in problems), problems


def test_load_study__legal_but_surprising_values_are_notes(tmp_path: Path) -> None:
    text = "study: n\ndataset: synthetic\nfixed: {train_size: 200, batch_size: 32, knn_k: 500, warmup_epochs: 5, epochs: 1}\n"
    study = load_study(write(tmp_path, text + "grid:\n  lr: [0.1, 0.2]\n"))
    assert len(study.notes) == 2  # once each, not once per point
    assert "knn_k 500 is more than train_size 200" in study.notes[0]
    assert "warmup_epochs 5 is more than epochs 1" in study.notes[1]


def test_load_study__test_size_of_one_is_refused_before_any_training(tmp_path: Path) -> None:
    # Uniformity averages over pairs of test images; one image would fail after the whole training.
    problem = one_problem(
        tmp_path, GRID.replace("epochs: 1", "{test_size: 1}").replace("fixed:\n  ", "fixed: "), "test_size"
    )
    assert "found 1" in problem and ">= 2" in problem


# ----------------------------------------------------------------------------------------------
# Searches

SEARCH = """\
study: s
fixed: {method: simclr}
search:
  n_trials: 8
  space:
    temperature: {low: 0.05, high: 1.0, log: true}
    lr: {low: 0.0001, high: 0.01}
seeds: [0]
"""


def test_load_study__search_bounds_low_below_high(tmp_path: Path) -> None:
    problem = one_problem(
        tmp_path, SEARCH.replace("{low: 0.05, high: 1.0", "{low: 1.0, high: 0.05"), "search.space.temperature"
    )
    assert "low < high" in problem


def test_load_study__search_log_needs_positive_low(tmp_path: Path) -> None:
    text = SEARCH.replace("lr: {low: 0.0001, high: 0.01}", "weight_decay: {low: 0, high: 0.01, log: true}")
    one_problem(tmp_path, text, "search.space.weight_decay")


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("n_trials: 8", "n_trials: 0", "search.n_trials"),
        ("n_trials: 8", "n_trials: 8\n  sampler: tpee", "search.sampler"),
        ("n_trials: 8", "n_trials: 8\n  pruner: medain", "search.pruner"),
        ("n_trials: 8", "n_trials: 8\n  objective: {metric: knn_top5}", "search.objective.metric"),
        ("n_trials: 8", "n_trials: 8\n  objective: {direction: up}", "search.objective.direction"),
        ("n_trials: 8", "n_trials: 8\n  trails: 3", "search.trails"),
        ("temperature: {low", "temprature: {low", "search.space.temprature"),
        ("lr: {low: 0.0001, high: 0.01}", "lr: {choices: []}", "search.space.lr.choices"),
        ("lr: {low: 0.0001, high: 0.01}", "lr: {low: 0.0001, hgh: 0.01}", "search.space.lr"),
        ("lr: {low: 0.0001, high: 0.01}", "optimizer: {low: 1, high: 2}", "search.space.optimizer"),
    ],
)
def test_load_study__search_keys_are_checked(tmp_path: Path, old: str, new: str, where: str) -> None:
    one_problem(tmp_path, SEARCH.replace(old, new), where)


def test_load_study__search_unknown_sampler_suggests(tmp_path: Path) -> None:
    one_problem(
        tmp_path, SEARCH.replace("n_trials: 8", "n_trials: 8\n  sampler: randm"), "did you mean 'random'"
    )


def test_load_study__knob_both_fixed_and_searched(tmp_path: Path) -> None:
    one_problem(
        tmp_path,
        SEARCH.replace("{method: simclr}", "{method: simclr, lr: 0.001}"),
        "search.space.lr",
        "fixed",
    )


def test_load_study__enqueue_must_name_searched_knobs(tmp_path: Path) -> None:
    text = SEARCH.replace("seeds: [0]", "  enqueue:\n    - {batch_size: 64}\nseeds: [0]")
    one_problem(tmp_path, text, "search.enqueue[0].batch_size", "not in search.space")


def test_load_study__enqueue_values_are_checked(tmp_path: Path) -> None:
    text = SEARCH.replace("seeds: [0]", "  enqueue:\n    - {temperature: -1}\nseeds: [0]")
    one_problem(tmp_path, text, "search.enqueue[0].temperature", "> 0")


def test_load_study__cmaes_rejects_categorical_dimensions(tmp_path: Path) -> None:
    text = SEARCH.replace("n_trials: 8", "n_trials: 8\n  sampler: cmaes").replace(
        "lr: {low: 0.0001, high: 0.01}", "batch_size: {choices: [64, 128]}"
    )
    one_problem(tmp_path, text, "search.sampler", "cmaes")


def test_load_study__grid_sampler_needs_discrete_dimensions(tmp_path: Path) -> None:
    one_problem(
        tmp_path, SEARCH.replace("n_trials: 8", "n_trials: 8\n  sampler: grid"), "search.sampler", "grid"
    )


def test_load_study__search_knob_unused_by_the_method(tmp_path: Path) -> None:
    one_problem(
        tmp_path,
        SEARCH.replace("lr: {low", "queue_size: {choices: [1024]}\n    lr: {low"),
        "search.space.queue_size",
    )


# ----------------------------------------------------------------------------------------------
# The built-in study files


def test_builtin_studies__all_valid() -> None:
    files = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {
        "quickstart",
        "method-comparison",
        "temperature",
        "batch-size",
        "queue-size",
        "aug-strength",
        "search-simclr",
    } <= names
    for file in files:
        study = load_study(file)
        assert study.name == file.stem, f"{file.name}: the study name should be the file's name"
        assert study.description, f"{file.name} has no description"
        assert study.text.lstrip().startswith("#"), f"{file.name} has no comment header"


def test_spec__does_not_import_torch() -> None:
    code = "import sys, harness.spec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------------------------
# Property-based: malformed input always gives a clean, located SpecError


def _assert_clean(text: str, source: str = "fuzz.yaml") -> None:
    try:
        study = parse_study(text, source=source)
    except SpecError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.startswith(source), problem
        return
    # Whatever validates must expand without surprises.
    if study.search is None:
        assert all(isinstance(t, TrialConfig) for t in study.trials())
    else:
        study.base_config()


_YAML_PIECES = st.sampled_from(
    [
        *"abc:-[]{}'\"!&*#|>%@` \n\t0123456789.,?",
        "study: x\n",
        "grid:\n",
        "  method: [simclr]\n",
        "seeds: [0]\n",
        "!!python/object:os.system ",
        "&a ",
        "*a",
        "\x00",
        "\ufeff",
        "é",
        "search:\n",
        "  space:\n",
        "fixed: {",
        "  - ",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_YAML_PIECES, max_size=40).map("".join))
def test_parse_study__malformed_yaml_gives_a_located_spec_error(text: str) -> None:
    _assert_clean(text)


_BASES: tuple[dict[str, Any], ...] = (
    {
        "study": "g",
        "dataset": "synthetic",
        "fixed": {"method": "moco", "batch_size": 32, "queue_size": 64, "epochs": 2},
        "grid": {"temperature": [0.1, 0.2], "lr": [0.001]},
        "seeds": [0, 1],
    },
    {
        "study": "a",
        "fixed": {"backbone": "small_cnn"},
        "ablate": {"method": ["simclr", "byol"], "aug_strength": [0.5, 1.5], "batch_size": [64, 128]},
        "seeds": [0],
    },
    {
        "study": "s",
        "fixed": {"method": "simclr", "epochs": 3},
        "search": {
            "n_trials": 5,
            "sampler": "tpe",
            "pruner": "median",
            "objective": {"metric": "knn_top1", "direction": "maximize"},
            "space": {
                "temperature": {"low": 0.05, "high": 1.0, "log": True},
                "batch_size": {"choices": [32, 64]},
                "lr": {"low": 0.0001, "high": 0.01, "step": 0.0001},
            },
            "enqueue": [{"temperature": 0.5, "batch_size": 64}],
        },
        "seeds": [0],
    },
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(
        [
            "simclr",
            "moco",
            "random_init",
            "swav",
            "tpe",
            "grid",
            "cmaes",
            "hyperband",
            "knn_top1",
            "cuda:x",
            "1e-3",
        ]
    ),
    st.sampled_from([0, 1, 2, -1, 0.0, 1.5, 2.5, 1e9, float("inf")]),
)
_KEYS = st.one_of(
    st.sampled_from(
        [
            *KNOB_NAMES,
            "study",
            "grid",
            "ablate",
            "search",
            "fixed",
            "seeds",
            "dataset",
            "space",
            "low",
            "high",
            "log",
            "step",
            "choices",
        ]
    ),
    st.text(max_size=6),
    st.integers(),
    st.booleans(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=10,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_paths(value, (*prefix, index)))
    return found


@st.composite
def _mutated_studies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid study with one to three values replaced, removed or added anywhere in it."""
    doc = copy.deepcopy(draw(st.sampled_from(_BASES)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)[1:]))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(_KEYS)] = draw(_VALUES)
        elif isinstance(parent[path[-1]], list):
            parent[path[-1]].append(draw(_VALUES))
        if not _paths(doc)[1:]:
            break
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_mutated_studies())
def test_parse_study__malformed_values_give_located_spec_errors(doc: dict[str, Any]) -> None:
    _assert_clean(yaml.safe_dump(doc, allow_unicode=True))


def test_parse_study__deeply_nested_yaml_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"deep\.yaml: the YAML nests too deeply"):
        parse_study("[" * 5000 + "]" * 5000, source="deep.yaml")


# ----------------------------------------------------------------------------------------------
# The documentation lists every knob with its current defaults


@pytest.mark.parametrize("name", list(GENERATED), ids=list(GENERATED))
def test_docs__generated_tables_match_the_declarations(name: str) -> None:
    file_name, make = GENERATED[name]
    text = (DOCS / file_name).read_text(encoding="utf-8")
    assert generated_text(text, name) == make(), (
        f"docs/{file_name}'s {name} table differs from the declarations: run `python -m harness.docs`"
    )


def test_docs__knob_table_lists_every_knob_with_its_defaults() -> None:
    rows = {line.split("|")[1].strip().strip("`"): line for line in knob_table().splitlines()[2:]}
    assert list(rows) == list(KNOB_NAMES)
    assert "| moco 0.2, mocov3 1.0, swav 0.1, nnclr 0.1, supcon 0.1 |" in rows["temperature"]
    assert "moco: queue_size >= batch_size" in rows["queue_size"]
    assert "not part of the configuration's identity" in rows["seed"]


def test_parse_study__log_scale_with_a_step_is_a_located_error() -> None:
    text = (
        "study: s\nsearch:\n  n_trials: 2\n  space:\n    lr: {low: 0.001, high: 0.1, log: true, step: 0.01}\n"
    )
    with pytest.raises(SpecError, match=r"s.yaml: search.space.lr: found log: true and step: 0.01"):
        parse_study(text, source="s.yaml")



# ----------------------------------------------------------------------------------------------
# Configuration identity: stable across releases

# The configuration hashes the first release (wave 1) gave each method's default configuration.
# A change here makes every stored trial of that method "gone" and reruns it: it must be an
# explicit, documented event (docs/DECISIONS.md), never a side effect.
WAVE1_HASHES: dict[str, str] = {
    "simclr": "96ed3ab48660a363dfbbada21047d5e4ac0c2f28663cf86e172346d0edfb30ac",
    "moco": "c8b4623218e3ec3017c56b087f3d1204dce34582044100438199c02dc3d1b060",
    "byol": "1ebf6663e82177a0b6d30ff08405074bad1293058657de4d548ecfc7a16099a2",
    "dino": "997cf6bfdca69d084215e008abbc80ca6f39c146a23b4f67e72160bdb80d9153",
    "random_init": "ba018d8009281b86702714cb5e31b381d923d915f37018b217a6e255f6f6d7dd",
    "supervised": "041922f0a6fb6d8add0060722a887fbc2320bc11db263c862c6804eb2012d8ea",
    "swav": "e3a2a680e26b35bd247b8aa41c7850004ab01ba27e916fa6048b94a53276d431",
}


# Defaults changed since, as documented events: the knobs that give back the first release's
# configuration, whose stored trials keep their hash. DINO: the head's batch norm (issue 18,
# docs/DECISIONS.md "Findings").
CHANGED_DEFAULTS: dict[str, dict[str, Any]] = {"dino": {"dino_head_bn": False}}


@pytest.mark.parametrize("method", list(WAVE1_HASHES), ids=list(WAVE1_HASHES))
def test_config_hash__default_configurations_keep_their_first_release_identity(method: str) -> None:
    first_release = {"method": method, **CHANGED_DEFAULTS.get(method, {})}
    assert resolve(first_release).config_hash == WAVE1_HASHES[method]
    # A changed default is a new identity (its old trials are not silently reused for it).
    if method in CHANGED_DEFAULTS:
        assert resolve({"method": method}).config_hash != WAVE1_HASHES[method]


def _with_extra_knob(legacy: Any) -> type:
    from harness.spec import knob

    @dataclasses.dataclass(frozen=True)
    class WithExtraKnob(TrialConfig):
        # A knob added in a later release; 7 reproduces the behaviour from before it existed.
        extra_iterations: int = knob(7, "a knob added later", group="training", check=at_least(1), legacy=legacy)

    return WithExtraKnob


def test_config_hash__a_new_knob_at_its_legacy_value_keeps_every_stored_identity() -> None:
    extended = _with_extra_knob(legacy=7)
    knobs = declared_knobs(extended)
    studies = sorted((Path(__file__).resolve().parent.parent / "studies").rglob("*.yaml"))
    checked = 0
    for path in studies:
        study = load_study(path)
        if study.search is not None:
            continue
        for config in study.trials():
            grown = extended(**config.to_dict())
            assert config_hash(grown.to_dict(), knobs) == config.config_hash, f"{path}: {config}"
            changed = extended(**{**config.to_dict(), "extra_iterations": 8})
            assert config_hash(changed.to_dict(), knobs) != config.config_hash
            checked += 1
    assert checked > 50


def test_config_hash__a_new_knob_without_legacy_value_would_change_identities() -> None:
    """The counterpart: declared as part of the identity from the start (no ``legacy``), the same
    knob changes every hash, which is why knobs added after the first release declare one."""
    from harness.spec import IN_IDENTITY

    extended = _with_extra_knob(legacy=IN_IDENTITY)
    config = resolve({"method": "simclr"})
    grown = extended(**config.to_dict())
    assert config_hash(grown.to_dict(), declared_knobs(extended)) != config.config_hash


def test_config_hash__stored_configuration_of_a_newer_version_keeps_unknown_keys() -> None:
    stored = {**DEFAULTS.to_dict(), "knob_of_a_newer_release": 3}
    assert config_hash(stored) != DEFAULTS.config_hash


def test_declarations__every_later_knob_declares_a_legacy_value_of_its_own_type() -> None:
    from harness.spec import IN_IDENTITY, KNOBS

    for declared in KNOBS.values():
        if declared.legacy is not IN_IDENTITY and declared.legacy is not None:
            assert isinstance(declared.legacy, declared.base_type), declared.name


# ----------------------------------------------------------------------------------------------
# Hostile files: bounded expansion, encodings, long names, out-of-range values


def test_parse_study__million_point_grid_is_refused_before_expanding() -> None:
    knobs = ["temperature", "lr", "weight_decay", "warmup_epochs", "aug_strength", "knn_t"]
    grid = "\n".join(f"  {k}: [{', '.join(str(0.1 + i / 100) for i in range(10))}]" for k in knobs)
    text = f"study: bomb\nfixed: {{method: simclr}}\ngrid:\n{grid}\nseeds: [0, 1]\n"
    with pytest.raises(SpecError) as error:
        parse_study(text, source="bomb.yaml", max_trials=10_000)
    message = str(error.value)
    assert "bomb.yaml: grid: expands to 2,000,000 trials (10 grid.temperature x 10 grid.lr" in message
    assert "more than the limit of 10,000" in message and "--trial-limit" in message


def test_parse_study__trial_limit_counts_seeds_and_ablations() -> None:
    seeds = ", ".join(str(i) for i in range(200))
    ablate = "study: a\nfixed: {method: simclr}\nablate:\n  temperature: [0.1, 0.2, 0.3]\n  lr: [0.01, 0.1]\n"
    parse_study(ablate + f"seeds: [{seeds}]\n", max_trials=1200)  # (1 + 3 + 2) x 200 = 1200
    with pytest.raises(SpecError, match=r"ablate: expands to 1,200 trials \(1 \+ 3 ablate.temperature \+ 2 ablate.lr"):
        parse_study(ablate + f"seeds: [{seeds}]\n", max_trials=1199)
    many_seeds = ", ".join(str(i) for i in range(100_000))
    with pytest.raises(SpecError, match="expands to 100,000 trials"):
        parse_study(f"study: s\ngrid: {{method: [simclr]}}\nseeds: [{many_seeds}]\n", max_trials=10_000)


def test_parse_study__search_n_trials_above_the_limit_is_refused() -> None:
    text = "study: s\nsearch:\n  n_trials: 20000\n  space:\n    lr: {low: 0.001, high: 0.1, log: true}\n"
    with pytest.raises(SpecError, match=r"search.n_trials: found 20000, more than the limit of 10000 trials"):
        parse_study(text, max_trials=10_000)
    assert parse_study(text).search is not None  # no limit: a study already stored is read back


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xfes\x00t\x00", "the file is UTF-16 (it starts with a byte-order mark); expected UTF-8 text"),
        (b"study: caf\xe9\n", "line 1: byte 0xe9 is not UTF-8 (is the file Latin-1 or binary?)"),
        (b"study: s\ngrid: {method: [simclr]}\n\x80\x81\x82", "line 3: byte 0x80 is not UTF-8"),
    ],
    ids=["utf16-bom", "latin1", "random-bytes"],
)
def test_load_study__text_that_is_not_utf8_is_one_located_line(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError) as error:
        load_study(path)
    [problem] = error.value.problems
    assert problem.startswith(f"{path}: {expected}")


def test_load_study__utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xef\xbb\xbfstudy: s\ngrid: {method: [simclr]}\n")
    assert load_study(path).name == "s"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("fixed: {epochs: 1e26}", "fixed.epochs: found 1e+26, expected an integer in [0, 100000]"),
        ("fixed: {device: 'cuda:abc'}", "expected one of auto, cpu, cuda or cuda:N (N >= 0)"),
        ("fixed: {device: 'cuda:-1'}", "expected one of auto, cpu, cuda or cuda:N (N >= 0)"),
        ("fixed: {train_size: 70000}", "train_size: found 70000, expected at most 60000 (the fashion-mnist split's size)"),
        ("fixed: {test_size: 20000}", "test_size: found 20000, expected at most 10000"),
        ("seeds: [18446744073709551616]", "seeds[0]: found 18446744073709551616, expected an integer in [0, 4294967295]"),
        ("study2: x\nseeds: []", "seeds: found an empty list, expected a non-empty list of integers"),
    ],
)
def test_parse_study__hostile_values_are_located_errors(line: str, expected: str) -> None:
    text = f"study: s\ndataset: fashion-mnist\ngrid: {{method: [simclr]}}\n{line}\n"
    with pytest.raises(SpecError) as error:
        parse_study(text, source="s.yaml")
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_parse_study__train_size_of_a_dataset_in_a_user_folder_is_not_bounded() -> None:
    text = "study: s\ndataset: cifar10\nfixed: {data_root: /data/bigger, train_size: 80000}\ngrid: {method: [simclr]}\n"
    assert parse_study(text).fixed["train_size"] == 80000


def test_parse_study__study_name_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(SpecError, match=r"s.yaml: study: found a name of 101 characters, expected at most 100"):
        parse_study(f"study: {'x' * 101}\ngrid: {{method: [simclr]}}\n", source="s.yaml")
    assert parse_study(f"study: {'x' * 100}\ngrid: {{method: [simclr]}}\n").name == "x" * 100


def test_parse_study__enqueued_point_outside_the_space_is_refused() -> None:
    text = (
        "study: s\nsearch:\n  n_trials: 3\n  space:\n    lr: {low: 0.001, high: 0.1, log: true}\n"
        "    batch_size: {choices: [64, 128]}\n  enqueue:\n    - {lr: 0.5, batch_size: 256}\n"
    )
    with pytest.raises(SpecError) as error:
        parse_study(text, source="s.yaml")
    assert error.value.problems == [
        "s.yaml: search.enqueue[0].lr: found 0.5, expected a value in the search.space range [0.001, 0.1]",
        "s.yaml: search.enqueue[0].batch_size: found 256, expected one of the search.space choices [64, 128]",
    ]


def _hostile_file(kind: str, size: int) -> bytes:
    """One hostile study file of a family: encodings, huge lists, bombs, long names."""
    if kind == "utf16":
        return "study: s\ngrid: {method: [simclr]}\n".encode("utf-16")
    if kind == "latin1":
        return f"study: caf{'é' * (size + 1)}\ngrid: {{method: [simclr]}}\n".encode("latin-1")
    if kind == "random-bytes":
        return bytes((i * 131 + size) % 256 for i in range(64 + size))
    if kind == "huge-grid":
        # 3 knobs x 22+ values x 3 seeds >= 31,944 trials: over the 10,000 limit for every size (a
        # smaller grid would be a valid study and really run).
        values = ", ".join(str(0.001 * (i + 1)) for i in range(size + 22))
        return f"study: s\ngrid:\n  lr: [{values}]\n  temperature: [{values}]\n  weight_decay: [{values}]\nseeds: [0, 1, 2]\n".encode()
    if kind == "huge-seeds":
        return f"study: s\ngrid: {{method: [simclr]}}\nseeds: [{', '.join(map(str, range(20_000 + size)))}]\n".encode()
    if kind == "alias-bomb":
        lines = ["study: s", "a0: &a0 [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]"]
        lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 8 + size % 4)]
        lines += ["grid: {temperature: *a0, lr: *a0, weight_decay: *a0, knn_t: *a0, aug_strength: *a0}"]
        return "\n".join(lines).encode()
    if kind == "long-name":
        return f"study: {'n' * (101 + size)}\ngrid: {{method: [simclr]}}\n".encode()
    if kind == "huge-search":
        return f"study: s\nsearch:\n  n_trials: {10_001 + size}\n  space:\n    lr: {{low: 0.001, high: 0.1}}\n".encode()
    raise ValueError(kind)


HOSTILE_KINDS = ("utf16", "latin1", "random-bytes", "huge-grid", "huge-seeds", "alias-bomb", "long-name", "huge-search")


@pytest.mark.slow
@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(HOSTILE_KINDS), size=st.integers(min_value=0, max_value=40))
def test_cli_run__hostile_files_exit_2_with_located_lines_and_touch_nothing(
    tmp_path_factory: pytest.TempPathFactory, kind: str, size: int
) -> None:
    import contextlib
    import io

    from harness.cli import main

    folder = tmp_path_factory.mktemp("hostile")
    study = folder / "hostile.yaml"
    study.write_bytes(_hostile_file(kind, size))
    database = folder / "existing.db"
    database.write_bytes(b"")  # stands for a database the file must not touch
    before = sorted(p.name for p in folder.iterdir())
    # A file the parser accepted would really train below: fail at once instead.
    with pytest.raises(SpecError):
        load_study(study, max_trials=DEFAULT_TRIAL_LIMIT)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(study), "--db", str(folder / "new.db")])
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert code == 2, stderr.getvalue()
    problems = [line for line in lines if line.startswith("  - ")]
    assert problems and all(line.startswith(f"  - {study}: ") for line in problems), stderr.getvalue()
    assert "Traceback" not in stderr.getvalue()
    assert sorted(p.name for p in folder.iterdir()) == before, "a refused file must create nothing"
    assert database.read_bytes() == b""


def test_parse_study__ablation_value_equal_to_the_global_default_but_not_the_methods_is_a_point() -> None:
    # MoCo's own temperature is 0.2; the global default 0.5 is an alternative, 0.2 the base point.
    study = parse_study("study: a\nfixed: {method: moco}\nablate:\n  temperature: [0.2, 0.5]\n")
    assert [dict(p) for p in study.points] == [{}, {"temperature": 0.5}]
    assert sorted(c.temperature for c in study.trials()) == [0.2, 0.5]
