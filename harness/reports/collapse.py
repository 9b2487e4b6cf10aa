"""Collapse flags: a trial whose representation collapsed is named as such in the report, not
ranked silently among the others (issue 18).

A collapsed encoder maps every image to (nearly) the same point. Three symptoms, any one of which
flags a trial, each with its own threshold:

- the training loss sits at the value a constant output gives (DINO's ``ln(dino_out_dim)``: a
  uniform teacher and student; SimSiam's ``-1``: the predictor reproduces a constant target);
- uniformity (Wang & Isola 2020, ``log E exp(-2 |x - y|^2)`` over normalized projections) near 0:
  0 is all points equal, about -4 is points spread over a high-dimensional sphere;
- effective rank (RankMe) of the backbone features near 1: one direction carries all the variance.

The thresholds are set from the CPU-scale studies of docs/FINDINGS.md: healthy trials there have
uniformity below -1 and effective ranks above 10; a collapsed DINO sits at uniformity -0.1 and a
loss equal to ``ln 1024`` to three decimals.
"""

from __future__ import annotations

import math
from typing import Any

from harness.reports.style import is_finite
from harness.spec import UNTRAINED_METHODS

UNIFORMITY_COLLAPSED = -0.5  # at or above: the projections sit (nearly) on one point
EFFECTIVE_RANK_COLLAPSED = 2.0  # at or below: about one direction of variance
TRIVIAL_LOSS_TOLERANCE = 0.01  # |final loss - trivial value| at or below this: stuck there


def trivial_loss(config: Any) -> float | None:
    """The loss a constant encoder reaches for this trial's method, or None where there is no
    single such value (a contrastive loss with a constant encoder depends on the batch size, and
    most methods' collapse is better read from uniformity and rank)."""
    method = _get(config, "method")
    if method == "dino":
        out_dim = _get(config, "dino_out_dim")
        return math.log(float(out_dim)) if is_finite(out_dim) and float(out_dim) >= 2 else None
    if method == "simsiam":
        return -1.0
    return None


def collapse_reasons(row: Any) -> list[str]:
    """Why a trial's (row of ``ReportData.trials``) representation looks collapsed; empty when it
    does not, and for an untrained method: collapse is what training does to a representation
    (a random CNN's ReLU features are concentrated too, uniformity about -0.1, but nothing was
    learned to get there)."""
    reasons: list[str] = []
    if _get(row, "method") in UNTRAINED_METHODS:
        return reasons
    loss, trivial = _get(row, "final_loss"), trivial_loss(row)
    if trivial is not None and is_finite(loss) and abs(float(loss) - trivial) <= TRIVIAL_LOSS_TOLERANCE:
        reasons.append(f"loss {float(loss):.3f} at its trivial value {trivial:.3f}")
    uniformity = _get(row, "uniformity")
    if is_finite(uniformity) and float(uniformity) >= UNIFORMITY_COLLAPSED:
        reasons.append(f"uniformity {float(uniformity):.2f} near 0")
    rank = _get(row, "effective_rank")
    if is_finite(rank) and float(rank) <= EFFECTIVE_RANK_COLLAPSED:
        reasons.append(f"effective rank {float(rank):.2f} near 1")
    return reasons


def _get(row: Any, key: str) -> Any:
    try:
        return row[key]
    except (KeyError, IndexError, TypeError):
        return None
