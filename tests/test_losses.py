"""The loss functions against independent formulas written here, and fast against reference.

Every loss of DESIGN.md's table is described once in ``SPECS`` (how to make its inputs, an
independent float64 formula with loops where clearer, which properties it has); the contract tests
run over that table. Tolerances are the issue's: float64 1e-8 relative, float32 1e-5 (relative to the
largest entry of the expected tensor, so near-zero gradient entries do not need a relative match).
"""

from __future__ import annotations

import importlib
import inspect
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from harness.losses import (
    LOSS_SPECS,
    LOSSES,
    LossSpec,
    alignment,
    byol,
    dino,
    dino_multicrop,
    infonce,
    nt_xent,
    sinkhorn,
    supcon,
    swav,
    swav_multicrop,
)

RTOL = {torch.float64: 1e-8, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Helpers


def assert_rel_close(
    actual: Tensor, expected: Tensor, rtol: float, *, atol: float = 0.0, what: str = ""
) -> None:
    """``max|actual - expected| ≤ rtol · max|expected| + atol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    error = float((a - e).abs().max()) if a.numel() else 0.0
    scale = float(e.abs().max()) if e.numel() else 0.0
    assert error <= rtol * scale + atol, f"{what}: max error {error:.3e} > {rtol:g} x {scale:.3e} + {atol:g}"


def grads(loss: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    return torch.autograd.grad(loss, list(inputs), allow_unused=True)


def leaves(args: Sequence[Any]) -> list[Tensor]:
    return [a for a in args if isinstance(a, Tensor) and a.requires_grad]


def fresh(args: Sequence[Any], dtype: torch.dtype | None = None) -> list[Any]:
    """Copies of ``args`` (cast to ``dtype``) that are new leaves where the originals need grad."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point():
            b = a.detach().to(dtype or a.dtype).clone()
            out.append(b.requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return out


def value_and_grads(
    fn: Callable[..., Tensor], args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Tensor, tuple]:
    args = fresh(args)
    loss = fn(*args, **kwargs)
    return loss, grads(loss, leaves(args))


def compare_impls(
    spec: Spec, args: Sequence[Any], kwargs: dict[str, Any], rtol: float, atol: float = 0.0
) -> None:
    ref_value, ref_grads = value_and_grads(spec.fn, args, {**kwargs, "impl": "reference"})
    for impl in spec.fast_impls:
        value, fast_grads = value_and_grads(spec.fn, args, {**kwargs, "impl": impl})
        assert value.dtype == ref_value.dtype
        assert_rel_close(value, ref_value, rtol, atol=atol, what=f"{spec.name} {impl} value")
        for index, (g, r) in enumerate(zip(fast_grads, ref_grads)):
            assert (g is None) == (r is None), f"{spec.name} {impl}: gradient presence of input {index}"
            if g is not None:
                assert_rel_close(g, r, rtol, atol=atol, what=f"{spec.name} {impl} grad {index}")


# ---------------------------------------------------------------------------------------------
# Independent formulas (float64, loops where clearer)


def unit(v: Tensor) -> Tensor:
    return v / v.norm()


def cos(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b) / (a.norm() * b.norm())


def formula_nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2
    total = z.new_zeros(())
    for i in range(n2):
        positive = (i + n) % n2
        denominator = sum(torch.exp(cos(z[i], z[j]) / temperature) for j in range(n2) if j != i)
        total = total - torch.log(torch.exp(cos(z[i], z[positive]) / temperature) / denominator)
    return total / n2


def formula_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.07) -> Tensor:
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        positive = torch.exp(cos(q[i], k[i]) / temperature)
        negatives = sum(torch.exp((unit(q[i]) @ queue[j]) / temperature) for j in range(queue.shape[0]))
        total = total - torch.log(positive / (positive + negatives))
    return total / q.shape[0]


def formula_inbatch_infonce(q: Tensor, k: Tensor, temperature: float = 1.0) -> Tensor:
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        positive = torch.exp(cos(q[i], k[i]) / temperature)
        everyone = sum(torch.exp(cos(q[i], k[j]) / temperature) for j in range(k.shape[0]))
        total = total - torch.log(positive / everyone)
    return total / q.shape[0]


def formula_byol(p: Tensor, z: Tensor) -> Tensor:
    return sum(2 - 2 * cos(p[i], z[i]) for i in range(p.shape[0])) / p.shape[0]


def standardize_columns(z: Tensor, eps: float) -> Tensor:
    n = z.shape[0]
    columns = []
    for j in range(z.shape[1]):
        x = z[:, j]
        mean = x.sum() / n
        var = ((x - mean) ** 2).sum() / n
        columns.append((x - mean) / torch.sqrt(var + eps))
    return torch.stack(columns, dim=1)


def formula_barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 5e-3) -> Tensor:
    n, d = z1.shape
    a = standardize_columns(z1, 1e-5)
    b = standardize_columns(z2, 1e-5)
    total = z1.new_zeros(())
    for i in range(d):
        for j in range(d):
            c = (a[:, i] * b[:, j]).sum() / n
            total = total + ((1 - c) ** 2 if i == j else lambd * c**2)
    return total


def formula_vicreg(
    z1: Tensor, z2: Tensor, sim_coeff: float = 25, std_coeff: float = 25, cov_coeff: float = 1
) -> Tensor:
    n, d = z1.shape
    invariance = ((z1 - z2) ** 2).sum() / (n * d)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        x = z - z.sum(dim=0) / n
        for j in range(d):
            std = torch.sqrt((x[:, j] ** 2).sum() / (n - 1) + 1e-4)
            variance = variance + torch.clamp(1 - std, min=0) / d / 2
        for i in range(d):
            for j in range(d):
                if i != j:
                    covariance = covariance + ((x[:, i] * x[:, j]).sum() / (n - 1)) ** 2 / d
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def formula_sinkhorn(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    n, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / epsilon) for i in range(n)] for j in range(k)]  # (K, N)
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        column_sums = [sum(q[j][i] for j in range(k)) for i in range(n)]
        q = [[q[j][i] / column_sums[i] / n for i in range(n)] for j in range(k)]
    return torch.tensor([[q[j][i] * n for j in range(k)] for i in range(n)], dtype=torch.float64)


def formula_swav(
    s1: Tensor, s2: Tensor, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3
) -> Tensor:
    q1 = formula_sinkhorn(s1.detach(), epsilon, sinkhorn_iterations).to(s1.dtype)
    q2 = formula_sinkhorn(s2.detach(), epsilon, sinkhorn_iterations).to(s1.dtype)
    total = s1.new_zeros(())
    for i in range(s1.shape[0]):
        log_p1 = s1[i] / temperature - torch.log(torch.exp(s1[i] / temperature).sum())
        log_p2 = s2[i] / temperature - torch.log(torch.exp(s2[i] / temperature).sum())
        total = total - 0.5 * ((q1[i] * log_p2).sum() + (q2[i] * log_p1).sum())
    return total / s1.shape[0]


def formula_dino(
    student: Tensor, teacher: Tensor, center: Tensor, student_temp: float = 0.1, teacher_temp: float = 0.04
) -> Tensor:
    total = student.new_zeros(())
    for i in range(student.shape[0]):
        t = torch.exp((teacher[i].detach() - center.detach()) / teacher_temp)
        t = t / t.sum()
        log_s = student[i] / student_temp - torch.log(torch.exp(student[i] / student_temp).sum())
        total = total - (t * log_s).sum()
    return total / student.shape[0]


