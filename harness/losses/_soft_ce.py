"""Soft-target cross-entropy over pairs of views, as one custom autograd function.

Shared by the fast SwAV and DINO (two views or multi-crop). There are ``V`` prediction views with
scores ``s_v`` of shape ``(N, K)`` and ``G ≤ V`` target distributions ``t_i`` (no gradient), and the
loss is the mean over the pairs ``(i, v)`` (all of them, or those with ``v ≠ i`` when
``skip_same_index``) of ``mean_n Σ_k -t_i,nk log softmax(scale · s_v,n)_k``.

Written per view instead of per pair (the official loops and the public implementations compute
``G · (V - 1)`` log-softmax products):

- ``-Σ_k t_k log softmax(x)_k = lse(x) Σ_k t_k - t·x``, so a view's terms need only its row
  log-sum-exp and ``U_v · s_v`` with ``U_v = Σ_{i paired with v} t_i`` (the other global crop's
  target for two global crops, ``T = Σ_i t_i`` for a local crop): ``V`` dot products, not
  ``G · V``. Each dot product is blockwise (:func:`harness.losses._common.blockwise_dot`), so
  float32 keeps about 1e-7 relative.
- The forward pass runs the fused softmax kernel once per view on the scaled scores
  (``p = softmax(scale · s)``, in place on the CPU: measured 0.77-0.87 of the time of the shift, ``exp_`` and sum it
  replaced on standard-normal scores, 0.1 where many exponentials are float32 subnormals, which
  ``exp_`` computes slowly; docs/LOSSES.md) and reads the row log-sum-exp off it without another exponential: at the row
  maximum ``p = 1 / Σ_k exp(x_k - max)``, so ``lse = max - log(max_k p)`` (``max_k p ≥ 1/K``). The
  backward pass is two elementwise passes, ``∂/∂s_v = coef · W_v ⊙ p_v - coef · U_v``, with ``W_v``
  the targets' mass paired with the view (``G - 1`` or ``G`` for rows that sum to one) and
  ``coef = scale / (pairs · N)``, in place over the softmax buffers, which become the gradients:
  writing a new ``(V, N, K)`` tensor (cold memory) took 0.9 ms of SwAV's 4.5 at N = 256 on two
  threads, against 0.25 ms for the same passes on warm buffers. A second backward pass
  (``retain_graph``) recomputes the softmax from the saved inputs.
- The targets may be computed inside the forward pass from the views' softmax and its shifts
  (``targets_fn``): ``p = exp(scale · (s - shift))`` with ``shift = lse / scale``, so SwAV's
  Sinkhorn kernel ``exp((s - shift) / ε)`` is ``p ** (τ / ε)``, a square at the default τ = 0.1,
  ε = 0.05, not a second exponential.
- A ``(V, N, K)`` tensor of scores gets one ``(V, N, K)`` gradient (its softmax is computed whole,
  into one buffer): no per-view gradients that autograd would stack again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from harness.losses._common import autocast_disabled, blockwise_dot, softmax_and_lse

# (views, probs, shifts) -> targets, with probs = exp(scale · (view - shift)) row by row: called
# under no_grad inside the forward pass.
TargetsFn = Callable[[list[Tensor], list[Tensor], list[Tensor]], list[Tensor]]


def pair_counts(n_views: int, n_targets: int, skip_same_index: bool) -> list[int]:
    """How many targets each view is paired with."""
    return [n_targets - (1 if skip_same_index and v < n_targets else 0) for v in range(n_views)]


class _Pairing:
    """The targets paired with each view, as sums that are built once and only where needed."""

    def __init__(self, targets: Sequence[Tensor], skip_same_index: bool) -> None:
        self.targets = list(targets)
        self.skip = skip_same_index
        self._total: Tensor | None = None

    @property
    def total(self) -> Tensor:
        if self._total is None:
            total = self.targets[0]
            for t in self.targets[1:]:
                total = total + t
            self._total = total
        return self._total

    def is_reduced(self, v: int) -> bool:
        return self.skip and v < len(self.targets)

    def dot(self, v: int, s: Tensor) -> Tensor:
        """``U_v · s`` in float64, without forming ``U_v`` for three or more targets."""
        g = len(self.targets)
        if self.is_reduced(v) and g == 2:
            return blockwise_dot(self.targets[1 - v], s, dtype=torch.float64)
        dot = blockwise_dot(self.total, s, dtype=torch.float64)
        if self.is_reduced(v):
            dot = dot - blockwise_dot(self.targets[v], s, dtype=torch.float64)
        return dot

    def sum_for(self, v: int) -> Tensor:
        """``U_v`` itself (a new tensor only for three or more targets)."""
        if not self.is_reduced(v):
            return self.total
        if len(self.targets) == 2:
            return self.targets[1 - v]
        return self.total - self.targets[v]


class _PairedSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        scale: float,
        skip_same_index: bool,
        unit_rows: bool,
        targets_fn: TargetsFn | None,
        stacked: bool,
        n_views: int,
        *tensors: Tensor,
    ) -> Tensor:
        views = list(tensors[0].unbind(0)) if stacked else list(tensors[:n_views])
        given = tensors[1:] if stacked else tensors[n_views:]
        n = views[0].shape[0]
        buffers, lses = _softmaxes(tensors[0] if stacked else views, scale)
        probs = list(buffers[0].unbind(0)) if stacked else buffers
        shifts = [lse / scale for lse in lses]
        if targets_fn is not None:
            with torch.no_grad():
                targets = [t.contiguous() for t in targets_fn(views, probs, shifts)]
        else:
            targets = [t.contiguous() for t in given]
        counts = pair_counts(len(views), len(targets), skip_same_index)
        n_pairs = sum(counts)
        if n_pairs == 0:
            raise ValueError("no (target, view) pair to average over: need a view other than the target's")
        pairing = _Pairing(targets, skip_same_index)
        masses = None if unit_rows else torch.stack([t.sum(dim=1) for t in targets])
        lse_sum = views[0].new_zeros((), dtype=torch.float64)
        cross = views[0].new_zeros((), dtype=torch.float64)
        for v, s in enumerate(views):
            if counts[v] == 0:  # one target, skipped for its own view: this view has no term
                continue
            if masses is None:
                lse_sum += lses[v].sum(dtype=torch.float64) * counts[v]
            else:
                lse_sum += torch.dot(lses[v], _paired_mass(masses, v, pairing)).double()
            cross += pairing.dot(v, s.contiguous())
        loss = (lse_sum - scale * cross) / (n_pairs * n)
        # The softmax buffers become the gradients: the first backward pass writes over them and
        # drops this reference (so autograd takes them as .grad without a copy); the inputs are
        # kept to recompute them for a second backward pass (retain_graph).
        ctx.save_for_backward(masses, *targets, *tensors[: 1 if stacked else n_views])
        ctx.buffers = buffers  # type: ignore[attr-defined]
        ctx.meta = (  # type: ignore[attr-defined]
            scale,
            skip_same_index,
            stacked,
            len(views),
            len(targets),
            len(given),
            n_pairs,
            n,
        )
        return loss.to(views[0].dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale, skip_same_index, stacked, n_views, n_targets, n_given, n_pairs, n = ctx.meta  # type: ignore[attr-defined]
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        masses = saved[0]
        targets = saved[1 : 1 + n_targets]
        buffers: list[Tensor] | None = ctx.buffers  # type: ignore[attr-defined]
        ctx.buffers = None  # type: ignore[attr-defined]
        if buffers is None:  # a second backward pass: the first one wrote over the softmax
            inputs = saved[1 + n_targets :]
            with autocast_disabled(inputs[0]):
                buffers = _softmaxes(inputs[0] if stacked else inputs, scale)[0]
        probs = list(buffers[0].unbind(0)) if stacked else buffers
        counts = pair_counts(n_views, n_targets, skip_same_index)
        pairing = _Pairing(targets, skip_same_index)
        with autocast_disabled(probs[0]):
            coef = grad * (scale / (n_pairs * n))
            minus_coef = -coef
            grads: list[Tensor | None] = []
            # In place over the softmax buffers: no new (V, N, K) tensor, no cold memory to write.
            for v, out in enumerate(probs):
                if counts[v] == 0:
                    out.zero_()
                    grads.append(out if stacked else None)
                    continue
                if masses is None:
                    out.mul_(coef * counts[v])
                else:
                    out.mul_((_paired_mass(masses, v, pairing) * coef).unsqueeze(1))
                out.addcmul_(pairing.sum_for(v), minus_coef)
                grads.append(out)
        view_grads: tuple[Tensor | None, ...] = (buffers[0],) if stacked else tuple(grads)
        # Nothing for the six options, and the given targets never receive a gradient.
        return (None,) * 6 + view_grads + (None,) * n_given


def _softmaxes(scores: Tensor | Sequence[Tensor], scale: float) -> tuple[list[Tensor], list[Tensor]]:
    """The softmax buffers (one ``(V, N, K)`` tensor for stacked scores, else one per view) and
    each view's row log-sum-exp."""
    if isinstance(scores, Tensor):
        p, lse = softmax_and_lse(scores, scale)
        return [p], list(lse.unbind(0))
    pairs = [softmax_and_lse(s, scale) for s in scores]
    return [p for p, _ in pairs], [lse for _, lse in pairs]


