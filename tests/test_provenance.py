"""Provenance: the git commit and dirty flag of the checkout a result came from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.provenance import GENERATED_PATHS, checkout_state


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.org")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "code.py").write_text("x = 1\n")
    (tmp_path / "reports" / "quickstart").mkdir(parents=True)
    (tmp_path / "reports" / "quickstart" / "report.md").write_text("# old\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_checkout_state__clean_checkout(checkout: Path) -> None:
    commit, dirty = checkout_state(checkout)
    assert commit == _git(checkout, "rev-parse", "HEAD").strip() and dirty is False


def test_checkout_state__a_regenerated_report_is_not_a_local_change(checkout: Path) -> None:
    assert "reports" in GENERATED_PATHS
    (checkout / "reports" / "quickstart" / "report.md").write_text("# regenerated\n")
    assert _git(checkout, "status", "--porcelain").strip()  # git itself sees the change
    assert checkout_state(checkout)[1] is False
    # ...also when asked from a subfolder's point of view (the pathspec is from the top).
    assert checkout_state(checkout / "harness")[1] is False


def test_checkout_state__a_changed_source_file_is_dirty(checkout: Path) -> None:
    (checkout / "harness" / "code.py").write_text("x = 2\n")
    assert checkout_state(checkout)[1] is True


def test_checkout_state__outside_git_is_unknown(tmp_path: Path) -> None:
    assert checkout_state(tmp_path) == (None, None)
