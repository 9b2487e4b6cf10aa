"""Multi-objective searches (study file side) and the study file's tracking: section."""

from __future__ import annotations

import pytest

from harness.spec import SpecError, parse_study

BASE = """\
study: mo
dataset: synthetic
fixed: {train_size: 64, test_size: 32, batch_size: 32, epochs: 1}
search:
  n_trials: 4
  sampler: SAMPLER
  objective: OBJECTIVE
  space:
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
seeds: [3]
"""
TWO = "[{metric: knn_top1, direction: maximize}, {metric: train_img_per_s, direction: maximize}]"


def _study(sampler: str = "nsga2", objective: str = TWO, extra: str = ""):
    return parse_study(BASE.replace("SAMPLER", sampler).replace("OBJECTIVE", objective) + extra, source="mo.yaml")


def _problems(*args: str) -> list[str]:
    with pytest.raises(SpecError) as error:
        _study(*args)
    return error.value.problems


def test_parse_study__a_list_of_objectives_is_a_multi_objective_search() -> None:
    search = _study().search
    assert search is not None and search.multi_objective
    assert search.all_objectives == (("knn_top1", "maximize"), ("train_img_per_s", "maximize"))
    assert (search.metric, search.direction) == ("knn_top1", "maximize")  # the first one
    assert search.pruner == "none"  # Optuna does not prune multi-objective studies


def test_parse_study__one_objective_is_unchanged() -> None:
    search = _study("tpe", "{metric: final_loss, direction: minimize}").search
    assert search is not None and not search.multi_objective
    assert search.all_objectives == (("final_loss", "minimize"),) and search.objectives == ()
    assert _study("tpe", "[{metric: final_loss, direction: minimize}]").search.all_objectives == (
        ("final_loss", "minimize"),
    )


def test_parse_study__multi_objective_problems_are_located() -> None:
    assert _problems("cmaes") == [
        "mo.yaml: search.sampler: found 'cmaes' with several objectives, expected one of tpe, random, grid, nsga2"
    ]
    assert _problems("nsga2", "[{metric: knn_top1}, {metric: knn_top1, direction: up}]") == [
        "mo.yaml: search.objective[1].metric: found 'knn_top1' twice, expected distinct objectives",
        "mo.yaml: search.objective[1].direction: found 'up', expected maximize or minimize",
    ]
    assert _problems("nsga2", "[]")[0].startswith("mo.yaml: search.objective: found an empty list")
    pruned = BASE.replace("SAMPLER", "tpe").replace("OBJECTIVE", TWO).replace("n_trials: 4", "n_trials: 4\n  pruner: median")
    with pytest.raises(SpecError) as error:
        parse_study(pruned, source="mo.yaml")
    assert error.value.problems == [
        "mo.yaml: search.pruner: found 'median', expected none with several objectives "
        "(Optuna prunes single-objective searches only)"
    ]


def test_parse_study__tracking_section() -> None:
    study = _study(extra="tracking: {mlflow: true, tensorboard: tb/logs}\n")
    assert dict(study.tracking) == {"mlflow": "mlruns", "tensorboard": "tb/logs"}
    assert dict(_study(extra="tracking: {mlflow: false}\n").tracking) == {}
    assert dict(_study().tracking) == {}
    with pytest.raises(SpecError) as error:
        _study(extra="tracking: {mlflw: true, tensorboard: 3}\n")
    assert error.value.problems == [
        "mo.yaml: tracking.mlflw: unknown tracker (did you mean 'mlflow'?); expected one of mlflow, tensorboard",
        "mo.yaml: tracking.tensorboard: found 3, expected a location (a URI or a folder), true or false",
    ]