def _paired_mass(masses: Tensor, v: int, pairing: _Pairing) -> Tensor:
    total = masses.sum(dim=0)
    return total - masses[v] if pairing.is_reduced(v) else total


def paired_soft_cross_entropy(
    views: Tensor | Sequence[Tensor],
    targets: Sequence[Tensor] | TargetsFn,
    scale: float,
    *,
    skip_same_index: bool,
    unit_rows: bool = True,
) -> Tensor:
    """Mean over the (target ``i``, view ``v``) pairs of ``mean_n Σ_k -t_i log softmax(scale · s_v)``.

    ``views``: a ``(V, N, K)`` tensor or ``V`` score matrices ``(N, K)``. ``targets``: ``G``
    matrices ``(N, K)`` (no gradient), or a function ``(views, probs, shifts) -> targets`` called
    in the forward pass with each view's ``softmax(scale · s) = exp(scale · (s - shift))`` and its
    row shifts (``log-sum-exp / scale``).
    ``skip_same_index`` leaves out the pairs ``v == i`` (multi-crop: a crop never predicts itself).
    ``unit_rows``: the caller guarantees every target row sums to one (softmax outputs, Sinkhorn
    codes after at least one round); otherwise the row masses are computed.
    """
    stacked = isinstance(views, Tensor)
    view_list: list[Tensor] = [views] if stacked else list(views)  # type: ignore[list-item]
    n_views = views.shape[0] if stacked else len(view_list)  # type: ignore[union-attr]
    if callable(targets):
        return _PairedSoftCE.apply(scale, skip_same_index, unit_rows, targets, stacked, n_views, *view_list)
    detached = [t.detach() for t in targets]
    return _PairedSoftCE.apply(
        scale, skip_same_index, unit_rows, None, stacked, n_views, *view_list, *detached
    )