def cross_entropy_rows(codes: Tensor, scores: Tensor, temperature: float) -> Tensor:
    """``mean_n -Σ_k codes_nk log softmax(scores_n / τ)_k``, row by row."""
    total = scores.new_zeros(())
    for i in range(scores.shape[0]):
        log_p = scores[i] / temperature - torch.log(torch.exp(scores[i] / temperature).sum())
        total = total - (codes[i] * log_p).sum()
    return total / scores.shape[0]


def formula_swav_multicrop(
    scores: Tensor,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    n_global: int = 2,
    queue_scores: list[Tensor] | None = None,
) -> Tensor:
    n = scores.shape[1]
    terms = []
    for i in range(n_global):
        block = scores[i].detach()
        if queue_scores is not None:
            block = torch.cat([block, queue_scores[i].detach().to(block.dtype)])
        codes = formula_sinkhorn(block.double(), epsilon, sinkhorn_iterations)[:n].to(scores.dtype)
        terms += [cross_entropy_rows(codes, scores[v], temperature) for v in range(scores.shape[0]) if v != i]
    return sum(terms) / len(terms)


def formula_dino_multicrop(
    student: Tensor, teacher: Tensor, center: Tensor, student_temp: float = 0.1, teacher_temp: float = 0.04
) -> Tensor:
    terms = [
        formula_dino(student[v], teacher[i], center, student_temp, teacher_temp)
        for i in range(teacher.shape[0])
        for v in range(student.shape[0])
        if v != i
    ]
    return sum(terms) / len(terms)


def formula_supcon(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    n, v, _ = z.shape
    anchors = [(z[i, view], int(labels[i])) for view in range(v) for i in range(n)]
    total = z.new_zeros(())
    counted = 0
    for i, (zi, li) in enumerate(anchors):
        denominator = sum(torch.exp(cos(zi, za) / temperature) for a, (za, _) in enumerate(anchors) if a != i)
        positives = [zp for p, (zp, lp) in enumerate(anchors) if p != i and lp == li]
        if not positives:
            continue
        log_probs = [torch.log(torch.exp(cos(zi, zp) / temperature) / denominator) for zp in positives]
        total = total - sum(log_probs) / len(positives)
        counted += 1
    return total / counted


def formula_triplet(a: Tensor, p: Tensor, n: Tensor, margin: float = 1.0) -> Tensor:
    terms = [
        torch.clamp(((a[i] - p[i]) ** 2).sum() - ((a[i] - n[i]) ** 2).sum() + margin, min=0)
        for i in range(a.shape[0])
    ]
    return sum(terms) / a.shape[0]


def formula_npair(a: Tensor, p: Tensor) -> Tensor:
    n = a.shape[0]
    total = a.new_zeros(())
    for i in range(n):
        total = total + torch.log(1 + sum(torch.exp(a[i] @ p[j] - a[i] @ p[i]) for j in range(n) if j != i))
    return total / n


def formula_alignment(z1: Tensor, z2: Tensor, alpha: float = 2) -> Tensor:
    return (
        sum(((unit(z1[i]) - unit(z2[i])) ** 2).sum() ** (alpha / 2) for i in range(z1.shape[0])) / z1.shape[0]
    )


def formula_uniformity(z: Tensor, t: float = 2) -> Tensor:
    n = z.shape[0]
    pairs = [
        torch.exp(-t * ((unit(z[i]) - unit(z[j])) ** 2).sum()) for i in range(n) for j in range(i + 1, n)
    ]
    return torch.log(sum(pairs) / len(pairs))


# ---------------------------------------------------------------------------------------------
# The table of losses: each declaration (harness.losses.LOSS_SPECS: implementations, input builder,
# minimum batch, properties) with the independent formula written here.


FORMULAS: dict[str, Callable[..., Tensor]] = {
    "nt_xent": formula_nt_xent,
    "infonce": formula_infonce,
    "inbatch_infonce": formula_inbatch_infonce,
    "byol": formula_byol,
    "barlow_twins": formula_barlow_twins,
    "vicreg": formula_vicreg,
    "swav": formula_swav,
    "swav_multicrop": formula_swav_multicrop,
    "dino": formula_dino,
    "dino_multicrop": formula_dino_multicrop,
    "supcon": formula_supcon,
    "triplet": formula_triplet,
    "npair": formula_npair,
    "alignment": formula_alignment,
    "uniformity": formula_uniformity,
}


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64, grad: bool = True) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)


@dataclass(frozen=True)
class Spec:
    declared: LossSpec
    formula: Callable[..., Tensor]

    @property
    def name(self) -> str:
        return self.declared.name

    @property
    def fn(self) -> Callable[..., Tensor]:
        return self.declared.fn

    @property
    def min_batch(self) -> int:
        return self.declared.min_batch

    @property
    def symmetric(self) -> bool:
        return self.declared.symmetric

    @property
    def scale_invariant(self) -> tuple[int, ...]:
        return self.declared.scale_invariant

    @property
    def fast_impls(self) -> tuple[str, ...]:
        return self.declared.fast_impls

    @property
    def temperature_kw(self) -> tuple[str, ...]:
        return self.declared.temperature_kw


SPECS: list[Spec] = [Spec(declared, FORMULAS[name]) for name, declared in LOSS_SPECS.items() if declared.loss]
BY_NAME = {spec.name: spec for spec in SPECS}
ALL = [pytest.param(spec, id=spec.name) for spec in SPECS]


def with_impl(specs: list[Spec]) -> list[Any]:
    return [
        pytest.param(spec, impl, id=f"{spec.name}-{impl}")
        for spec in specs
        for impl in ("reference", *spec.fast_impls)
    ]


def inputs(
    spec: Spec, n: int = 6, d: int = 5, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[list[Any], dict[str, Any]]:
    """The declared builder's inputs at batch ``n`` and width ``d``, every floating-point argument a
    leaf that requires grad (the contract compares every gradient, not only the trained ones)."""
    made = spec.declared.inputs(spec.declared.test_params_for(n, d), "cpu", dtype, seed)
    args = [
        a.detach().clone().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a
        for a in made.args
    ]
    return args, dict(made.kwargs)


# ---------------------------------------------------------------------------------------------
# The contract


DESIGN_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "nt_xent": [("z1", None), ("z2", None), ("temperature", 0.5)],
    "infonce": [("q", None), ("k", None), ("queue", None), ("temperature", 0.07)],
    "inbatch_infonce": [("q", None), ("k", None), ("temperature", 1.0)],
    "byol": [("p", None), ("z", None)],
    "barlow_twins": [("z1", None), ("z2", None), ("lambd", 5e-3)],
    "vicreg": [("z1", None), ("z2", None), ("sim_coeff", 25), ("std_coeff", 25), ("cov_coeff", 1)],
    "swav": [
        ("scores1", None),
        ("scores2", None),
        ("temperature", 0.1),
        ("epsilon", 0.05),
        ("sinkhorn_iterations", 3),
    ],
    "dino": [
        ("student", None),
        ("teacher", None),
        ("center", None),
        ("student_temp", 0.1),
        ("teacher_temp", 0.04),
    ],
    "supcon": [("z", None), ("labels", None), ("temperature", 0.1)],
    # Beyond DESIGN.md's table: the multi-crop forms that SwAV and DINO train through (issue 10).
    "swav_multicrop": [("scores", None), ("temperature", 0.1), ("epsilon", 0.05), ("sinkhorn_iterations", 3)],
    "dino_multicrop": [
        ("student", None),
        ("teacher", None),
        ("center", None),
        ("student_temp", 0.1),
        ("teacher_temp", 0.04),
    ],
    "triplet": [("anchor", None), ("positive", None), ("negative", None), ("margin", 1.0)],
    "npair": [("anchor", None), ("positive", None)],
    "alignment": [("z1", None), ("z2", None), ("alpha", 2)],
    "uniformity": [("z", None), ("t", 2)],
}


