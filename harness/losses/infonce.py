"""InfoNCE with a queue of negatives, the MoCo objective.

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR),
equation (1) and Algorithm 1; the loss itself is van den Oord et al. 2018, "Representation Learning
with Contrastive Predictive Coding".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from harness.losses._common import (
    autocast_disabled,
    autocast_off,
    check_batch,
    check_impl,
    check_matrix,
    check_positive,
    check_same_shape,
    compute_dtype,
    softmax_and_lse,
    upcast,
)
from harness.losses.declaration import (
    BenchShapes,
    LossInputs,
    LossSpec,
    Params,
    grid,
    leaf,
    randn,
    unit_rows,
)

NAME = "infonce"


@autocast_off
def infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.07, *, impl: str = "fast") -> Tensor:
    """MoCo's InfoNCE: for each query, the key of the same image against the queue of negatives.

    He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning".

    Args:
        q: ``(N, D)`` queries (normalized inside).
        k: ``(N, D)`` keys (normalized inside; the method detaches them, the loss does not).
        queue: ``(K, D)`` negatives whose rows are already unit-norm (used as given). K ≥ 1.
        temperature: τ > 0.
        impl: ``"reference"`` (logits ``[q·k, q queueᵀ] / τ`` concatenated into ``(N, 1 + K)``, then a
            cross-entropy with target 0) or ``"fast"`` (τ folded into q, no concatenation: a custom
            autograd function; on the CPU it goes through the queue in cache-sized blocks, each
            block's softmax and its product with the queue made at once and combined by an online
            log-sum-exp, so no ``(N, K)`` matrix is kept; elsewhere, or when the queue needs a
            gradient, the whole ``q queueᵀ`` turned into its softmax in place and kept).

    Returns:
        A scalar: ``mean_i [ log(exp(q_i·k_i/τ) + Σ_j exp(q_i·queue_j/τ)) - q_i·k_i/τ ]``; float32 for
        16-bit inputs, else the input dtype. Gradients reach ``queue`` too if it requires them.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "q", q)
    check_matrix(NAME, "k", k)
    check_matrix(NAME, "queue", queue)
    check_same_shape(NAME, q=q, k=k)
    check_batch(NAME, q.shape[0], SPEC.min_batch, SPEC.min_batch_why)
    if queue.shape[0] < 1:
        raise ValueError(f"{NAME}: the queue is empty, need at least one negative")
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"{NAME}: queue has dimension {queue.shape[1]}, the queries {q.shape[1]}")
    check_positive(NAME, "temperature", temperature)
    dtype = compute_dtype(q, k, queue)
    q, k, queue = upcast(q, dtype), upcast(k, dtype), upcast(queue, dtype)
    if impl == "reference":
        return _reference(q, k, queue, temperature)
    want_grad = torch.is_grad_enabled()  # the forward of a Function always runs without
    return _InfoNCE.apply(q, k, queue, 1.0 / temperature, want_grad)


