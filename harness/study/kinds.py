"""Which ``StudyKind`` runs a study: the one place that tells a search from a grid or an ablation."""

from __future__ import annotations

from harness.spec import Study
from harness.study.grid import GridKind
from harness.study.search import SearchKind
from harness.study.worker import StudyKind


def kind_of(study: Study) -> StudyKind:
    return SearchKind(study) if study.search is not None else GridKind(study)


__all__ = ["kind_of"]