def test_registry__has_every_loss_of_the_design_table() -> None:
    assert set(LOSSES) == set(DESIGN_SIGNATURES)
    assert {spec.name for spec in SPECS} == set(LOSSES)


@pytest.mark.parametrize("name", sorted(DESIGN_SIGNATURES))
def test_signature__matches_the_design_table(name: str) -> None:
    parameters = inspect.signature(LOSSES[name]).parameters
    positional = [p for p in parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [p for p, _ in DESIGN_SIGNATURES[name]]
    for parameter, (_, default) in zip(positional, DESIGN_SIGNATURES[name]):
        if default is not None:
            assert parameter.default == default, f"{name}.{parameter.name}"
    assert parameters["impl"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["impl"].default == "fast"


def test_sinkhorn__signature() -> None:
    parameters = inspect.signature(sinkhorn).parameters
    assert list(parameters)[:3] == ["scores", "epsilon", "iterations"]
    assert parameters["impl"].default == "fast"


def test_import__has_no_side_effects_and_no_triton() -> None:
    code = "import sys, harness.losses; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("spec", "impl"), with_impl(SPECS))
def test_loss__matches_independent_formula(spec: Spec, impl: str) -> None:
    args, kwargs = inputs(spec)
    value, got = value_and_grads(spec.fn, args, {**kwargs, "impl": impl})
    expected, want = value_and_grads(spec.formula, args, kwargs)
    assert value.ndim == 0
    assert_rel_close(value, expected, 1e-8, what=f"{spec.name} value")
    for index, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            assert_rel_close(g, w, 1e-8, what=f"{spec.name} grad {index}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("spec", ALL)
def test_loss__fast_equals_reference(spec: Spec, dtype: torch.dtype) -> None:
    for seed, (n, d) in enumerate([(8, 5), (16, 32), (33, 7)]):
        args, kwargs = inputs(spec, n, d, dtype, seed)
        compare_impls(spec, args, kwargs, RTOL[dtype])


@pytest.mark.parametrize("spec", ALL)
def test_loss__returns_a_scalar_of_the_input_dtype(spec: Spec) -> None:
    for dtype in (torch.float32, torch.float64):
        args, kwargs = inputs(spec, dtype=dtype)
        for impl in ("reference", *spec.fast_impls):
            value = spec.fn(*args, **kwargs, impl=impl)
            assert value.shape == () and value.dtype == dtype


@pytest.mark.parametrize("spec", ALL)
def test_loss__batch_of_two(spec: Spec) -> None:
    args, kwargs = inputs(spec, n=2, d=5)
    compare_impls(spec, args, kwargs, 1e-8)
    assert_rel_close(spec.fn(*args, **kwargs), spec.formula(*args, **kwargs), 1e-8, what=spec.name)


@pytest.mark.parametrize("spec", ALL)
def test_loss__dimension_one(spec: Spec) -> None:
    args, kwargs = inputs(spec, n=6, d=1)
    # Gradients can be exactly zero in one dimension (the sphere is two points): an absolute floor.
    compare_impls(spec, args, kwargs, 1e-8, atol=1e-12)
    assert_rel_close(
        spec.fn(*args, **kwargs), spec.formula(*args, **kwargs), 1e-8, atol=1e-12, what=spec.name
    )


@pytest.mark.parametrize("spec", ALL)
def test_loss__duplicated_embeddings(spec: Spec) -> None:
    args, kwargs = inputs(spec, n=6, d=5)
    duplicated: list[Any] = []
    first = next(a for a in args if isinstance(a, Tensor) and a.is_floating_point())
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point() and a.shape == first.shape:
            # Every view identical to the first, and row 1 a copy of row 0.
            b = first.detach().clone()
            b[1] = b[0]
            duplicated.append(b.requires_grad_(a.requires_grad))
        else:
            duplicated.append(a)
    # Values may be exactly zero here (alignment of identical views): an absolute floor.
    compare_impls(spec, duplicated, kwargs, 1e-8, atol=1e-12)


@pytest.mark.parametrize("spec", ALL)
def test_loss__non_contiguous_inputs(spec: Spec) -> None:
    args, kwargs = inputs(spec, n=7, d=6)
    strided: list[Any] = []
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point() and a.ndim >= 2:
            # Same values, transposed storage: a column-major view of a contiguous copy.
            b = a.detach().transpose(0, -1).contiguous().transpose(0, -1)
            assert not b.is_contiguous()
            strided.append(b.requires_grad_(a.requires_grad))
        else:
            strided.append(a)
    ref_value, ref_grads = value_and_grads(spec.fn, args, {**kwargs, "impl": "reference"})
    for impl in spec.fast_impls:
        value = spec.fn(*strided, **kwargs, impl=impl)
        got = grads(value, leaves(strided))
        assert_rel_close(value, ref_value, 1e-8, what=spec.name)
        for g, r in zip(got, ref_grads):
            if r is not None:
                assert_rel_close(g, r, 1e-8, what=f"{spec.name} grad")


@pytest.mark.parametrize("spec", ALL)
def test_loss__bf16_inputs(spec: Spec) -> None:
    args32, kwargs = inputs(spec, n=16, d=8, dtype=torch.float32)
    args16 = fresh(args32, torch.bfloat16)
    ref_value, ref_grads = value_and_grads(spec.fn, args16, {**kwargs, "impl": "reference"})
    assert ref_value.dtype == torch.float32  # computed in float32
    for impl in spec.fast_impls:
        value, got = value_and_grads(spec.fn, args16, {**kwargs, "impl": impl})
        assert value.dtype == torch.float32
        assert_rel_close(value, ref_value, 1e-5, what=f"{spec.name} {impl}")
        for g, r in zip(got, ref_grads):
            if r is not None:
                assert g.dtype == torch.bfloat16
                # Same float32 math, then one rounding to bf16 (8 bits): within a few bf16 ulps.
                assert_rel_close(g, r, 2e-2, what=f"{spec.name} {impl} grad")
    # And close to the float32 loss of the same (bf16-rounded) numbers.
    exact = spec.fn(*fresh(args16, torch.float32), **kwargs)
    assert_rel_close(ref_value, exact, 1e-5, what=f"{spec.name} bf16 vs float32")


@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS if s.temperature_kw])
def test_loss__temperatures_from_0_01_to_10(spec: Spec, temperature: float) -> None:
    args, kwargs = inputs(spec, n=6, d=5)
    kwargs = {**kwargs, **dict.fromkeys(spec.temperature_kw, temperature)}
    compare_impls(spec, args, kwargs, 1e-8)
    assert_rel_close(spec.fn(*args, **kwargs), spec.formula(*args, **kwargs), 1e-8, what=spec.name)
    args32 = fresh(args, torch.float32)
    for impl in ("reference", *spec.fast_impls):
        value = spec.fn(*args32, **kwargs, impl=impl)
        assert torch.isfinite(value)
        grads_ = grads(value, leaves(args32))
        assert all(g is None or torch.isfinite(g).all() for g in grads_)
    # float32 log-mean-exp of nearly equal terms (uniformity at t = 0.01) cancels to ~1e-7 absolute
    # in both implementations: an absolute floor at that level.
    compare_impls(spec, args32, kwargs, 1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.01, 10.0])
