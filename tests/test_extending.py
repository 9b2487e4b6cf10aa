"""README's "Extending" walked for real: a throwaway method and a throwaway knob are added to a copy
of the package exactly as the README says, and then show up in validation, in the generated docs
and in the method contract tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

THROWAWAY_METHOD = '''
"""A throwaway method for tests/test_extending.py."""

from __future__ import annotations

from torch import Tensor

from harness.losses import byol
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, Rule, TrialConfig

SPEC = MethodSpec(
    name="throwaway",
    paper="nobody 2026",
    knobs={"proj_dim": 32, "throwaway_weight": ...},
    cite="made up for a test",
    colour="#123456",
    rules=(Rule("proj_dim", lambda c: c.proj_dim <= 64, "proj_dim <= 64"),),
)


class Throwaway(Method):
    spec = SPEC

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp([self.feature_dim, 16, config.proj_dim])

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        z1, z2 = encode_views(self.embed, views[:2])
        with fp32_loss(z1):
            return self.config.throwaway_weight * (byol(z1, z2) + byol(z2, z1))
'''

THROWAWAY_KNOB = (
    '    throwaway_weight: float = knob(1.0, "weight of the throwaway loss", group="method", '
    "check=above(0), legacy=1.0)\n"
)


@pytest.fixture(scope="module")
def extended_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extended")
    shutil.copytree(REPO / "harness", root / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docs", root / "docs")
    # The method: its file, and its line in METHOD_FILES.
    (root / "harness" / "methods" / "throwaway.py").write_text(THROWAWAY_METHOD)
    registry = root / "harness" / "methods" / "__init__.py"
    text = registry.read_text()
    assert '    "supcon",\n' in text
    registry.write_text(text.replace('    "supcon",\n', '    "supcon",\n    "throwaway",\n', 1))
    # The knob: one field of TrialConfig.
    spec = root / "harness" / "spec.py"
    text = spec.read_text()
    anchor = "    # execution\n"
    assert anchor in text
    spec.write_text(text.replace(anchor, THROWAWAY_KNOB + anchor, 1))
    return root


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_extending__throwaway_method_and_knob_reach_validation(extended_copy: Path) -> None:
    code = textwrap.dedent(
        """
        from harness.spec import SpecError, parse_study, resolve
        study = parse_study("study: t\\nfixed: {throwaway_weight: 2.5}\\ngrid: {method: [throwaway, simclr]}\\n")
        configs = {c.method: c for c in study.trials()}
        assert configs["throwaway"].throwaway_weight == 2.5 and configs["throwaway"].proj_dim == 32
        assert configs["simclr"].throwaway_weight == 1.0  # simclr does not read it
        assert resolve({"method": "simclr"}).config_hash == SIMCLR_WAVE1_HASH
        for text, expected in [
            ("study: t\\nfixed: {method: throwaway, throwaway_weight: -1}\\ngrid: {epochs: [1]}\\n", "expected a number > 0"),
            ("study: t\\nfixed: {method: throwaway, proj_dim: 128}\\ngrid: {epochs: [1]}\\n", "expected proj_dim <= 64"),
            ("study: t\\nfixed: {method: simclr, throwaway_weight: 2.0}\\ngrid: {epochs: [1]}\\n", "not used by simclr"),
        ]:
            try:
                parse_study(text, source="t.yaml")
            except SpecError as error:
                assert expected in str(error), str(error)
            else:
                raise AssertionError(text)
        print("ok")
        """
    ).replace("SIMCLR_WAVE1_HASH", repr("96ed3ab48660a363dfbbada21047d5e4ac0c2f28663cf86e172346d0edfb30ac"))
    result = run(extended_copy, sys.executable, "-c", code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.slow
def test_extending__throwaway_method_and_knob_reach_the_generated_docs(extended_copy: Path) -> None:
    result = run(extended_copy, sys.executable, "-m", "harness.docs")
    assert result.returncode == 0, result.stderr
    studies = (extended_copy / "docs" / "STUDIES.md").read_text()
    methods = (extended_copy / "docs" / "METHODS.md").read_text()
    assert "| `throwaway_weight` | number | `1.0` | - | throwaway |" in studies
    assert "| `proj_dim` | integer | `128` |" in studies and "throwaway 32" in studies
    assert "| `throwaway` | nobody 2026 (made up for a test) |" in methods


@pytest.mark.slow
def test_extending__throwaway_method_runs_the_contract_tests(extended_copy: Path) -> None:
    result = run(
        extended_copy,
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "tests" / "test_methods.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "throwaway",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = int(result.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 6, result.stdout[-2000:]


@pytest.mark.slow
def test_extending__wave1_database_resumes_with_zero_reruns_after_a_knob_is_added(
    extended_copy: Path, tmp_path: Path
) -> None:
    """Issue 10's acceptance: the database the first release wrote, run again by a harness that has
    one more knob (at its legacy value), reruns nothing and its report rebuilds."""
    fixture = REPO / "tests" / "fixtures" / "wave1"
    database = tmp_path / "wave1.db"
    shutil.copyfile(fixture / "harness.db", database)
    run_result = run(
        extended_copy,
        sys.executable,
        "-m",
        "harness",
        "run",
        str(fixture / "quickstart.yaml"),
        "--db",
        str(database),
        "--no-progress",
    )
    assert run_result.returncode == 0, run_result.stderr[-3000:]
    assert "quickstart (grid): 3 trial(s), 3 with results" in run_result.stdout, run_result.stdout
    assert "running on" not in run_result.stdout, "a finished wave-1 trial was rerun"
    report = run(
        extended_copy,
        sys.executable,
        "-m",
        "harness",
        "report",
        "quickstart",
        "--db",
        str(database),
        "--out",
        str(tmp_path / "report"),
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "random_init" in (tmp_path / "report" / "report.md").read_text()
