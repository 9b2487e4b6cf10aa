"""harness.runtime: retries, failure reasons, devices, peak memory, output paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import runtime


class Transient(Exception):
    pass


def test_retry__transient_errors_are_retried_with_growing_waits_then_it_succeeds() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise Transient("busy")
        return "done"

    result = runtime.retry(
        flaky, transient=lambda e: isinstance(e, Transient), attempts=10, base_s=0.1, cap_s=0.3, sleep=waits.append
    )
    assert result == "done" and len(calls) == 4
    # Exponential (0.1, 0.2, then capped at 0.3), each with jitter between x0.5 and x1.5.
    assert [0.05 <= waits[0] <= 0.15, 0.1 <= waits[1] <= 0.3, 0.15 <= waits[2] <= 0.45] == [True] * 3


def test_retry__other_errors_and_the_last_attempt_raise() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("not transient")

    with pytest.raises(ValueError):
        runtime.retry(broken, transient=lambda e: isinstance(e, Transient), attempts=5, sleep=lambda _: None)
    assert len(calls) == 1

    def always() -> None:
        calls.append(1)
        raise Transient("still busy")

    calls.clear()
    with pytest.raises(Transient):
        runtime.retry(always, transient=lambda e: True, attempts=3, sleep=lambda _: None)
    assert len(calls) == 3


def test_retry__patience_bounds_the_total_time() -> None:
    told: list[tuple[int, float]] = []

    def always() -> None:
        raise Transient("down")

    with pytest.raises(Transient):
        runtime.retry(
            always, transient=lambda e: True, patience_s=0.3, base_s=0.05, cap_s=0.1,
            on_retry=lambda error, attempt, wait: told.append((attempt, wait)),
        )
    assert told and sum(wait for _, wait in told) <= 0.3 + 1e-6
    assert [attempt for attempt, _ in told] == list(range(1, len(told) + 1))


def test_failure_reason__names_the_type_message_and_the_raising_line() -> None:
    try:
        {}["missing"]
    except KeyError as error:
        reason = runtime.failure_reason(error)
    line = test_failure_reason__names_the_type_message_and_the_raising_line.__code__.co_firstlineno + 2
    assert reason == f"KeyError: 'missing' (at test_runtime.py:{line})"
    assert runtime.failure_reason(RuntimeError("never raised")) == "RuntimeError: never raised"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tpu", "'tpu' is not a device name (expected auto, cpu, cuda or cuda:N)"),
        ("meta", "'meta' is not supported (expected auto, cpu, cuda or cuda:N)"),
        ("cpu", None),
        ("auto", None),
    ],
)
def test_device_problem__names_the_device_and_what_was_expected(name: str, expected: str | None) -> None:
    assert runtime.device_problem(name) == expected


def test_resolve_device__refuses_what_device_problem_names() -> None:
    import torch

    assert runtime.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu' is not a device name"):
        runtime.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            runtime.resolve_device("cuda")


PEAK_MEMORY_PROBE = """
import sys, time, torch
from harness import runtime
if sys.argv[1] == "sampled":
    runtime._reset_high_water_mark = lambda: False
elif not runtime.cpu_peak_supported():
    print("unsupported")
    raise SystemExit
size = 256 * 2**20
with runtime.PeakMemory(torch.device("cpu")) as memory:
    temporary = torch.ones(size // 4)  # written, so its pages are resident
    time.sleep(0.05)  # several periods of the sampling fallback
    del temporary
print(memory.peak / size)
"""


@pytest.mark.parametrize("mode", ["vmhwm", "sampled"])
def test_peak_memory__cpu_sees_a_freed_temporary(mode: str) -> None:
    # A fresh process: in a long-lived one, freed memory the allocator kept resident can serve the
    # temporary without any growth (the under-count docs/DECISIONS.md describes).
    probe = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE, mode], capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr
    if probe.stdout.strip() == "unsupported":
        pytest.skip("this kernel has no resettable VmHWM")
    assert 0.9 <= float(probe.stdout) <= 2.0


def test_peak_memory__without_a_high_water_mark_or_sampling_it_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(runtime, "_reset_high_water_mark", lambda: False)
    with runtime.PeakMemory(torch.device("cpu"), sample=False) as memory:
        torch.ones(1000)
    assert memory.peak is None


def test_output_problem__each_unwritable_target_is_named(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert runtime.output_problem(tmp_path / "new" / "out.csv", folder=False) is None
    assert runtime.output_problem(tmp_path, folder=False) == (f"{tmp_path} is a folder; expected a file name", 2)
    assert runtime.output_problem(a_file, folder=True) == (
        f"{a_file} is a file; expected a folder (or a path that does not exist yet)", 2
    )
    message, code = runtime.output_problem(a_file / "sub" / "out.csv", folder=False)  # type: ignore[misc]
    assert code == 2 and f"{a_file} is a file, so the file cannot be made under it" in message
    long = tmp_path / ("x" * 300 + ".csv")
    message, code = runtime.output_problem(long, folder=False)  # type: ignore[misc]
    assert code == 2 and "is 304 bytes; this file system allows 255" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"], "checking creates nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (tests/test_db_cli.py checks the same path with the permission check a user gets)")
def test_output_problem__a_read_only_folder_is_an_environment_problem(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert runtime.output_problem(folder / "out.csv", folder=False) == (f"{folder / 'out.csv'}: {folder} is not writable", 1)
    finally:
        folder.chmod(0o755)


def test_write_atomically__a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"

    def half(path: Path) -> None:
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        runtime.write_atomically(target, half)
    assert list(tmp_path.iterdir()) == []
    runtime.write_atomically(target, lambda path: path.write_text("whole"))
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
