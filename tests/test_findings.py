"""docs/FINDINGS.md's tables are what the committed study databases say (scripts/findings_tables.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("findings_tables", REPO / "scripts" / "findings_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_findings_tables__equal_the_committed_databases() -> None:
    script = _script()
    text = script.FINDINGS.read_text()
    assert len(script.BLOCK.findall(text)) >= 3
    assert script.regenerate(text) == text, "run: python scripts/findings_tables.py"


def test_findings_tables__cell_is_the_t_interval_of_the_seeds() -> None:
    script = _script()
    # mean 2, sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3) = 2.484.
    assert script.cell([1.0, 2.0, 3.0], 1.0, 2) == "2.00 ± 1.00 [-0.48, 4.48]"
    assert script.cell([0.5], 100.0, 1) == "50.0"
    assert script.cell([], 1.0, 1) == "–"


def test_findings_tables__unknown_study_or_knob_names_the_block() -> None:
    script = _script()
    with pytest.raises(SystemExit, match="study=no-such-study: no database"):
        script.table("no-such-study", ["method"])
    with pytest.raises(SystemExit, match="by=no_such_knob is not a knob"):
        script.table("cpu-dino-collapse", ["no_such_knob"])
