"""DINO's self-distillation loss, for one (student crop, teacher crop) pair and over all crops.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (ICCV),
equations (2)-(3) and Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    check_batch,
    check_impl,
    check_matrix,
    check_positive,
    check_same_shape,
    compute_dtype,
    upcast,
)
from harness.losses._soft_ce import paired_soft_cross_entropy
from harness.losses.declaration import BenchShapes, LossInputs, LossSpec, Params, grid, leaf, randn

NAME = "dino"


@autocast_off
def dino(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    *,
    impl: str = "fast",
) -> Tensor:
    """Cross-entropy of the centered, sharpened teacher distribution against the student's.

    Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers":
    ``mean_n Σ_k -softmax((t - c) / τ_t)_k · log_softmax(s / τ_s)_k``. The teacher side (and the
    center) receive no gradient. One pair of crops: the method loops over its (student crop,
    teacher crop) pairs, skipping same-view pairs, averages, and updates the center itself.

    Args:
        student: ``(N, K)`` student logits.
        teacher: ``(N, K)`` teacher logits (detached inside).
        center: ``(K,)`` running center of the teacher logits.
        student_temp, teacher_temp: τ_s and τ_t.
        impl: ``"reference"`` (both distributions materialized, autograd through ``log_softmax``)
            or ``"fast"`` (the teacher softmax under ``no_grad``; the cross-entropy as one custom
            autograd function around one fused softmax of the student, which also gives the row
            log-sum-exp; its backward pass is ``(softmax(s / τ_s) - t) / (N τ_s)`` in two
            elementwise passes).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "student", student)
    check_matrix(NAME, "teacher", teacher)
    check_same_shape(NAME, student=student, teacher=teacher)
    if center.shape not in {(student.shape[1],), (1, student.shape[1])}:
        raise ValueError(f"{NAME}: center must have shape ({student.shape[1]},), got {tuple(center.shape)}")
    check_batch(NAME, student.shape[0], DINO.min_batch, DINO.min_batch_why)
    check_positive(NAME, "student_temp", student_temp)
    check_positive(NAME, "teacher_temp", teacher_temp)
    dtype = compute_dtype(student, teacher, center)
    student = upcast(student, dtype)
    teacher = upcast(teacher.detach(), dtype)
    center = upcast(center.detach(), dtype).reshape(-1)
    if impl == "reference":
        t = F.softmax((teacher - center) / teacher_temp, dim=-1)
        s = F.log_softmax(student / student_temp, dim=-1)
        return torch.sum(-t * s, dim=-1).mean()
    targets = [_teacher_distribution(teacher, center, teacher_temp)]
    return paired_soft_cross_entropy([student], targets, 1.0 / student_temp, skip_same_index=False)