def test_nt_xent__large_logits_do_not_overflow_in_float32(temperature: float) -> None:
    # Aligned views: the positive logit is 1/τ = 100 at τ = 0.01, exp(100) overflows float32.
    z = torch.randn(64, 16)
    z1 = z.clone().requires_grad_()
    z2 = (z + 1e-3 * torch.randn(64, 16)).requires_grad_()
    for impl in ("reference", "fast", "chunked"):
        value = nt_xent(z1, z2, temperature, impl=impl)
        assert torch.isfinite(value), impl
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(value, [z1, z2]))


@pytest.mark.parametrize(
    ("spec", "n"),
    [
        pytest.param(spec, n, id=f"{spec.name}-{n}")
        for spec in SPECS
        for n in sorted({0, spec.min_batch - 1})
        if spec.name != "supcon" or n == 0
    ],
)
def test_loss__too_small_batch_is_a_value_error(spec: Spec, n: int) -> None:
    # One below the declared minimum, and an empty batch: the function enforces its declaration.
    args, kwargs = inputs(spec, n=n, d=4)
    for impl in ("reference", *spec.fast_impls):
        with pytest.raises(ValueError, match="too small"):
            spec.fn(*args, **kwargs, impl=impl)


def test_supcon__too_small_batch_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="too small"):
        supcon(torch.randn(1, 1, 4), torch.tensor([0]))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_supcon__one_view_without_shared_labels_is_a_value_error(impl: str) -> None:
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon(torch.randn(4, 1, 3), torch.tensor([0, 1, 2, 3]), impl=impl)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_supcon__one_view_skips_anchors_without_positives(impl: str) -> None:
    z = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 7, 3, 9, 7])  # 9 has no positive: left out of the mean
    assert_rel_close(supcon(z, labels, 0.2, impl=impl), formula_supcon(z, labels, 0.2), 1e-8)


@pytest.mark.parametrize("spec", ALL)
def test_loss__unknown_impl_is_a_value_error(spec: Spec) -> None:
    args, kwargs = inputs(spec)
    with pytest.raises(ValueError, match="impl"):
        spec.fn(*args, **kwargs, impl="turbo")


def test_loss__mismatched_shapes_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="dimensions"):
        byol(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)
    with pytest.raises(ValueError, match="queue"):
        infonce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(0, 3))


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize(("spec", "impl"), with_impl([s for s in SPECS if s.symmetric]))
def test_loss__symmetric_in_the_two_views(spec: Spec, impl: str) -> None:
    args, kwargs = inputs(spec, n=8, d=6)
    swapped = [args[1], args[0], *args[2:]]
    assert_rel_close(spec.fn(*swapped, **kwargs, impl=impl), spec.fn(*args, **kwargs, impl=impl), 1e-10)


@pytest.mark.parametrize(("spec", "impl"), with_impl([s for s in SPECS if s.scale_invariant]))
def test_loss__cosine_losses_ignore_the_scale_of_the_inputs(spec: Spec, impl: str) -> None:
    args, kwargs = inputs(spec, n=8, d=6)
    scaled = list(args)
    for position, factor in zip(spec.scale_invariant, (1e3, 1e-3)):
        scaled[position] = args[position].detach() * factor
    # Per-row scales too: each row of the first argument by a different positive factor.
    rows = torch.logspace(-2, 2, args[0].shape[0], dtype=torch.float64).reshape(-1, *[1] * (args[0].ndim - 1))
    scaled[spec.scale_invariant[0]] = scaled[spec.scale_invariant[0]] * rows
    assert_rel_close(spec.fn(*scaled, **kwargs, impl=impl), spec.fn(*args, **kwargs, impl=impl), 1e-10)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_sinkhorn__codes_sum_to_one_per_sample(impl: str) -> None:
    scores = torch.tanh(torch.randn(32, 10))
    codes = sinkhorn(scores, 0.05, 3, impl=impl)
    assert codes.shape == (32, 10)
    assert (codes >= 0).all()
    assert_rel_close(codes.sum(dim=1), torch.ones(32), 1e-5)
    # Equipartition: after enough rounds every prototype gets about N / K of the mass.
    balanced = sinkhorn(scores, 0.05, 500, impl=impl)
    assert_rel_close(balanced.sum(dim=0), torch.full((10,), 3.2), 1e-3)


