"""One trial on several processes: the few collective operations the methods need.

``torch.distributed`` with NCCL on CUDA and gloo on the CPU (so every test runs on a CPU-only
machine). A method makes itself correct across ranks by two calls, and nothing else changes:

- :func:`gather` right before its loss: the per-sample outputs of every rank, concatenated in rank
  order, **with gradients** (the backward pass sums each slice's gradient over the ranks). Every
  rank then computes the loss of the *global* batch: SimCLR's and SupCon's negatives, NNCLR's
  support set, MoCo's keys for the queue, Barlow Twins' cross-correlation, VICReg's covariance,
  SwAV's Sinkhorn codes and DINO's center all see the global batch, as in the papers' code.
  With DistributedDataParallel's gradient averaging this is exactly the single-process gradient:
  a parameter before the gather gets ``world × (its rank's share)`` on each rank, averaged to the
  sum of the shares; a parameter after it (SwAV's prototypes) gets the full gradient on each rank.
- :func:`synchronize_batch_norm` on the model: batch norms normalize with the statistics of the
  global batch (``nn.SyncBatchNorm`` on CUDA; :class:`GlobalBatchNorm` on the CPU, where PyTorch's
  SyncBatchNorm does not run), so the forward pass equals the single-process one too.

Outside an initialized process group both are the identity, so a single-process trial pays nothing.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each ``(n, ...)`` tensor of this rank -> the ``(world * n, ...)`` tensor of every rank, in rank
    order, differentiable (``torch.distributed.nn.functional.all_gather``). Tensors that need no
    gradient (labels, momentum keys) are gathered without autograd."""
    if not is_distributed():
        return tensors
    return tuple(_GatherWithGradient.apply(t) if t.requires_grad else _all_gather(t) for t in tensors)


def _all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather forward; backward: the gradient of the whole gathered tensor summed over the ranks
    (each rank computed the same global loss from it), then this rank's rows (the "GatherLayer" of
    the SimCLR, SupCon and solo-learn code)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rows = tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a (detached) tensor over the ranks: logged values of a rank-local loss."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def average_gradients(parameters: Callable[[], Iterable[nn.Parameter]] | Iterable[nn.Parameter]) -> None:
    """DistributedDataParallel's reduction, done by hand: every gradient replaced by its mean over
    the ranks (for loops that do not run the model through DDP's forward). The gradients are
    flattened into one buffer per device and dtype, so a step costs one all-reduce per buffer
    rather than one per parameter (DDP's buckets, without its overlap with the backward pass)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for parameter in parameters() if callable(parameters) else parameters:
        if parameter.grad is not None:
            groups.setdefault((parameter.grad.device, parameter.grad.dtype), []).append(parameter.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view(grad.shape))


def control_group() -> Any:
    """The process group for small host-side messages (a checkpoint's path, the peak memory): the
    default group with gloo; a gloo group beside NCCL's, so those messages need no GPU copy."""
    if dist.get_backend() == "gloo":
        return None
    if _CONTROL is None:
        raise RuntimeError("no control group: join the process group with process_group(...)")
    return _CONTROL


_CONTROL: Any = None


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object); the identity without a group."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def sum_over_ranks(value: float) -> float:
    """The sum of a host-side number over the ranks (each rank's peak memory -> the trial's)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, group=control_group())
    return float(total)


def broadcast_module(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` set to rank 0's (what DDP does at construction), so
    the ranks start from one model even if building it drew different random numbers."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_contiguous():
                dist.broadcast(tensor.data, src=0)
            else:  # channels-last weights: the collectives take contiguous tensors
                copy = tensor.data.contiguous()
                dist.broadcast(copy, src=0)
                tensor.data.copy_(copy)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all ranks, for any backend (gloo included): the per-channel
    sum, then the sum of squared deviations from the global mean, of each rank are all-reduced,
    differentiably, and every rank normalizes with the same mean and biased variance; the running
    statistics follow ``nn.BatchNorm``'s update with the global count (unbiased variance). Outside training, or without a process group, it is
    ``nn.BatchNorm``. Same parameters and buffers as the batch norm it replaces."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        count_local = input.numel() // input.shape[1]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        channels = input.shape[1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        # Two passes, as nn.BatchNorm computes them: the mean, then the squared deviations from it.
        # (E[x^2] - mean^2 in one pass loses float32 digits to cancellation when |mean| >> std,
        # which a trial's first loss already shows at 1e-5.)
        stats = _SumOverRanks.apply(torch.cat([x.sum(dims), x.new_full((1,), float(count_local))]))
        count = stats[-1]
        mean = stats[:channels] / count
        centered = x - mean.view(shape)
        variance = _SumOverRanks.apply((centered * centered).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                )
                n = float(count)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = variance.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(variance + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = centered * scale.view(shape)
        if self.affine:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; backward: the gradient summed over the ranks too, since every rank
    computed the same global loss from the sum."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def synchronize_batch_norm(module: nn.Module, device_type: str) -> nn.Module:
    """Every batch norm of ``module`` replaced by one over the global batch (in place where possible;
    returns the module): ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            floats = [t for t in (*child.parameters(), *child.buffers()) if t.is_floating_point()]
            if floats:  # the same device and dtype (a float64 model stays float64)
                replacement.to(device=floats[0].device, dtype=floats[0].dtype)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            if child.affine:
                replacement.weight.requires_grad_(child.weight.requires_grad)
                replacement.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, replacement)
        else:
            synchronize_batch_norm(child, device_type)
    return module


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def process_group(rank_: int, world: int, port: int, backend: str = "gloo") -> Iterator[None]:
    """Join a process group on this machine (``127.0.0.1:port``) for the duration of the block.
    With NCCL, set this rank's CUDA device first (``torch.cuda.set_device``)."""
    global _CONTROL
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    # Generous: while rank 0 evaluates (intermediate k-NN) the others wait in their next collective.
    # A rank that dies is noticed by the parent process (harness.train), not by this timeout.
    dist.init_process_group(backend, rank=rank_, world_size=world, timeout=timedelta(hours=2))
    if backend != "gloo":  # made by every rank at one point (new_group is collective), used later
        _CONTROL = dist.new_group(backend="gloo")
    try:
        yield
    finally:
        _CONTROL = None
        dist.destroy_process_group()


def run_ranks(function: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Run ``function(*args)`` in ``world`` fresh processes joined in one process group; returns each
    rank's return value, in rank order. A rank that raises fails the whole call with its error."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    results = context.SimpleQueue()
    processes = [
        context.Process(target=_rank_main, args=(r, world, port, backend, function, args, results))
        for r in range(world)
    ]
    for process in processes:
        process.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    for _ in processes:
        r, ok, value = results.get()
        if ok:
            outputs[r] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {r}: {value}")
    for process in processes:
        process.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return [outputs[r] for r in range(world)]


def _rank_main(
    rank_: int, world: int, port: int, backend: str, function: Callable[..., Any], args: tuple[Any, ...], results: Any
) -> None:
    try:
        with process_group(rank_, world, port, backend):
            value = function(*args)
        # As bytes: tensors sent through the queue as they are would be shared memory that
        # disappears when this process exits, before the parent reads them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank_, True, buffer.getvalue()))
    except BaseException as error:  # reported to the parent as this rank's failure
        results.put((rank_, False, f"{type(error).__name__}: {error}"))
