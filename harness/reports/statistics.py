"""Statistics of the comparison tables: confidence intervals over seeds, paired tests against the
best configuration over the seeds both share, and ties (no torch; numpy and scipy only).

Every function is deterministic (no resampling), so a report stays byte-identical for one database.
The interval is Student's t-interval of the mean over seeds: with n seeds, mean ± t(1 - α/2, n - 1)
· s / √n, s the sample standard deviation (ddof = 1). It assumes the per-seed values are roughly
normal; with 3-5 seeds (the usual study) a bootstrap interval would be no more trustworthy and
would need random draws. The comparison against the best is a paired t-test over the shared seeds
(two-sided): a seed fixes the initialization and data order of every configuration, so the
per-seed differences remove what the configurations share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from harness.reports.style import MISSING, format_number

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
INTERVAL_METHOD = "Student t-interval"
TEST_METHOD = "paired t-test (two-sided)"
# Hyperparameter importances (fANOVA) fitted on fewer complete trials than this are shown with a
# caveat: a random forest on a handful of points ranks knobs by noise (docs/REPORTS.md). 20 is
# about 2 points per parameter at the 5-10 parameters of a usual search space.
RELIABLE_IMPORTANCE_TRIALS = 20

VERDICTS: tuple[str, ...] = ("best", "tie", "worse", "untested")


@dataclass(frozen=True)
class Interval:
    """The mean of the finite values and its confidence interval; ``low``/``high`` are NaN when no
    interval exists (fewer than two finite values)."""

    mean: float
    low: float
    high: float
    std: float
    n: int  # finite values
    n_nonfinite: int  # NaN, inf and -inf together
    confidence: float = CONFIDENCE
    method: str = INTERVAL_METHOD
    n_inf: int = 0  # of n_nonfinite: +inf
    n_neg_inf: int = 0  # of n_nonfinite: -inf

    @property
    def nonfinite_text(self) -> str:
        """'1 nan, 2 inf': the seeds without a finite value, by kind."""
        counts = (("nan", self.n_nonfinite - self.n_inf - self.n_neg_inf), ("inf", self.n_inf), ("-inf", self.n_neg_inf))
        return ", ".join(f"{n} {kind}" for kind, n in counts if n)

    @property
    def exists(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2 if self.exists else math.nan


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Student's t-interval of the mean of the finite ``values`` (NaN and inf are diverged seeds:
    counted in ``n_nonfinite``, left out of the mean). With identical values the interval is the
    point itself."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    all_values = [float(v) for v in values]
    finite = np.array([v for v in all_values if math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    nonfinite = len(all_values) - n
    infinities = {"n_inf": all_values.count(math.inf), "n_neg_inf": all_values.count(-math.inf)}
    if n == 0:
        # Every seed +inf (or every seed -inf) is that value; a mix, or NaN, has no mean.
        same = nonfinite and (infinities["n_inf"] == nonfinite or infinities["n_neg_inf"] == nonfinite)
        mean = all_values[0] if same else math.nan
        return Interval(mean, math.nan, math.nan, math.nan, 0, nonfinite, confidence, **infinities)
    mean = float(finite.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n, nonfinite, confidence, **infinities)
    std = float(finite.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, std, n, nonfinite, confidence, **infinities)


@dataclass(frozen=True)
class PairedTest:
    """A paired test of ``candidate - best`` over the seeds both have a finite value for."""

    n: int  # shared seeds
    mean_difference: float
    statistic: float
    p_value: float
    method: str = TEST_METHOD


def paired_test(best: Mapping[int, float], other: Mapping[int, float]) -> PairedTest | None:
    """Paired t-test of ``other`` against ``best`` (seed -> value) over their shared seeds with
    finite values on both sides; None with fewer than two shared seeds (no variance to test with).
    Identical differences on every seed (zero variance) give p = 1 when they are all zero and
    p = 0 otherwise (a constant, nonzero gap is as consistent as a gap gets)."""
    shared = sorted(
        seed
        for seed in set(best) & set(other)
        if math.isfinite(float(best[seed])) and math.isfinite(float(other[seed]))
    )
    if len(shared) < 2:
        return None
    a = np.array([float(other[s]) for s in shared])
    b = np.array([float(best[s]) for s in shared])
    difference = a - b
    mean_difference = float(difference.mean())
    if float(np.ptp(difference)) == 0.0:
        zero = mean_difference == 0.0
        statistic = 0.0 if zero else math.copysign(math.inf, mean_difference)
        return PairedTest(len(shared), mean_difference, statistic, 1.0 if zero else 0.0)
    result = stats.ttest_rel(a, b)
    return PairedTest(len(shared), mean_difference, float(result.statistic), float(result.pvalue))


@dataclass(frozen=True)
class Verdict:
    """How one configuration compares with the best one in a column.

    ``status``: ``best`` (the highest or lowest mean), ``tie`` (the paired test over shared seeds
    does not tell it from the best: p >= alpha), ``worse`` (p < alpha) or ``untested`` (fewer than
    two shared seeds with finite values: neither a tie nor a loss can be claimed)."""

    status: str
    test: PairedTest | None = None


def compare_with_best(
    samples: Mapping[str, Mapping[int, float]],
    *,
    higher_is_better: bool,
    candidates: Iterable[str] | None = None,
    alpha: float = ALPHA,
) -> dict[str, Verdict]:
    """Verdicts of the ``candidates`` (default: every key of ``samples``, a configuration -> seed
    -> value) against the one with the best mean of its finite values. Equal best means are all
    ``best``. Configurations without a finite value, and those outside ``candidates`` (baselines),
    get no verdict. Empty when fewer than two candidates have a finite mean: "best" of one says
    nothing."""
    names = list(samples) if candidates is None else [c for c in candidates if c in samples]
    means: dict[str, float] = {}
    for name in names:
        finite = [float(v) for v in samples[name].values() if math.isfinite(float(v))]
        if finite:
            means[name] = float(np.mean(finite))
    if len(means) < 2:
        return {}
    top = max(means.values()) if higher_is_better else min(means.values())
    bests = sorted(name for name, mean in means.items() if mean == top)
    reference = samples[bests[0]]
    verdicts: dict[str, Verdict] = {}
    for name in means:
        if name in bests:
            verdicts[name] = Verdict("best")
            continue
        test = paired_test(reference, samples[name])
        if test is None:
            verdicts[name] = Verdict("untested")
        else:
            verdicts[name] = Verdict("tie" if test.p_value >= alpha else "worse", test)
    return verdicts


def interval_text(interval: Interval, decimals: int) -> str:
    """'mean ± half-width' of the interval, the mean alone when no interval exists, '(k nan)' /
    '(k inf)' for the seeds without a finite value, 'inf' or '-inf' when every seed has that value,
    MISSING ("—") when no seed has a value."""
    if math.isnan(interval.mean):
        return MISSING
    if math.isinf(interval.mean):
        return format_number(interval.mean)
    text = format_number(interval.mean, decimals)
    if interval.exists:
        text += f" ± {format_number(interval.half_width, decimals)}"
    if interval.n_nonfinite:
        text += f" ({interval.nonfinite_text})"
    return text


def p_value_text(p_value: float) -> str:
    """p with two significant digits; below 0.001 as '< 0.001'."""
    if not math.isfinite(p_value):
        return "–"
    if p_value < 1e-3:
        return "< 0.001"
    return f"{p_value:.2g}" if p_value < 0.1 else f"{p_value:.2f}"
