"""The GPU-lease script runs end to end (on the CPU, tiny), so a scarce GPU call does not fail on a typo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_gpu_throughput_script__writes_its_table_on_the_cpu(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "scripts" / "gpu_throughput.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        str(tmp_path),
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--steps",
        "1",
        "--backbone",
        "small_cnn",
        "--methods",
        "simclr,moco",
    ]
    assert script.main(argv) == 0
    table = (tmp_path / "throughput.md").read_text()
    written = json.loads((tmp_path / "throughput.json").read_text())
    rows = written["rows"]
    assert written["device"]
    assert "| simclr |" in table and "| moco |" in table and "seed loop" in table
    assert [row["status"] for row in rows] == ["complete"] * 3, rows
    assert all(row["img_per_s"] > 0 for row in rows)
