"""``harness bench``: run the loss-kernel benchmarks, store them, keep and compare baselines.

Mounted by ``harness/cli.py`` (``add_arguments`` on its ``bench`` sub-parser, then ``main``), and
runnable alone as ``python -m harness.bench.cli``. Exit status: 0 on success, 1 when the gate fails
(a ratio got worse than the baseline's by more than ``--max-slowdown``, or nothing matched the
baseline), 2 on a usage error (unknown kernel, bad threshold, missing baseline, no CUDA device).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from harness.bench.cases import DIRECTIONS, kernel_names, parse_kernels, select_cases
from harness.bench.compare import compare, format_table, parse_threshold
from harness.bench.runner import DTYPES, FULL, QUICK, Result, run_cases
from harness.bench.storage import is_json_path, load_baseline, new_run_id, store, write_json
from harness.runtime import resolve_device

DEFAULT_MAX_SLOWDOWN = "10%"
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``harness bench``'s arguments to ``parser``."""
    parser.add_argument(
        "what",
        nargs="?",
        choices=["kernels", "pipeline"],
        default="kernels",
        help="kernels: the loss kernels (default); pipeline: the data pipeline's benchmark",
    )
    parser.add_argument(
        "--kernels",
        default=None,
        metavar="K,...",
        help=f"comma-separated kernels (default all): {', '.join(kernel_names())}",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default float32)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one small case per kernel, fewer rounds: the CI gate's set (under a minute on 2 CPU cores)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds per implementation (default {QUICK.rounds} quick, {FULL.rounds} full)",
    )
    parser.add_argument(
        "--direction",
        default="both",
        choices=["both", *DIRECTIONS],
        help="forward, forward+backward or both (default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads during the run (default: torch's); 1 keeps ratios stable on a busy machine",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--save",
        default=None,
        metavar="NAME",
        help="keep this run as baseline NAME in the database; a NAME ending in .json also writes that file",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="NAME",
        help="gate against baseline NAME (a saved name, or a path to a .json baseline)",
    )
    parser.add_argument(
        "--max-slowdown",
        default=DEFAULT_MAX_SLOWDOWN,
        metavar="PCT",
        help="largest tolerated growth of a fast/reference ratio, as 10%% or 0.1 (default 10%%)",
    )
    parser.add_argument(
        "--db", default=None, metavar="URL", help="database URL or file (default results/harness.db)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_arguments(parser)
    return parser


def _error(message: str) -> int:
    print(f"harness bench: error: {message}", file=sys.stderr)
    return 2


def _format_results(results: list[Result]) -> str:
    header = ("kernel", "impl", "case", "direction", "median ms", "iqr ms", "peak MiB", "ratio")
    lines = [header]
    for r in results:
        peak = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.1f}"
        lines.append(
            (
                r.kernel,
                r.impl,
                r.case,
                r.direction,
                f"{r.median_s * 1e3:.3f}",
                f"{r.iqr_s * 1e3:.3f}",
                peak,
                f"{r.ratio_to_reference:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def _run_pipeline(args: argparse.Namespace) -> int:
    try:
        from harness.data import pipeline_bench  # type: ignore[attr-defined]
    except ImportError:
        return _error("the pipeline benchmark is not available (harness.data.pipeline_bench is missing)")
    run = getattr(pipeline_bench, "compare_pipelines", None)
    if run is None:
        return _error("harness.data.pipeline_bench has no compare_pipelines()")
    accepted = inspect.signature(run).parameters
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {name: value for name, value in (("device", device), ("quick", args.quick)) if name in accepted}
    figures: Any = run(**options)
    if isinstance(figures, dict):
        width = max((len(str(key)) for key in figures), default=0)
        for key, value in figures.items():
            print(f"{str(key).ljust(width)}  {value}")
    else:
        print(figures)
    return 0


def _run_with_threads(threads: int | None, work: Callable[[], T]) -> T:
    """Run ``work`` with ``threads`` torch CPU threads, restoring the previous count afterwards."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return work()
    finally:
        torch.set_num_threads(previous)


def main(args: argparse.Namespace) -> int:
    """Run ``harness bench`` with parsed arguments; returns the exit status."""
    if getattr(args, "what", "kernels") == "pipeline":
        return _run_pipeline(args)
    try:
        kernels = parse_kernels(args.kernels)
        max_slowdown = parse_threshold(args.max_slowdown)
    except ValueError as error:
        return _error(str(error))
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        return _error(f"--device {args.device}: {error}; nothing was run or written")
    if args.rounds is not None and args.rounds < 1:
        return _error("--rounds must be at least 1")
    if args.threads is not None and args.threads < 1:
        return _error("--threads must be at least 1")

    from harness.db import Database, describe
    from harness.provenance import collect

    try:
        db = Database(args.db)
    except Exception as error:  # not a harness database, a newer one, unreachable: one line
        described = describe(error)
        if described is None:
            raise
        print(f"harness bench: error: {described[0]}", file=sys.stderr)
        return described[1]
    baseline: list[dict[str, Any]] | None = None
    if args.compare is not None:
        # Read before this run is stored, so that --save NAME --compare NAME compares with the old one.
        try:
            baseline = load_baseline(args.compare, db)
        except (LookupError, ValueError, OSError) as error:
            return _error(str(error))

    config = QUICK if args.quick else FULL
    config = dataclasses.replace(
        config,
        rounds=args.rounds or config.rounds,
        measure_memory=not args.no_memory,
        directions=DIRECTIONS if args.direction == "both" else (args.direction,),
    )
    shape_set = "quick" if args.quick else device.type
    selected = select_cases(kernels, shape_set)
    results = _run_with_threads(args.threads, lambda: run_cases(selected, device, DTYPES[args.dtype], config))
    rows = [r.as_dict() for r in results]
    provenance = collect(str(device))
    run_id = new_run_id()
    store(db, rows, run_id=run_id, provenance=provenance, saved_as=args.save)
    print(_format_results(results))
    print(f"\nrun {run_id}: {len(rows)} rows stored in {db.url}")
    if args.save is not None:
        if is_json_path(args.save):
            path = write_json(args.save, rows, name=args.save, provenance=provenance)
            print(f"baseline written to {path}")
        print(f"saved as baseline {args.save!r}")
    if baseline is None:
        return 0
    comparison = compare(rows, baseline, max_slowdown)
    print(f"\ncompared with baseline {args.compare!r} (max slowdown {max_slowdown * 100:g}%):")
    print(format_table(comparison))
    if not comparison.compared:
        print(
            "nothing in this run matches the baseline (other kernels, shapes, device or dtype?)",
            file=sys.stderr,
        )
        return 1
    return 0 if comparison.passed else 1


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
