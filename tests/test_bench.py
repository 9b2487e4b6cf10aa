"""``harness bench``: rows in the database, baselines, the regression gate and its table."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select, update

from harness.bench import cli
from harness.bench.cases import KERNELS, kernel_names, parse_kernels, select_cases
from harness.bench.compare import compare, format_table, parse_threshold
from harness.bench.runner import RunConfig, run_cases
from harness.bench.storage import load_baseline, read_json
from harness.bench.timing import peak_extra_bytes, summarize, time_interleaved
from harness.db import BenchRow, Database
from harness.losses import LOSSES

# Two cheap kernels keep each command to a second or two.
KERNELS_ARG = "byol,triplet"


def bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = cli.build_parser()
    code = cli.main(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def quick(db: Path, *extra: str) -> list[str]:
    # One thread: the ratios of a 2-core machine shared with other tests stay within a few 10%.
    return [
        "--kernels",
        KERNELS_ARG,
        "--quick",
        "--rounds",
        "5",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--db",
        str(db),
        *extra,
    ]


def rows(db: Path) -> list[BenchRow]:
    return Database(db).run(lambda s: list(s.execute(select(BenchRow).order_by(BenchRow.id)).scalars()))


def test_cases__cover_every_loss_and_sinkhorn() -> None:
    assert set(LOSSES) | {"sinkhorn"} == set(kernel_names())
    for shape_set in ("quick", "cpu", "cuda"):
        assert {case.kernel.name for case in select_cases(None, shape_set)} == set(KERNELS)
    assert len(select_cases(None, "quick")) == len(KERNELS)  # one quick case per kernel


def test_cases__issue_shapes_on_cuda() -> None:
    by_kernel = {
        name: [c.params for c in select_cases([name], "cuda")]
        for name in ("nt_xent", "infonce", "barlow_twins")
    }
    assert [p["B"] for p in by_kernel["nt_xent"]] == [256, 1024, 4096]
    assert [p["K"] for p in by_kernel["infonce"]] == [4096, 65536]
    assert {(p["N"], p["D"]) for p in by_kernel["barlow_twins"]} == {
        (256, 2048),
        (256, 8192),
        (2048, 2048),
        (2048, 8192),
        (4096, 2048),
        (4096, 8192),
    }


def test_parse_kernels__unknown_name_is_a_clear_error() -> None:
    assert parse_kernels("npair, nt_xent") == ["nt_xent", "npair"]
    assert parse_kernels(None) == kernel_names()
    with pytest.raises(ValueError, match=r"unknown kernel\(s\): ntxent; known: nt_xent"):
        parse_kernels("ntxent,byol")


def test_cli__unknown_kernel_exits_2_with_the_known_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = bench(capsys, "--kernels", "nope", "--db", str(tmp_path / "b.db"))
    assert code == 2
    assert "unknown kernel(s): nope" in err and "nt_xent" in err


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.1), ("0.1", 0.1), (" 25 % ", 0.25), ("150%", 1.5), ("0", 0.0)]
)
def test_parse_threshold__percent_or_fraction(text: str, value: float) -> None:
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-5%", "10", "1", "nan%", ""])
def test_parse_threshold__rejects_nonsense_and_ambiguous_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="slowdown"):
        parse_threshold(text)


def test_cli__bad_threshold_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = bench(capsys, *quick(tmp_path / "b.db", "--max-slowdown", "10"))
    assert code == 2 and "ambiguous" in err


def test_runner__stores_rows_with_ratio_and_provenance(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "bench.db"
    code, out, _ = bench(capsys, *quick(db))
    assert code == 0
    stored = rows(db)
    # 2 kernels x 1 quick case x 2 directions x (reference, fast)
    assert len(stored) == 8
    assert len({r.run_id for r in stored}) == 1
    assert {r.kernel for r in stored} == {"byol", "triplet"}
    assert {r.direction for r in stored} == {"forward", "forward+backward"}
    for r in stored:
        assert r.saved_as is None
        assert r.device == "cpu" and r.dtype == "float32"
        assert r.median_s > 0 and r.min_s > 0 and r.iqr_s >= 0 and r.rounds == 5
        assert r.params["N"] > 0 and r.params["threads"] == 1
        assert r.case == ",".join(f"{k}={v}" for k, v in r.params.items() if k != "threads")
        assert r.torch_version == torch.__version__ and r.host and r.device_name
        assert r.peak_mem_bytes is None or r.peak_mem_bytes >= 0
        if r.impl == "reference":
            assert r.ratio_to_reference == 1.0
        else:
            # The median of the per-round ratios: within the extreme ratios the rounds allow.
            ref = next(
                x
                for x in stored
                if x.impl == "reference" and (x.kernel, x.direction) == (r.kernel, r.direction)
            )
            assert (
                r.min_s / (ref.median_s + 2 * ref.iqr_s) / 10
                < r.ratio_to_reference
                < r.median_s / ref.min_s * 10
            )
    assert "byol" in out and "ratio" in out


def test_gate__doctored_database_baseline_fails_and_lists_the_kernel(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "bench.db"
    assert bench(capsys, *quick(db, "--save", "main"))[0] == 0
    assert {r.saved_as for r in rows(db)} == {"main"}
    # Pretend byol's fast implementation used to be 20x better relative to its reference.
    Database(db).run(
        lambda s: s.execute(
            update(BenchRow)
            .where(BenchRow.kernel == "byol", BenchRow.impl == "fast")
            .values(ratio_to_reference=BenchRow.ratio_to_reference / 20)
        )
    )
    # A threshold far above timing noise: only the doctored kernel may fail.
    code, out, _ = bench(capsys, *quick(db, "--compare", "main", "--max-slowdown", "300%"))
    assert code == 1
    table = out[out.index("compared with baseline") :]
    slower = [line for line in table.splitlines() if "SLOWER" in line]
    assert slower and all(line.startswith("byol") for line in slower)
    assert "baseline" in table and "current" in table and "change" in table and "verdict" in table
    assert "+" in slower[0] and "%" in slower[0]  # the change, e.g. +1900.0%
    assert "FAIL" in table


def test_gate__json_baseline_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "bench.db"
    path = tmp_path / "baselines" / "ci.json"
    assert bench(capsys, *quick(db, "--save", str(path)))[0] == 0
    document = json.loads(path.read_text())
    assert document["format"].startswith("harness-bench-baseline") and len(document["rows"]) == 8
    assert document["provenance"]["torch_version"] == torch.__version__
    # Against itself with a generous threshold: passes.
    code, out, _ = bench(capsys, *quick(db, "--compare", str(path), "--max-slowdown", "900%"))
    assert code == 0, out
    assert "PASS" in out
    # Doctored: every fast ratio 100x better in the baseline -> every kernel fails.
    for row in document["rows"]:
        if row["impl"] != "reference":
            row["ratio_to_reference"] /= 100
    path.write_text(json.dumps(document))
    code, out, _ = bench(capsys, *quick(db, "--compare", str(path), "--max-slowdown", "0.5"))
    assert code == 1
    assert {line.split()[0] for line in out.splitlines() if line.endswith("SLOWER")} == {"byol", "triplet"}


def test_gate__save_and_compare_same_name_compares_with_the_previous(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "bench.db"
    assert bench(capsys, *quick(db, "--save", "main"))[0] == 0
    Database(db).run(
        lambda s: s.execute(update(BenchRow).where(BenchRow.impl == "fast").values(ratio_to_reference=1e-6))
    )
    code, _, _ = bench(capsys, *quick(db, "--save", "main", "--compare", "main"))
    assert code == 1  # compared with the doctored run, not with itself
    assert all(
        r["ratio_to_reference"] > 1e-6 for r in load_baseline("main", Database(db))
    )  # the new run is saved


def test_gate__missing_baseline_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = bench(capsys, *quick(tmp_path / "b.db", "--compare", "never-saved"))
    assert code == 2 and "never-saved" in err
    code, _, err = bench(capsys, *quick(tmp_path / "b.db", "--compare", str(tmp_path / "missing.json")))
    assert code == 2 and "does not exist" in err


def test_gate__nothing_in_common_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    row = {
        "kernel": "nt_xent",
        "impl": "fast",
        "case": "B=1,D=1",
        "params": {},
        "device": "cpu",
        "dtype": "float32",
        "direction": "forward",
        "median_s": 1.0,
        "iqr_s": 0.0,
        "min_s": 1.0,
        "rounds": 1,
        "peak_mem_bytes": None,
        "ratio_to_reference": 0.5,
    }
    path.write_text(json.dumps({"format": "harness-bench-baseline/1", "rows": [row]}))
    code, _, err = bench(capsys, *quick(tmp_path / "b.db", "--compare", str(path)))
    assert code == 1 and "nothing in this run matches" in err


def _row(kernel: str, ratio: float, impl: str = "fast", threads: int = 2) -> dict[str, Any]:
    return {
        "kernel": kernel,
        "impl": impl,
        "case": "N=8",
        "direction": "forward",
        "device": "cpu",
        "dtype": "float32",
        "ratio_to_reference": ratio,
        "params": {"N": 8, "threads": threads},
    }


def test_compare__verdicts_and_ordering() -> None:
    baseline = [_row("a", 0.5), _row("b", 0.5), _row("c", 0.5), _row("a", 1.0, "reference")]
    current = [_row("a", 0.52), _row("b", 0.8), _row("c", 0.2), _row("d", 0.3), _row("a", 1.0, "reference")]
    result = compare(current, baseline, 0.1)
    verdicts = {c.key[0]: c.verdict for c in result.changes}
    assert verdicts == {"a": "ok", "b": "SLOWER", "c": "faster", "d": "new"}
    assert [c.key[0] for c in result.changes] == ["b", "c", "a", "d"]  # failures, then biggest moves
    assert not result.passed and [c.key[0] for c in result.failures] == ["b"]
    text = format_table(result)
    assert "+60.0%" in text and "-60.0%" in text and "SLOWER" in text


def test_compare__notes_a_different_thread_count() -> None:
    result = compare([_row("a", 0.5, threads=1)], [_row("a", 0.5, threads=2)], 0.1)
    assert result.passed and "thread" in format_table(result)


def test_timing__interleaved_rounds_and_summary() -> None:
    calls: list[str] = []
    timings = time_interleaved(
        {"x": lambda: calls.append("x"), "y": lambda: calls.append("y")},
        torch.device("cpu"),
        rounds=4,
        min_round_s=0.0,
    )
    assert set(timings) == {"x", "y"} and all(t.rounds == 4 for t in timings.values())
    summary = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert summary.median_s == 3.0 and summary.min_s == 1.0 and summary.iqr_s == 2.0


def test_timing__cpu_peak_memory_sees_a_large_temporary() -> None:
    size = 64 * 2**20

    def allocate() -> None:
        torch.ones(size // 4, dtype=torch.float32).sum()

    peak = peak_extra_bytes(allocate, torch.device("cpu"))
    if peak is None:
        pytest.skip("no peak-RSS reset on this platform")
    assert 0.9 * size <= peak <= 2 * size


def test_run_cases__respects_directions_and_forward_only_kernels() -> None:
    config = RunConfig(rounds=2, min_round_s=0.0, measure_memory=False, directions=("forward+backward",))
    results = run_cases(
        select_cases(["sinkhorn", "byol"], "quick"), torch.device("cpu"), config=config, progress=None
    )
    assert {(r.kernel, r.direction) for r in results} == {("byol", "forward+backward")}


def test_cli__pipeline_calls_the_data_benchmark(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness.data

    fake = types.ModuleType("harness.data.pipeline_bench")
    seen: dict[str, Any] = {}

    def compare_pipelines(device: str = "cpu") -> dict[str, float]:
        seen["device"] = device
        return {"ours_images_per_s": 1234.5, "speedup": 21.0}

    fake.compare_pipelines = compare_pipelines  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harness.data.pipeline_bench", fake)
    monkeypatch.setattr(harness.data, "pipeline_bench", fake, raising=False)
    code, out, _ = bench(capsys, "pipeline", "--device", "cpu")
    assert code == 0 and "ours_images_per_s" in out and "1234.5" in out
    assert seen == {"device": "cpu"}


def test_cli__mounts_on_a_subparser() -> None:
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command")
    cli.add_arguments(sub.add_parser("bench"))
    args = parser.parse_args(
        ["bench", "--kernels", "nt_xent", "--save", "x", "--compare", "y", "--max-slowdown", "5%"]
    )
    assert (args.what, args.kernels, args.save, args.compare, args.max_slowdown) == (
        "kernels",
        "nt_xent",
        "x",
        "y",
        "5%",
    )


def test_committed_ci_baseline_is_readable_and_covers_the_quick_set() -> None:
    path = Path(__file__).resolve().parent.parent / "harness" / "bench" / "baselines" / "ci-cpu.json"
    baseline = read_json(path)
    fast = {(r["kernel"], r["case"], r["direction"]) for r in baseline if r["impl"] != "reference"}
    expected = {
        (case.kernel.name, case.name, direction)
        for case in select_cases(None, "quick")
        for direction in case.kernel.directions
    }
    assert expected <= fast