@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sinkhorn__fast_equals_reference_and_formula(iterations: int, dtype: torch.dtype) -> None:
    scores = torch.tanh(torch.randn(9, 7, dtype=torch.float64)).to(dtype)
    reference = sinkhorn(scores, 0.05, iterations, impl="reference")
    fast = sinkhorn(scores, 0.05, iterations, impl="fast")
    assert_rel_close(fast, reference, RTOL[dtype])
    assert_rel_close(reference.double(), formula_sinkhorn(scores.double(), 0.05, iterations), RTOL[dtype])


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_sinkhorn__huge_scores_do_not_overflow_and_carry_no_gradient(impl: str) -> None:
    scores = (50 * torch.randn(16, 5)).requires_grad_()
    codes = sinkhorn(scores, 0.05, 3, impl=impl)
    assert torch.isfinite(codes).all()
    assert not codes.requires_grad
    assert_rel_close(codes.sum(dim=1), torch.ones(16), 1e-5)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_swav__codes_carry_no_gradient(impl: str) -> None:
    # With the codes constant, d loss / d scores1 = (softmax(s1/τ) - q2) / (2Nτ): rows sum to zero.
    args, kwargs = inputs(BY_NAME["swav"], n=8, d=6)
    g1, _ = torch.autograd.grad(swav(*args, **kwargs, impl=impl), args)
    assert_rel_close(g1.sum(dim=1), torch.zeros(8, dtype=torch.float64), 0.0, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_dino__teacher_and_center_receive_no_gradient(impl: str) -> None:
    student = torch.randn(8, 6, requires_grad=True)
    teacher = torch.randn(8, 6, requires_grad=True)
    center = torch.randn(6, requires_grad=True)
    loss = dino(student, teacher, center, impl=impl)
    g_student, g_teacher, g_center = torch.autograd.grad(loss, [student, teacher, center], allow_unused=True)
    assert g_student is not None and float(g_student.abs().max()) > 0
    assert g_teacher is None and g_center is None


def test_infonce__gradient_reaches_the_queue_only_if_asked() -> None:
    args, kwargs = inputs(BY_NAME["infonce"])
    q, k, queue = args
    for impl in ("reference", "fast"):
        loss = infonce(q, k.detach(), queue.detach(), **kwargs, impl=impl)
        g_q, g_k, g_queue = torch.autograd.grad(loss, [q, k, queue], allow_unused=True)
        assert g_q is not None and g_k is None and g_queue is None


def _infonce_blocks_inputs(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """6 queries, a 23-row queue: blocks of 4 rows (under the patched block size) and a remainder of
    3. The queue is sorted by similarity to query 0, so its largest logit comes in the last block
    (the running log-sum-exp rises and ``acc`` is rescaled), and query 1's is the negated query 0's,
    so its largest comes in the first."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    q[1] = -q[0]
    k = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    queue = torch.nn.functional.normalize(torch.randn(23, 5, generator=gen, dtype=torch.float64), dim=1)
    queue = queue[(queue @ q[0]).argsort()]
    return q.to(dtype), k.to(dtype), queue.to(dtype)


@pytest.mark.parametrize("temperature", [0.001, 0.07, 10.0])
def test_infonce__blockwise_path_equals_reference_across_blocks(
    monkeypatch: pytest.MonkeyPatch, temperature: float
) -> None:
    infonce_module = importlib.import_module("harness.losses.infonce")
    monkeypatch.setattr(infonce_module, "BLOCK_BYTES_PER_THREAD", 0)  # blocks of MIN_BLOCK_ROWS rows
    monkeypatch.setattr(infonce_module, "MIN_BLOCK_ROWS", 4)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        q, k, queue = _infonce_blocks_inputs(dtype)
        ref_q, ref_k, ref_queue = _infonce_blocks_inputs(torch.float64)
        # q and k need gradients, the queue does not: MoCo's case, the blockwise path.
        expected, expected_grads = value_and_grads(
            infonce,
            [ref_q.requires_grad_(), ref_k.requires_grad_(), ref_queue],
            {"temperature": temperature, "impl": "reference"},
        )
        value, got = value_and_grads(
            infonce, [q.requires_grad_(), k.requires_grad_(), queue], {"temperature": temperature}
        )
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in got)
        assert_rel_close(value, expected, rtol, what=f"{dtype} value")
        for index, (g, r) in enumerate(zip(got, expected_grads)):
            assert_rel_close(g, r, rtol, what=f"{dtype} grad {index}")
        # Without gradients the forward skips the backward's product and gives the same value.
        with torch.no_grad():
            assert_rel_close(infonce(q, k, queue, temperature), expected, rtol, what=f"{dtype} no_grad")
    if temperature == 0.07:  # and the formula agrees (it is slow; one temperature suffices)
        assert_rel_close(
            expected, formula_infonce(ref_q, ref_k, ref_queue, temperature), 1e-10, what="formula"
        )


@pytest.mark.parametrize("queue_grad", [False, True])
def test_infonce__normalization_backward_equals_autograd_at_the_norm_floor(queue_grad: bool) -> None:
    """The fast path normalizes q and k inside its autograd function, with the backward in closed
    form: equal to autograd through F.normalize, also on rows whose norm is zero or below its
    1e-12 floor (there the projection vanishes), on the blockwise path and (a queue needing a
    gradient) the whole one. Compared row by row: the floored rows' gradients are ~1e12 larger."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    q[1] = 0.0
    q[3] *= 1e-14
    k[2] = 0.0
    k[4] *= 3e-13
    queue = torch.nn.functional.normalize(torch.randn(9, 4, generator=gen, dtype=torch.float64), dim=1)
    args = [q.requires_grad_(), k.requires_grad_(), queue.requires_grad_(queue_grad)]
    expected, expected_grads = value_and_grads(infonce, args, {"temperature": 0.2, "impl": "reference"})
    value, got = value_and_grads(infonce, args, {"temperature": 0.2})
    assert_rel_close(value, expected, 1e-12, what="value")
    assert len(got) == len(expected_grads) == (3 if queue_grad else 2)
    for index, (g, r) in enumerate(zip(got, expected_grads)):
        for row in range(g.shape[0]):
            assert_rel_close(g[row], r[row], 1e-10, what=f"grad {index} row {row}")


def test_infonce__blockwise_path_keeps_no_n_by_k_matrix() -> None:
    """The memory property of the CPU path: what the backward pass keeps is O(N·D), never (N, K)."""
    q = torch.randn(64, 16, requires_grad=True)
    k = torch.randn(64, 16)
    queue = torch.nn.functional.normalize(torch.randn(4096, 16), dim=1)
    loss = infonce(q, k, queue)
    assert type(loss.grad_fn).__name__ == "_InfoNCEBackward"
    saved = loss.grad_fn.saved_tensors  # type: ignore[union-attr]
    assert max(t.numel() for t in saved if t is not None) <= 64 * 16  # q, k, the (N, D) product
    # A queue that needs a gradient takes the whole path, which keeps the (N, K) softmax for it.
    queue.requires_grad_()
    loss = infonce(q, k, queue)
    grad_queue = torch.autograd.grad(loss, queue)[0]
    expected = torch.autograd.grad(infonce(q, k, queue, impl="reference"), queue)[0]
    assert_rel_close(grad_queue, expected, 1e-5, what="queue grad")


@pytest.mark.parametrize("temperature", [1e-20, 1e25])
def test_infonce__query_gradient_finite_and_exact_at_extreme_temperatures(temperature: float) -> None:
    """The normalization's backward folds 1/τ into one factor -1/(s|q|) (s = 1/τ): 1/s² alone
    would leave float32's range at these temperatures (inf, or the projection lost to 0)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 16, generator=gen, requires_grad=True)
    k = torch.randn(8, 16, generator=gen)
    queue = torch.nn.functional.normalize(torch.randn(32, 16, generator=gen), dim=1)
    grad = torch.autograd.grad(infonce(q, k, queue, temperature), q)[0]
    q64 = q.detach().double().requires_grad_()
    expected = torch.autograd.grad(infonce(q64, k.double(), queue.double(), temperature, impl="reference"), q64)[0]
    assert torch.isfinite(grad).all()
    assert_rel_close(grad.double(), expected, 1e-5, what="q grad")


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 12, 100])
def test_nt_xent__chunked_equals_reference_for_any_chunk_size(chunk_size: int) -> None:
    args, kwargs = inputs(BY_NAME["nt_xent"], n=6, d=4)
    spec = BY_NAME["nt_xent"]
    compare_impls(spec, args, {**kwargs, "chunk_size": chunk_size}, 1e-8)


def test_nt_xent__fast_switches_to_row_blocks_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.losses import _lse

    calls: list[str] = []
    original = _lse._ChunkedSelfLSE.apply

    def spy(*args: Any) -> Tensor:
        calls.append("chunked")
        return original(*args)

    monkeypatch.setattr(_lse, "FULL_MATRIX_LIMIT", 100)
    monkeypatch.setattr(_lse._ChunkedSelfLSE, "apply", spy)
    args, kwargs = inputs(BY_NAME["nt_xent"], n=8, d=4)
    compare_impls(BY_NAME["nt_xent"], args, kwargs, 1e-8)
    assert calls


def test_nt_xent__bad_chunk_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), impl="chunked", chunk_size=0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 6),
    temperature=st.floats(0.01, 10.0),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_nt_xent__fast_and_chunked_equal_reference_on_random_shapes(
    n: int, d: int, temperature: float, chunk: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = randn(gen, n, d), randn(gen, n, d)
    compare_impls(
        BY_NAME["nt_xent"], [z1, z2], {"temperature": temperature, "chunk_size": chunk}, 1e-8, atol=1e-12
    )


@pytest.mark.parametrize("n", [3, 20])
def test_barlow_twins_and_vicreg__gram_and_direct_paths_agree(n: int) -> None:
    # n=3, d=12 takes the Gram identity (2N < D); n=20, d=12 the (D, D) matrix.
    for name in ("barlow_twins", "vicreg"):
        args, kwargs = inputs(BY_NAME[name], n=n, d=12)
        compare_impls(BY_NAME[name], args, kwargs, 1e-8)
        compare_impls(BY_NAME[name], fresh(args, torch.float32), kwargs, 1e-5)


# ---------------------------------------------------------------------------------------------
# Memory of the chunked NT-Xent (a behavioural property: deterministic byte counts)


def saved_tensor_bytes(fn: Callable[[], Tensor], exclude: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(storages.values())


def test_nt_xent__chunked_keeps_under_a_quarter_of_the_reference_memory() -> None:
    # The size: B = 4096, D = 128. The reference keeps several (2B, 2B) matrices.
    z1 = torch.randn(4096, 128, requires_grad=True)
    z2 = torch.randn(4096, 128, requires_grad=True)
    reference = saved_tensor_bytes(lambda: nt_xent(z1, z2, impl="reference"), [z1, z2])
    chunked = saved_tensor_bytes(lambda: nt_xent(z1, z2, impl="chunked"), [z1, z2])
    fast = saved_tensor_bytes(lambda: nt_xent(z1, z2, impl="fast"), [z1, z2])
    matrix = (2 * 4096) ** 2 * 4
    assert reference >= matrix
    assert fast <= 1.1 * matrix  # the softmax, once
    assert chunked <= reference / 4
    assert chunked <= matrix / 16  # O(N·D), not O(N²)


def test_nt_xent__chunked_peak_memory_is_under_a_quarter_of_the_reference() -> None:
    from harness.bench.timing import cpu_peak_supported, peak_extra_bytes

    if not cpu_peak_supported():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    z1 = torch.randn(4096, 128, requires_grad=True)
    z2 = torch.randn(4096, 128, requires_grad=True)
    cpu = torch.device("cpu")

    def run(impl: str) -> Callable[[], object]:
        return lambda: torch.autograd.grad(nt_xent(z1, z2, impl=impl), [z1, z2])

    reference = peak_extra_bytes(run("reference"), cpu)
    chunked = min(peak_extra_bytes(run("chunked"), cpu) for _ in range(2))
    assert reference is not None and chunked is not None
    assert reference > 4 * (2 * 4096) ** 2 * 4 / 2  # several (2B, 2B) float32 matrices at once
    assert chunked <= reference / 4


@pytest.mark.parametrize("spec", ALL)
def test_loss__ignores_an_enclosing_autocast(spec: Spec) -> None:
    args, kwargs = inputs(spec, n=8, d=5, dtype=torch.float32)
    expected, want = value_and_grads(spec.fn, args, {**kwargs, "impl": "reference"})
    for impl in ("reference", *spec.fast_impls):
        copies = fresh(args)
        # The forward pass under autocast, the backward pass outside (PyTorch's recommended use).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = spec.fn(*copies, **kwargs, impl=impl)
        got = grads(value, leaves(copies))
        assert value.dtype == torch.float32
        assert_rel_close(value, expected, 1e-5, what=f"{spec.name} {impl}")
        for g, w in zip(got, want):
            if w is not None:
                assert_rel_close(g, w, 1e-5, what=f"{spec.name} {impl} grad")


@pytest.mark.parametrize("spec", ALL)
def test_loss__backward_inside_autocast_does_not_break_the_custom_functions(spec: Spec) -> None:
    args, kwargs = inputs(spec, n=8, d=5, dtype=torch.float32)
    for impl in spec.fast_impls:
        copies = fresh(args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = spec.fn(*copies, **kwargs, impl=impl)
            got = grads(value, leaves(copies))
        assert all(g is None or (g.dtype == torch.float32 and torch.isfinite(g).all()) for g in got)


@pytest.mark.parametrize("epsilon", [0.002, 0.01, 0.05, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sinkhorn__small_epsilon_neither_underflows_nor_differs(epsilon: float, dtype: torch.dtype) -> None:
    # Cosine scores; at ε = 0.002 the exponents span 1000, far beyond float32's range.
    scores = (
        F.normalize(torch.randn(64, 16, dtype=torch.float64), dim=1)
        @ F.normalize(torch.randn(10, 16, dtype=torch.float64), dim=1).T
    )
    scores = scores.to(dtype)
    reference = sinkhorn(scores, epsilon, 3, impl="reference")
    fast = sinkhorn(scores, epsilon, 3, impl="fast")
    for codes in (reference, fast):
        assert torch.isfinite(codes).all()
        assert_rel_close(codes.sum(dim=1), torch.ones(64, dtype=dtype), RTOL[dtype] * 10)
    assert_rel_close(fast, reference, RTOL[dtype] * 10)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_alignment__fast_keeps_float32_precision_for_nearly_aligned_pairs(alpha: float) -> None:
    # Pairs 1e-4 apart: the cosine form's float32 rounding under a power below 2 was 33% off at α = 1.
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(1000, 128, generator=generator)
    z2 = z1 + 1e-4 * torch.randn(1000, 128, generator=generator)
    exact = formula_alignment(z1.double(), z2.double(), alpha)
    fast = alignment(z1, z2, alpha, impl="fast")
    torch.testing.assert_close(fast.double(), exact, rtol=1e-3, atol=1e-7)
    assert float(alignment(z1, z1, alpha, impl="fast")) == 0.0


@pytest.mark.parametrize("spec", ALL)
def test_loss__zero_width_embeddings_are_a_value_error(spec: Spec) -> None:
    args, kwargs = inputs(spec)
    empty = [
        a[..., :0] if isinstance(a, Tensor) and a.ndim >= 2 and a.is_floating_point() else a for a in args
    ]
    with pytest.raises(ValueError, match="empty feature dimension"):
        spec.fn(*empty, **kwargs)


# ---------------------------------------------------------------------------------------------
# Multi-crop SwAV and DINO (the kernels the methods train through)


MULTICROP_SWAV_CASES = [
    pytest.param({"N": 6, "K": 5, "V": 2, "Q": 0}, {}, id="two-crops"),
    pytest.param({"N": 6, "K": 5, "V": 8, "Q": 0}, {}, id="eight-crops"),
    pytest.param({"N": 5, "K": 7, "V": 4, "Q": 9}, {}, id="queue"),
    pytest.param({"N": 6, "K": 5, "V": 3, "Q": 0}, {"n_global": 1}, id="one-global"),
    pytest.param({"N": 6, "K": 5, "V": 4, "Q": 4}, {"sinkhorn_iterations": 0}, id="no-sinkhorn-round"),
    pytest.param({"N": 6, "K": 5, "V": 4, "Q": 0}, {"temperature": 0.07}, id="no-kernel-power"),
    pytest.param({"N": 6, "K": 5, "V": 4, "Q": 0}, {"temperature": 0.05}, id="kernel-power-one"),
]


@pytest.mark.parametrize(("params", "options"), MULTICROP_SWAV_CASES)
def test_swav_multicrop__equals_formula_and_reference_in_float64(
    params: dict[str, int], options: dict[str, Any]
) -> None:
    made = LOSS_SPECS["swav_multicrop"].inputs(params, dtype=torch.float64)
    kwargs = {**made.kwargs, **options}
    spec = BY_NAME["swav_multicrop"]
    compare_impls(spec, list(made.args), kwargs, 1e-10)
    value, got = value_and_grads(swav_multicrop, made.args, {**kwargs, "impl": "fast"})
    expected, want = value_and_grads(formula_swav_multicrop, made.args, kwargs)
    assert_rel_close(value, expected, 1e-8, what="value")
    assert_rel_close(got[0], want[0], 1e-8, what="grad")


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_swav_multicrop__two_crops_equal_swav(impl: str) -> None:
    made = LOSS_SPECS["swav_multicrop"].inputs({"N": 7, "K": 6, "V": 2, "Q": 0}, dtype=torch.float64)
    scores = made.args[0]
    stacked = swav_multicrop(scores, impl=impl)
    listed = swav_multicrop([scores[0], scores[1]], impl=impl)
    assert_rel_close(stacked, swav(scores[0], scores[1], impl=impl), 1e-12)
    assert_rel_close(listed, stacked, 1e-12)


@pytest.mark.parametrize("views", [2, 4, 10])
@pytest.mark.parametrize(
    "options", [{}, {"student_temp": 0.5, "teacher_temp": 0.01}], ids=["default", "sharp"]
)
def test_dino_multicrop__equals_formula_and_reference_in_float64(views: int, options: dict[str, Any]) -> None:
    made = LOSS_SPECS["dino_multicrop"].inputs({"N": 5, "K": 7, "V": views}, dtype=torch.float64)
    kwargs = {**made.kwargs, **options}
    compare_impls(BY_NAME["dino_multicrop"], list(made.args), kwargs, 1e-10)
    value, got = value_and_grads(dino_multicrop, made.args, {**kwargs, "impl": "fast"})
    expected, want = value_and_grads(formula_dino_multicrop, made.args, kwargs)
    assert_rel_close(value, expected, 1e-8, what="value")
    assert_rel_close(got[0], want[0], 1e-8, what="grad")


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_dino_multicrop__one_pair_equals_dino_and_lists_equal_stacks(impl: str) -> None:
    made = LOSS_SPECS["dino_multicrop"].inputs({"N": 6, "K": 5, "V": 3}, dtype=torch.float64)
    student, teacher, center = made.args
    single = dino_multicrop(student[:2], teacher[:1], center, impl=impl)
    assert_rel_close(single, dino(student[1], teacher[0], center, impl=impl), 1e-12)
    listed = dino_multicrop(list(student), list(teacher), center, impl=impl)
    assert_rel_close(listed, dino_multicrop(student, teacher, center, impl=impl), 1e-12)


@pytest.mark.parametrize("views", [2, 5])
def test_dino_multicrop__stacked_and_listed_students_get_the_same_gradient(views: int) -> None:
    # A (V, N, K) student goes into the fast kernel whole (one gradient tensor), a list view by view.
    made = LOSS_SPECS["dino_multicrop"].inputs({"N": 6, "K": 9, "V": views}, dtype=torch.float64)
    student, teacher, center = made.args
    stacked, (stacked_grad,) = value_and_grads(dino_multicrop, [student, teacher, center], made.kwargs)
    crops = [crop.detach().clone().requires_grad_() for crop in student]
    listed = dino_multicrop(crops, teacher, center, **made.kwargs)
    listed_grads = torch.autograd.grad(listed, crops)
    assert_rel_close(listed, stacked, 1e-12, what="value")
    assert_rel_close(torch.stack(listed_grads), stacked_grad, 1e-12, what="grad")
    _, (want,) = value_and_grads(formula_dino_multicrop, [student, teacher, center], made.kwargs)
    assert_rel_close(stacked_grad, want, 1e-8, what="grad vs formula")


@pytest.mark.parametrize("epsilon", [0.001, 0.005, 0.05])
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 10.0])
def test_swav_multicrop__extreme_settings_stay_finite_and_equal(
    epsilon: float, scale: float, temperature: float
) -> None:
    # Unnormalized prototypes (scale 30) and ε = 0.001 put the exponents beyond float32's range:
    # lightly's linear-domain Sinkhorn returns NaN there; the fast path falls back to the log domain.
    made = LOSS_SPECS["swav_multicrop"].inputs({"N": 32, "K": 20, "V": 4, "Q": 16}, dtype=torch.float32)
    scores = (made.args[0].detach() * scale).requires_grad_()
    queue = [q * scale for q in made.kwargs["queue_scores"]]
    kwargs = {"temperature": temperature, "epsilon": epsilon, "queue_scores": queue}
    ref_value, (ref_grad,) = value_and_grads(swav_multicrop, [scores], {**kwargs, "impl": "reference"})
    value, (grad,) = value_and_grads(swav_multicrop, [scores], {**kwargs, "impl": "fast"})
    assert torch.isfinite(ref_value) and torch.isfinite(ref_grad).all()
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert_rel_close(value, ref_value, 1e-5, what="value")
    assert_rel_close(grad, ref_grad, 1e-4, what="grad")


@pytest.mark.parametrize("threads", [1, 2])
def test_swav_multicrop__tiny_epsilon_takes_the_log_domain_path(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    import importlib

    torch.set_num_threads(threads)  # 2: both crops' problems at once; 1: one after the other
    together = threads > 1

    # The module, not the function: harness.losses re-exports a function named swav.
    swav_module = importlib.import_module("harness.losses.swav")

    taken: list[list[bool]] = []
    original = swav_module._sinkhorn_linear

    def spy(*args: Any) -> tuple[Tensor, Tensor]:
        codes, healthy = original(*args)
        taken.append(healthy.tolist())
        return codes, healthy

    monkeypatch.setattr(swav_module, "_sinkhorn_linear", spy)
    made = LOSS_SPECS["swav_multicrop"].inputs({"N": 16, "K": 10, "V": 3, "Q": 0}, dtype=torch.float32)
    scores = made.args[0].detach() * 30
    swav_multicrop(scores, epsilon=0.05)
    # cosine-range exponents: the linear domain
    assert taken == ([[True, True]] if together else [[True], [True]])
    taken.clear()
    fast = swav_multicrop(scores, epsilon=0.0005)
    assert taken == ([[False, False]] if together else [[False], [False]])  # exponents over 10⁵: log domain
    assert_rel_close(fast, swav_multicrop(scores, epsilon=0.0005, impl="reference"), 1e-5)
    # One global crop in the linear domain and the other in the log domain, in one call.
    mixed = torch.cat([made.args[0].detach()[:1], scores[1:]])
    taken.clear()
    fast = swav_multicrop(mixed, epsilon=0.005)
    assert taken == ([[True, False]] if together else [[True], [False]])
    assert_rel_close(fast, swav_multicrop(mixed, epsilon=0.005, impl="reference"), 1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("queue", [0, 12])
def test_swav_multicrop__mixed_linear_and_log_domain_crops_equal_reference_in_float64(
    queue: int, threads: int
) -> None:
    # The global crops' Sinkhorn problems run stacked (with two threads) or one by one; a crop whose
    # column sums underflow takes the log domain alone, and its gradient and value still match.
    torch.set_num_threads(threads)
    made = LOSS_SPECS["swav_multicrop"].inputs({"N": 12, "K": 9, "V": 3, "Q": queue}, dtype=torch.float64)
    scores = made.args[0].detach().clone()
    scores[1] *= 400  # ε = 0.005: exponents of ±8·10⁴, beyond float64's range for this crop only
    scores.requires_grad_()
    kwargs = {**made.kwargs, "epsilon": 0.005}
    if queue:
        kwargs["queue_scores"] = [made.kwargs["queue_scores"][0], made.kwargs["queue_scores"][1] * 400]
    ref_value, (ref_grad,) = value_and_grads(swav_multicrop, [scores], {**kwargs, "impl": "reference"})
    value, (grad,) = value_and_grads(swav_multicrop, [scores], {**kwargs, "impl": "fast"})
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert_rel_close(value, ref_value, 1e-10, what="value")
    assert_rel_close(grad, ref_grad, 1e-9, what="grad")


@pytest.mark.parametrize("student_temp", [0.01, 0.1, 10.0])
@pytest.mark.parametrize("teacher_temp", [0.001, 0.04, 10.0])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_dino_multicrop__extreme_settings_stay_finite_and_equal(
    student_temp: float, teacher_temp: float, scale: float
) -> None:
    made = LOSS_SPECS["dino_multicrop"].inputs({"N": 16, "K": 50, "V": 5}, dtype=torch.float32)
    student = (made.args[0].detach() * scale).requires_grad_()
    teacher, center = made.args[1] * scale, made.args[2] * scale
    kwargs = {"student_temp": student_temp, "teacher_temp": teacher_temp}
    ref_value, (ref_grad,) = value_and_grads(
        dino_multicrop, [student, teacher, center], {**kwargs, "impl": "reference"}
    )
    value, (grad,) = value_and_grads(dino_multicrop, [student, teacher, center], {**kwargs, "impl": "fast"})
    assert torch.isfinite(ref_value) and torch.isfinite(ref_grad).all()
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert_rel_close(value, ref_value, 1e-5, what="value")
    assert_rel_close(grad, ref_grad, 1e-4, what="grad")


def test_multicrop__bad_arguments_are_value_errors() -> None:
    scores = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_multicrop(scores[:1])
    with pytest.raises(ValueError, match="n_global"):
        swav_multicrop(scores, n_global=4)
    with pytest.raises(ValueError, match="one tensor per global crop"):
        swav_multicrop(scores, queue_scores=[torch.randn(6, 5)])
    with pytest.raises(ValueError, match="prototypes"):
        swav_multicrop(scores, queue_scores=[torch.randn(6, 4), torch.randn(6, 4)])
    with pytest.raises(ValueError, match=r"\(V, N, K\)"):
        swav_multicrop(torch.randn(4, 5))
    with pytest.raises(ValueError, match="same shape"):
        swav_multicrop([torch.randn(4, 5), torch.randn(3, 5)])
    with pytest.raises(ValueError, match="teacher crops"):
        dino_multicrop(scores[:2], scores, torch.zeros(5))
    with pytest.raises(ValueError, match="center"):
        dino_multicrop(scores, scores[:2], torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2 student crops"):
        dino_multicrop(scores[:1], scores[:1], torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# float32 accuracy at the benchmark shapes (issue 12: within 1e-6 of float64)


def float32_error(name: str, params: dict[str, int]) -> float:
    """Relative error of the fast float32 value against the float64 one on the same numbers."""
    declared = LOSS_SPECS[name]
    made = declared.inputs(params, dtype=torch.float32)
    with torch.no_grad():
        value32 = declared.fn(*made.args, **made.kwargs)
        args64 = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in made.args]
        kwargs64 = {
            key: [q.double() for q in value] if key == "queue_scores" else value
            for key, value in made.kwargs.items()
        }
        value64 = declared.fn(*args64, **kwargs64)
    return abs(float(value32) - float(value64)) / abs(float(value64))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "params"),
    [
        pytest.param(name, dict(params), id=f"{name}-{','.join(f'{k}={v}' for k, v in params.items())}")
        for name, declared in LOSS_SPECS.items()
        if declared.loss
        for params in declared.shapes.cpu
    ],
)
def test_loss__float32_within_1e_6_of_float64_at_the_cpu_benchmark_shapes(
    name: str, params: dict[str, int]
) -> None:
    assert float32_error(name, params) <= 1e-6


def _gpu_shape_params() -> list[Any]:
    # VICReg at N = 4096, D = 8192 is left out: its float64 side alone is two 4096 x 8192² products
    # (4.5 min on this 2-core machine); it shares frobenius_sq_cross with Barlow Twins, which is tested
    # there, and VICReg itself is tested at every other shape.
    return [
        pytest.param(name, dict(p), id=f"{name}-N={p['N']},D={p['D']}")
        for name in ("barlow_twins", "vicreg")
        for p in LOSS_SPECS[name].shapes.cuda
        if not (name == "vicreg" and (p["N"], p["D"]) == (4096, 8192))
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), _gpu_shape_params())
def test_barlow_twins_and_vicreg__float32_within_1e_6_at_the_gpu_shapes(
    name: str, params: dict[str, int]
) -> None:
    # Up to N = 4096, D = 8192 (a 256 MiB float64 matrix per input): one long float32 dot product
    # for the Frobenius norm was 5e-6 to 4e-3 off here before blockwise_dot.
    assert float32_error(name, params) <= 1e-6


def test_declarations__every_loss_reaches_the_bench_cases_and_the_contract_tests() -> None:
    from harness.bench.cases import KERNELS, select_cases

    assert KERNELS == LOSS_SPECS  # the benchmark's kernels are the declarations themselves
    losses = {name for name, declared in LOSS_SPECS.items() if declared.loss}
    assert set(LOSSES) == losses and {spec.name for spec in SPECS} == losses
    assert set(FORMULAS) == losses, "every declared loss needs its independent formula here"
    for name, declared in LOSS_SPECS.items():
        assert len(declared.shapes.quick) == 1, name  # the CI gate: one small case per kernel
        assert [case.params for case in select_cases([name], "cpu")] == list(declared.shapes.cpu)
        for params in (*declared.shapes.quick, *declared.shapes.cpu, *declared.shapes.cuda):
            assert declared.batch_key in params and declared.width_key in params, (name, params)
        made = declared.inputs(declared.test_params_for(declared.min_batch + 1, 3))
        assert all(t.requires_grad for t in made.grad_inputs)


@pytest.mark.parametrize("k", [3000, 65536])
def test_softmax__in_place_on_the_cpu_equals_out_of_place(k: int) -> None:
    """The fast InfoNCE and soft cross-entropy run ``torch.softmax(x, dim=1, out=x)`` on the CPU, an
    aliasing PyTorch does not document: a kernel change that broke it would fail here first."""
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(0)) * 20
    expected = torch.softmax(x, dim=1)
    torch.softmax(x, dim=1, out=x)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["swav", "swav_multicrop", "dino", "dino_multicrop"])
def test_paired_soft_ce__second_backward_pass_gives_the_same_gradient(name: str) -> None:
    # The fast kernel writes its gradients over the forward pass's softmax buffers; a second
    # backward pass through the same graph (retain_graph) recomputes them from the inputs.
    declared = LOSS_SPECS[name]
    made = declared.inputs(declared.test_params_for(8, 12), dtype=torch.float64)
    loss = declared.fn(*made.args, **made.kwargs, impl="fast")
    first = torch.autograd.grad(loss, made.grad_inputs, retain_graph=True)
    second = torch.autograd.grad(loss, made.grad_inputs)
    reference = declared.fn(*made.args, **made.kwargs, impl="reference")
    want = torch.autograd.grad(reference, made.grad_inputs)
    for a, b, w in zip(first, second, want, strict=True):
        assert torch.equal(a, b)
        assert_rel_close(a, w, 1e-10, what="grad vs reference")