def _teacher_distribution(teacher: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((teacher - center) / τ_t)``: one pass writes the centered, scaled logits, the fused
    softmax kernel turns them into probabilities (no gradient)."""
    with torch.no_grad():
        inverse = 1.0 / teacher_temp
        return torch.softmax(torch.add(center * -inverse, teacher, alpha=inverse), dim=-1)


@autocast_off
def dino_multicrop(
    student: Tensor | Sequence[Tensor],
    teacher: Tensor | Sequence[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    *,
    impl: str = "fast",
) -> Tensor:
    """DINO over every (teacher crop ``i``, student crop ``v ≠ i``) pair, averaged (Algorithm 1).

    Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", sec. 3.1
    multi-crop: the teacher sees the ``G`` global crops, the student all ``V`` crops, the first
    ``G`` of them the same global crops; a crop never predicts itself. The mean over the
    ``G · V - G`` pairs of :func:`dino`'s cross-entropy. The center is not updated here.

    Args:
        student: ``V`` student logits ``(N, K)``, as a ``(V, N, K)`` tensor or a sequence.
        teacher: ``G`` teacher logits ``(N, K)`` (``1 ≤ G ≤ V``), detached inside.
        center, student_temp, teacher_temp: as in :func:`dino`.
        impl: ``"reference"`` (pair by pair, both distributions materialized, as the official code
            and the public implementations) or ``"fast"`` (the teacher softmax once per crop; the
            cross-entropies from per-view sums, ``V + G`` dot products instead of ``G · (V - 1)``
            log-softmax products; one fused softmax per student crop, no exponential in the
            backward pass; a ``(V, N, K)`` student gets one ``(V, N, K)`` gradient).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    name = "dino_multicrop"
    check_impl(name, impl)
    students = _crops(name, "student", student)
    teachers = _crops(name, "teacher", teacher)
    if len(teachers) > len(students):
        raise ValueError(
            f"{name}: {len(teachers)} teacher crops but {len(students)} student crops "
            "(the teacher's crops are the student's first crops)"
        )
    if len(students) < 2:
        raise ValueError(f"{name}: need at least 2 student crops, got {len(students)}")
    crops = {f"student[{v}]": s for v, s in enumerate(students)}
    crops.update({f"teacher[{i}]": t for i, t in enumerate(teachers)})
    check_same_shape(name, **crops)
    k = students[0].shape[1]
    if center.shape not in {(k,), (1, k)}:
        raise ValueError(f"{name}: center must have shape ({k},), got {tuple(center.shape)}")
    check_batch(name, students[0].shape[0], DINO_MULTICROP.min_batch, DINO_MULTICROP.min_batch_why)
    check_positive(name, "student_temp", student_temp)
    check_positive(name, "teacher_temp", teacher_temp)
    dtype = compute_dtype(*students, *teachers, center)
    students = [upcast(s, dtype) for s in students]
    teachers = [upcast(t.detach(), dtype) for t in teachers]
    center = upcast(center.detach(), dtype).reshape(-1)
    if impl == "reference":
        terms = [
            dino(s, t, center, student_temp, teacher_temp, impl="reference")
            for i, t in enumerate(teachers)
            for v, s in enumerate(students)
            if v != i
        ]
        return torch.stack(terms).mean()
    targets = [_teacher_distribution(t, center, teacher_temp) for t in teachers]
    # A (V, N, K) student tensor goes in whole, so its gradient is one tensor, not V slices that
    # autograd would stack again (a full copy).
    source = upcast(student, dtype) if isinstance(student, Tensor) else students
    return paired_soft_cross_entropy(source, targets, 1.0 / student_temp, skip_same_index=True)


def _crops(name: str, what: str, crops: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(crops, Tensor):
        if crops.ndim != 3:
            raise ValueError(
                f"{name}: {what} must be (V, N, K) or a sequence of (N, K), got {tuple(crops.shape)}"
            )
        listed = list(crops.unbind(0))
    else:
        listed = list(crops)
    if not listed:
        raise ValueError(f"{name}: {what} has no crops")
    for v, crop in enumerate(listed):
        check_matrix(name, f"{what}[{v}]", crop)
    return listed


def _dino_inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    student = leaf(randn((p["N"], p["K"]), device, dtype, gen))
    teacher = randn((p["N"], p["K"]), device, dtype, gen)  # the teacher is detached
    center = randn((p["K"],), device, dtype, gen)
    return LossInputs((student, teacher, center), {"student_temp": 0.1, "teacher_temp": 0.04}, (student,))


def _multicrop_inputs(
    p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> LossInputs:
    """``V`` student crops as one ``(V, N, K)`` tensor, 2 teacher crops ``(2, N, K)``."""
    student = leaf(randn((p["V"], p["N"], p["K"]), device, dtype, gen))
    teacher = randn((2, p["N"], p["K"]), device, dtype, gen)
    center = randn((p["K"],), device, dtype, gen)
    return LossInputs((student, teacher, center), {"student_temp": 0.1, "teacher_temp": 0.04}, (student,))


DINO = LossSpec(
    NAME,
    dino,
    _dino_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(
        grid(N=[128], K=[8192]), grid(N=[256], K=[4096, 65536]), grid(N=[256, 1024], K=[65536])
    ),
    width_key="K",
    temperature_kw=("student_temp", "teacher_temp"),
)
# Caron et al.'s multi-crop: 2 global crops, 2 to 10 student crops (V); K = 65536 outputs.
DINO_MULTICROP = LossSpec(
    "dino_multicrop",
    dino_multicrop,
    _multicrop_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(
        grid(N=[64], K=[8192], V=[4]),
        grid(N=[64], K=[16384, 65536], V=[2, 10]),
        grid(N=[256], K=[65536], V=[2, 10]),
    ),
    width_key="K",
    test_params={"V": 4},
    temperature_kw=("student_temp", "teacher_temp"),
)
SPECS = (DINO, DINO_MULTICROP)
