"""Import-direction contracts of DESIGN.md: torch-free modules stay torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["harness.spec", "harness.reports", "harness.db", "harness.results"])
def test_import__does_not_pull_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} imported torch\n{result.stderr}"


def test_registries__are_plain_dicts_named_as_in_the_spec() -> None:
    from harness import spec
    from harness.backbones import BACKBONES
    from harness.data import DATASETS
    from harness.losses import LOSSES
    from harness.methods import METHODS

    for registry in (METHODS, BACKBONES, DATASETS, LOSSES):
        assert type(registry) is dict
    assert set(METHODS) == set(spec.METHOD_NAMES)
    assert set(BACKBONES) == set(spec.BACKBONE_NAMES)
    assert set(DATASETS) == set(spec.DATASET_NAMES)
    assert set(spec.METHOD_DEFAULTS) == set(spec.METHOD_NAMES) == set(spec.METHOD_KNOBS)
