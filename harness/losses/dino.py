"""DINO's self-distillation loss for one (student crop, teacher crop) pair.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (ICCV),
equations (2)-(3) and Algorithm 1.
"""

from __future__ import annotations

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
from harness.losses._soft_ce import soft_target_cross_entropy

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
            autograd function that keeps only the student's softmax and whose backward pass is
            ``(softmax(s / τ_s) - t) / (N τ_s)``).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "student", student)
    check_matrix(NAME, "teacher", teacher)
    check_same_shape(NAME, student=student, teacher=teacher)
    if center.shape not in {(student.shape[1],), (1, student.shape[1])}:
        raise ValueError(f"{NAME}: center must have shape ({student.shape[1]},), got {tuple(center.shape)}")
    check_batch(NAME, student.shape[0], 1, "an empty batch has no mean")
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
    with torch.no_grad():
        t = F.softmax((teacher - center) / teacher_temp, dim=-1)
    return soft_target_cross_entropy(student, t, 1.0 / student_temp)
