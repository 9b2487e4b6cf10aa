"""A report built from a database filled by a small real study (harness run, real trials)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from harness.reports import build_report
from harness.results import metrics_frame, trials_frame

REPO = Path(__file__).resolve().parent.parent

STUDY = """\
study: tiny-real
description: SimCLR against BYOL and the random-init floor on generated images
dataset: synthetic
fixed:
  train_size: 96
  test_size: 40
  batch_size: 32
  epochs: 2
  knn_k: 5
  linear_epochs: 3
  proj_hidden_dim: 32
  log_every: 1
grid:
  method: [simclr, byol, random_init]
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def real_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("real")
    study_file = folder / "tiny-real.yaml"
    study_file.write_text(STUDY)
    db = folder / "harness.db"
    run = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(study_file), "--db", str(db), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = build_report(db, "tiny-real", folder / "report")
    return db, out


def _row_cells(markdown: str, label: str) -> list[str]:
    section = markdown.split("## Comparison", 1)[1]
    for line in section.splitlines():
        cells = [c.strip().strip("*_") for c in line.strip().strip("|").split(" | ")]
        # Six steps on generated images can leave a trial flagged as collapsed (reports/collapse.py).
        if cells and cells[0] in (label, f"{label} (collapsed)"):
            return cells
    raise AssertionError(f"no row {label!r} in the comparison table")


@pytest.mark.slow
def test_report__real_study_table_equals_the_database(real_study: tuple[Path, Path]) -> None:
    db, out = real_study
    trials = trials_frame(db, "tiny-real")
    assert len(trials) == 6 and set(trials["status"]) == {"complete"}
    markdown = (out / "report.md").read_text()
    for method, group in trials.groupby("method"):
        cells = _row_cells(markdown, method)
        assert cells[1] == str(len(group))
        # mean ± the half-width of the 95% Student t-interval over the seeds
        t = scipy_stats.t.ppf(0.975, len(group) - 1)
        knn = 100 * group["knn_top1"]
        assert cells[2] == f"{knn.mean():.1f} ± {t * knn.std(ddof=1) / len(group) ** 0.5:.1f}"
        linear = 100 * group["linear_top1"]
        assert cells[3] == f"{linear.mean():.1f} ± {t * linear.std(ddof=1) / len(group) ** 0.5:.1f}"


@pytest.mark.slow
def test_report__real_study_figures_exist_and_curves_are_recorded(real_study: tuple[Path, Path]) -> None:
    db, out = real_study
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources, "the report has figures"
    assert all((out / source).is_file() for source in sources)
    curves = metrics_frame(db, "tiny-real")
    trained = trials_frame(db, "tiny-real").query("method != 'random_init'")["trial_id"]
    for trial_id in trained:
        names = set(curves[curves["trial_id"] == trial_id]["name"])
        assert {"loss", "lr", "knn_top1"} <= names


# ---------------------------------------------------------------------------------------------
# The report in a real browser: Debian's chromium, headless, driven by Playwright

BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# `bash scripts/setup.sh test` installs chromium and sets this, so CI fails instead of skipping.
REQUIRE_BROWSER = "HARNESS_REQUIRE_BROWSER"
ARTIFACTS = "HARNESS_TEST_ARTIFACTS"


def _chromium() -> str:
    import os
    import shutil

    binary = os.environ.get("HARNESS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        binary = None
    if binary is None:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"{REQUIRE_BROWSER} is set but chromium or playwright is missing")
        pytest.skip("no chromium binary or playwright package (bash scripts/setup.sh test installs both)")
    return binary


def _artifact_dir() -> Path:
    """Where screenshots are kept after the run: $HARNESS_TEST_ARTIFACTS, else test-artifacts/ in
    the checkout (git-ignored; pytest's own temporary folders are rotated away)."""
    import os

    folder = Path(os.environ.get(ARTIFACTS) or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.slow
def test_report__renders_in_headless_chromium_without_errors_or_network(
    real_study: tuple[Path, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    binary = _chromium()
    _, out = real_study
    index = (out / "index.html").resolve()
    problems: list[str] = []
    outside: list[str] = []
    artifacts = _artifact_dir()
    with sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=binary,
            headless=True,
            args=list(BROWSER_FLAGS),
            viewport={"width": 1280, "height": 900},
        )
        try:

            def route(request_route: object) -> None:
                request = request_route.request  # type: ignore[attr-defined]
                if request.url.startswith(("file://", "data:", "about:")):
                    request_route.continue_()  # type: ignore[attr-defined]
                else:
                    outside.append(request.url)
                    request_route.abort()  # type: ignore[attr-defined]

            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.goto(index.as_uri(), wait_until="load")
            images = page.evaluate(
                """() => Array.from(document.images).map(img => {
                    const box = img.getBoundingClientRect();
                    const style = getComputedStyle(img);
                    return {src: img.getAttribute('src'), complete: img.complete, natural: img.naturalWidth,
                            width: box.width, height: box.height,
                            shown: style.display !== 'none' && style.visibility !== 'hidden'};
                })"""
            )
            desktop = artifacts / "report-desktop.png"
            page.screenshot(path=str(desktop), full_page=True)
            # A phone-sized window: the page never scrolls sideways; the wide table scrolls in its box.
            page.set_viewport_size({"width": 390, "height": 800})
            narrow = page.evaluate(
                """() => {
                    const wraps = Array.from(document.querySelectorAll('.table-wrap'));
                    return {page: document.documentElement.scrollWidth, window: window.innerWidth,
                            scrolling: wraps.filter(w => w.scrollWidth > w.clientWidth).length,
                            overflowing: wraps.filter(w => w.getBoundingClientRect().right > window.innerWidth + 1).length};
                }"""
            )
            phone = artifacts / "report-narrow.png"
            page.screenshot(path=str(phone), full_page=True)
        finally:
            context.close()
    print(f"\nbrowser screenshots: {desktop} {phone}")
    assert not outside, f"requests leaving the machine: {outside}"
    assert not problems, problems
    assert len(images) == len(re.findall(r"<img ", (out / "index.html").read_text())) >= 3
    for image in images:
        assert image["complete"] and image["natural"] > 0, f"broken image {image['src']}"
        assert image["shown"] and image["width"] > 100 and image["height"] > 50, f"invisible figure {image}"
    assert narrow["page"] <= narrow["window"], narrow
    assert narrow["scrolling"] >= 1 and narrow["overflowing"] == 0, narrow
    from PIL import Image

    with Image.open(desktop) as shot:
        grey = shot.convert("L")
        assert shot.width == 1280 and shot.height > 900
        low, high = grey.getextrema()
        assert high - low > 100, "the screenshot is blank"
