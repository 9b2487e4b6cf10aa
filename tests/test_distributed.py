"""One trial on several processes is the same method: 2 gloo processes with half of the batch each
give the same loss and the same state after an optimizer step (parameters, EMA targets, queues,
centers, prototypes, batch-norm statistics) as 1 process with the whole batch, in float64, for every
trainable method (issue 16's equivalence test). Runs on the CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harness.data import make_views
from harness.distributed import (
    GlobalBatchNorm,
    average_gradients,
    gather,
    rank,
    run_ranks,
    synchronize_batch_norm,
    world_size,
)
from harness.methods import METHODS
from harness.spec import METHOD_NAMES, resolve

BATCH = 8
TINY: dict[str, Any] = {
    "proj_hidden_dim": 16,
    "proj_dim": 8,
    "pred_hidden_dim": 8,
    "batch_size": BATCH,
    "swav_prototypes": 6,
    "dino_out_dim": 12,
}
PER_METHOD: dict[str, dict[str, Any]] = {"moco": {"queue_size": 16}, "nnclr": {"queue_size": 16}}
TRAINABLE = [name for name in METHOD_NAMES if METHODS[name].trainable]


def one_step(names: list[str]) -> dict[str, dict[str, Any]]:
    """Build each method (seed 0, float64), take this rank's share of a fixed global batch, one SGD
    step with the gradients averaged over the ranks; the loss and the whole state afterwards."""
    torch.set_num_threads(1)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        config = resolve({"method": name, **TINY, **PER_METHOD.get(name, {})})
        torch.manual_seed(0)
        method = METHODS[name](config, in_channels=1, image_size=28, num_classes=4).double()
        if world_size() > 1:
            synchronize_batch_norm(method, "cpu")
        generator = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (BATCH, 1, 28, 28), dtype=torch.uint8, generator=generator)
        views = make_views(
            images, method.view_recipe, 1.0, n_local=method.n_local_crops, generator=generator, mean=0.5, std=0.5
        )
        labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        share = BATCH // world_size()
        rows = slice(rank() * share, (rank() + 1) * share)
        method.on_train_start(total_steps=10, steps_per_epoch=5)
        optimizer = torch.optim.SGD(method.optimizer_parameters(), lr=0.1)
        loss = method.training_loss([v[rows].double() for v in views], labels[rows])
        loss.backward()
        average_gradients(method.optimizer_parameters())
        optimizer.step()
        method.after_optimizer_step(0)
        state = {k: v.detach().clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
        out[name] = {"loss": loss.item(), "state": state}
    return out


@pytest.fixture(scope="module")
def single_and_two_ranks() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    threads = torch.get_num_threads()
    try:
        single = one_step(TRAINABLE)
    finally:
        torch.set_num_threads(threads)
    return single, run_ranks(one_step, 2, TRAINABLE)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINABLE)
def test_distributed__two_processes_equal_one_with_the_whole_batch(
    single_and_two_ranks: tuple[dict[str, Any], list[dict[str, Any]]], name: str
) -> None:
    single, ranks = single_and_two_ranks
    for r, result in enumerate(ranks):
        assert result[name]["loss"] == pytest.approx(single[name]["loss"], rel=1e-9, abs=1e-12), f"rank {r}"
        assert result[name]["state"].keys() == single[name]["state"].keys()
        for key, expected in single[name]["state"].items():
            torch.testing.assert_close(
                result[name]["state"][key], expected, rtol=1e-9, atol=1e-11, msg=f"rank {r}: {name} {key}"
            )


def _gather_twice(_: None) -> list[list[float]]:
    x = torch.full((2, 3), float(rank() + 1), dtype=torch.float64, requires_grad=True)
    (everything,) = gather(x)
    (everything * torch.arange(1.0, 5.0, dtype=torch.float64)[:, None]).sum().backward()
    return [everything[:, 0].tolist(), x.grad[:, 0].tolist()]


def test_gather__rank_order_and_gradient_summed_over_ranks() -> None:
    results = run_ranks(_gather_twice, 2, None)
    for values, _ in results:
        assert values == [1.0, 1.0, 2.0, 2.0]
    # Each rank computes the same global sum; the gradient of rank r's slice is summed over ranks.
    assert results[0][1] == [2.0, 4.0] and results[1][1] == [6.0, 8.0]


def test_gather__identity_without_a_process_group() -> None:
    x = torch.randn(3, 2)
    assert gather(x)[0] is x and world_size() == 1 and rank() == 0


def _batch_norm_on_a_share(_: None) -> list[Any]:
    torch.manual_seed(0)
    data = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    norm = synchronize_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)).double(), "cpu")[0]
    assert isinstance(norm, GlobalBatchNorm)
    share = data[rank() * 4 : (rank() + 1) * 4].clone().requires_grad_()
    out = norm(share)
    (out * out.detach().cos()).sum().backward()
    return [out.detach(), share.grad, norm.running_mean.clone(), norm.running_var.clone()]


def test_global_batch_norm__equals_batch_norm_of_the_whole_batch() -> None:
    torch.manual_seed(0)
    data = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    reference = torch.nn.BatchNorm2d(3).double()
    out = reference(data)
    (out * out.detach().cos()).sum().backward()
    ranks = run_ranks(_batch_norm_on_a_share, 2, None)
    torch.testing.assert_close(torch.cat([r[0] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), data.grad)
    for r in ranks:
        torch.testing.assert_close(r[2], reference.running_mean)
        torch.testing.assert_close(r[3], reference.running_var)