def _reference(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


# Bytes of logits per block and per thread on the blockwise CPU path: the L2 cache of one core here
# (1 MiB: 1024 queue rows at N = 256 in float32, one thread; 2048 with two, each thread taking half
# the rows), so that a block's product, its softmax and the backward product over it run in cache.
# Measured at N = 256, K = 16384 (docs/LOSSES.md): 1 MiB a thread best at one thread, 2 MiB blocks
# at two; 4 MiB slower at either.
BLOCK_BYTES_PER_THREAD = 1 << 20
# The fewest queue rows per block, whatever N: thinner blocks make the products less efficient.
MIN_BLOCK_ROWS = 64
# F.normalize's floor of the norm (its default eps).
NORM_EPS = 1e-12


class _InfoNCE(torch.autograd.Function):
    """InfoNCE of raw ``q`` and ``k`` and ``scale`` = 1/τ; the normalizations happen inside.

    ``qs = q · scale/|q|`` and ``ks = k/|k|`` (norms floored at :data:`NORM_EPS`, as
    ``F.normalize``), so the logits are plain dot products. Their backward is in closed form: the
    gradient ``g`` reaching ``qs`` becomes ``scale/|q| · (g - q̂ (q̂·g))`` (no projection on a floored
    row), and ``q̂·g`` needs one row-wise dot product, ``qs·ks`` being ``l_pos`` already. Inside the
    function this replaces autograd's graph of the two normalizations, about fifteen small
    operations, the largest part of the fixed cost per call (a quarter of it: new / old 0.75-0.77
    at K = 1, one thread).

    Two paths for the queue, the same numbers (each equals the reference in float64;
    tests/test_losses.py):

    **Blockwise** (the CPU, when the queue needs no gradient: MoCo's case). The queue goes by blocks
    of rows (:data:`BLOCK_BYTES_PER_THREAD` of logits per thread). Per block ``b``: ``S_b = q
    queue_bᵀ`` into one reused buffer, its fused softmax in place (``P_b``; the block's row
    log-sum-exps ``lse_b = max - log(max p)`` as in :func:`softmax_and_lse`), and, when ``q`` will
    need a gradient, at once the backward product ``P_b queue_b`` while ``P_b`` is still in the
    cache; the block's ``(N,)``-sized bookkeeping runs after that product, in one group. The blocks combine online, as in
    flash-attention: ``run`` is the log-sum-exp over the blocks so far and ``acc = Σ_b exp(lse_b -
    run) P_b queue_b`` is rescaled by ``exp(run_old - run_new) ≤ 1`` whenever a block raises
    ``run``, so nothing overflows at any temperature. At the end ``acc`` is the queue's softmax
    times the queue, ``lse = logaddexp(run, l_pos)``, and the backward pass is a few ``(N, D)``
    operations. No ``(N, K)`` matrix is ever held: the only large buffer is one block. The forward
    pass does the backward's product too, so a forward that builds a graph it never differentiates
    pays for it; under ``torch.no_grad`` (``want_grad`` False) it is skipped.

    **Whole** (other devices, or a queue that needs a gradient, whose product ``P_negᵀ (q ·
    exp(lse_neg - lse))`` needs the rows' final log-sum-exps): ``q queueᵀ`` turned into its softmax
    by :func:`softmax_and_lse` (in place on the CPU), ``lse_neg = max - log(max p)``, ``lse =
    logaddexp(lse_neg, l_pos)``, and the ``(N, K)`` softmax kept for the backward products.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, queue: Tensor, scale: float, want_grad: bool
    ) -> Tensor:
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        # The normalizations too, as F.normalize does them (the norm floored at NORM_EPS), with their
        # backward in closed form below: autograd's graph of them cost as much as the loss's own
        # small operations.
        q_norm = torch.linalg.vector_norm(q, dim=1)
        k_norm = torch.linalg.vector_norm(k, dim=1)
        q_scale = q_norm.clamp_min(NORM_EPS).reciprocal_().mul_(scale)
        qs = q * q_scale.unsqueeze(1)  # norm 1/τ: the logits are plain dot products
        ks = k / k_norm.clamp_min(NORM_EPS).unsqueeze(1)
        l_pos = torch.linalg.vecdot(qs, ks)
        blockwise = q.device.type == "cpu" and not needs[2]
        if blockwise:
            run, saved = _blockwise(qs, queue, with_product=want_grad and needs[0])
        else:
            saved, run = softmax_and_lse(qs @ queue.T, overwrite=True)
        lse = torch.logaddexp(run, l_pos)
        ctx.blockwise = blockwise  # type: ignore[attr-defined]
        ctx.scale = scale  # type: ignore[attr-defined]
        # d loss / d l_neg = P_neg * exp(run - lse): the softmax over the queue, rescaled by the
        # queue's share of the whole partition function; d / d l_pos = exp(l_pos - lse) - 1.
        ctx.save_for_backward(
            qs,
            ks,
            q_scale,
            q_norm,
            k_norm,
            l_pos,
            None if blockwise else queue,
            saved,
            (run - lse).exp_(),
            (l_pos - lse).exp_(),
        )
        return (lse - l_pos).mean()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        qs, ks, q_scale, q_norm, k_norm, l_pos, queue, saved, share_neg, p_pos = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(qs):
            scale = grad / qs.shape[0]
            w_pos = (p_pos - 1).mul_(scale)
            w_neg = share_neg * scale
            needs = ctx.needs_input_grad  # type: ignore[attr-defined]
            grad_q = grad_k = grad_queue = None
            if needs[0]:
                # The gradient reaching qs is g = acc w_neg + ks w_pos (acc = P_neg queue), and
                # through qs = q · s/|q| (s = 1/τ) it becomes s/|q| (g - q̂ (q̂·g)), q̂ = qs/s; the
                # projection vanishes on rows whose norm was floored (the floor is a constant).
                # qs·g = w_neg (qs·acc) + w_pos l_pos needs no (N, D) temporary but one product.
                assert saved is not None  # a graph exists, so the forward computed the product
                acc = saved if ctx.blockwise else torch.mm(saved, queue)  # type: ignore[attr-defined]
                s = ctx.scale  # type: ignore[attr-defined]
                qg = torch.linalg.vecdot(qs, acc).mul_(w_neg).addcmul_(w_pos, l_pos)
                # times q_scale / -s² = -1 / (s |q|), in that form: 1/s² alone leaves float32's
                # range for τ beyond ~1e19 or below ~1e-19.
                qg.mul_(q_norm.ge(NORM_EPS)).div_(q_norm.clamp_min(NORM_EPS)).mul_(-1.0 / s)
                # s/|q| folded into the three row weights: three (N, D) passes, acc kept intact
                # for a retained graph.
                grad_q = torch.mul(acc, (w_neg * q_scale).unsqueeze(1))
                grad_q.addcmul_(ks, (w_pos * q_scale).unsqueeze(1)).addcmul_(qs, qg.unsqueeze(1))
            if needs[1]:
                # g_k = qs w_pos, and ks·g_k = w_pos l_pos: the same projection through ks = k/|k|.
                kg = l_pos.mul(k_norm.ge(NORM_EPS)).neg_()
                k_scale = w_pos / k_norm.clamp_min(NORM_EPS)
                grad_k = torch.addcmul(qs, ks, kg.unsqueeze(1)).mul_(k_scale.unsqueeze(1))
            if needs[2]:
                grad_queue = saved.T @ (qs * w_neg.unsqueeze(1))
            return grad_q, grad_k, grad_queue, None, None


def _blockwise(q: Tensor, queue: Tensor, *, with_product: bool) -> tuple[Tensor, Tensor | None]:
    """The queue's log-sum-exp per row ``(N,)``, and (``with_product``) ``softmax(q queueᵀ) queue``
    ``(N, D)``, one block of queue rows at a time (:class:`_InfoNCE`)."""
    n = q.shape[0]
    block_bytes = BLOCK_BYTES_PER_THREAD * torch.get_num_threads()
    rows = min(queue.shape[0], max(MIN_BLOCK_ROWS, block_bytes // (n * q.element_size())))
    buffer = torch.empty(n * rows, dtype=q.dtype, device=q.device)
    acc = part = run = None
    for block in queue.split(rows):
        logits = buffer[: n * block.shape[0]].view(n, block.shape[0])
        torch.mm(q, block.T, out=logits)
        # softmax_and_lse inlined: the block's log-sum-exp is top - log(max p).
        top = logits.amax(dim=1)
        torch.softmax(logits, dim=1, out=logits)
        p_max = logits.amax(dim=1)
        if run is None:
            if with_product:
                acc = torch.mm(logits, block)
                part = torch.empty_like(acc)
            run = top.sub_(p_max.log_())
            continue
        # The (N,)-sized operations after the product, together: a small operation right after a
        # large one runs slower (its code and operands were evicted), so one group of them per
        # block costs less than two (measured: 1.5% of the whole at K = 4096, one thread).
        if part is not None:
            torch.mm(logits, block, out=part)
        lse = top.sub_(p_max.log_())
        new = torch.logaddexp(run, lse)
        if acc is not None and part is not None:
            acc.mul_(run.sub_(new).exp_().unsqueeze(1)).addcmul_(part, lse.sub_(new).exp_().unsqueeze(1))
        run = new
    assert run is not None  # the queue has at least one row (checked by infonce)
    return run, acc


def _inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    q = leaf(randn((p["N"], p["D"]), device, dtype, gen))
    # MoCo detaches the keys and the queue is a buffer: gradients reach the queries only.
    k = randn((p["N"], p["D"]), device, dtype, gen)
    queue = unit_rows((p["K"], p["D"]), device, dtype, gen)
    return LossInputs((q, k, queue), {"temperature": 0.07}, (q,))


SPEC = LossSpec(
    NAME,
    infonce,
    _inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(
        grid(N=[256], K=[16384], D=[128]),
        grid(N=[256], K=[4096, 65536], D=[128]),
        grid(N=[256], K=[4096, 65536], D=[128]),
    ),
    test_params={"K": 11},
    scale_invariant=(0, 1),
    temperature_kw=("temperature",),
)
SPECS = (SPEC,)
