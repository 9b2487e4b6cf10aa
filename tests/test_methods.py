"""The contract of every method in ``METHODS`` (shapes, one CPU step lowers the loss, seeding,
state_dict round trip, optimizer parameters) and the state each method owns (EMA targets, MoCo's
queue, SwAV's prototypes and queue, DINO's center and schedules)."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.data import make_views
from harness.methods import METHODS, Method
from harness.methods.base import encode_views
from harness.spec import METHOD_NAMES, TrialConfig, resolve

BATCH = 8
IMAGE_SIZE = 28
NUM_CLASSES = 4
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # two images per class: SupCon has positives
# Small heads so that the whole file runs in seconds on two CPU cores.
TINY: dict[str, Any] = {
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "pred_hidden_dim": 16,
    "batch_size": BATCH,
    "swav_prototypes": 10,
    "dino_out_dim": 32,
}
PER_METHOD: dict[str, dict[str, Any]] = {"moco": {"queue_size": 16}}
MOMENTUM_METHODS = ("moco", "mocov3", "byol", "dino")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny batches: one intra-op thread avoids thread hand-offs that cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(name: str, **overrides: Any) -> TrialConfig:
    return resolve({"method": name, **TINY, **PER_METHOD.get(name, {}), **overrides})


CONFIGS = [pytest.param(tiny_config(name), id=name) for name in METHOD_NAMES]
TRAINABLE = [pytest.param(tiny_config(name), id=name) for name in METHOD_NAMES if METHODS[name].trainable]


def build(config: TrialConfig, seed: int | None = None) -> Method:
    torch.manual_seed(config.seed if seed is None else seed)
    return METHODS[config.method](config, in_channels=1, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)


def views_for(method: Method, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    return make_views(
        images, method.view_recipe, 1.0, n_local=method.n_local_crops, generator=generator, mean=0.5, std=0.5
    )


def step(method: Method, optimizer: torch.optim.Optimizer, views: list[torch.Tensor], index: int) -> float:
    loss = method.training_loss(views, LABELS)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(index)
    return loss.item()


def load_state_of(method: Method, state_source: Method) -> None:
    """Give ``method`` the buffers and counters (queues, centers, steps) of ``state_source``,
    keeping its own parameters."""
    parameter_names = {name for name, _ in state_source.named_parameters()}
    state = {k: v for k, v in state_source.state_dict().items() if k not in parameter_names}
    method.load_state_dict(copy.deepcopy(state), strict=False)


def loss_with_state_of(method: Method, state_source: Method, views: list[torch.Tensor]) -> float:
    """The training loss of ``method``'s parameters with the state of ``state_source``, computed on
    a copy so that neither changes."""
    probe = copy.deepcopy(method)
    load_state_of(probe, state_source)
    with torch.no_grad():
        return probe.training_loss(views, LABELS).item()


def test_methods_registry__names_match_spec() -> None:
    assert list(METHODS) == list(METHOD_NAMES)
    for name, method_class in METHODS.items():
        assert method_class.name == name
        assert issubclass(method_class, Method)


@pytest.mark.parametrize("config", CONFIGS)
def test_method__output_shapes(config: TrialConfig) -> None:
    method = build(config)
    views = views_for(method)
    assert method.view_recipe in ("simclr", "byol", "multicrop")
    assert method.n_local_crops == (config.local_crops if config.method in ("swav", "dino") else 0)
    assert len(views) == 2 + method.n_local_crops
    features = method.backbone(views[0])
    assert features.shape == (BATCH, method.feature_dim)
    baseline = config.method in ("random_init", "supervised")
    embedding = method.embed(views[0])
    assert embedding.shape == (BATCH, method.feature_dim if baseline else config.proj_dim)
    if method.trainable:
        loss = method.training_loss(views, LABELS)
        assert loss.shape == ()
        assert loss.requires_grad
        assert math.isfinite(loss.item())
    else:
        with pytest.raises(RuntimeError, match="not trained"):
            method.training_loss(views, LABELS)


@pytest.mark.parametrize("config", TRAINABLE)
def test_method__steps_lower_loss(config: TrialConfig) -> None:
    method = build(config)
    views = views_for(method)
    initial = copy.deepcopy(method)
    optimizer = torch.optim.Adam(method.optimizer_parameters(), lr=1e-3)
    method.on_train_start(total_steps=100, steps_per_epoch=10)
    initial.on_train_start(total_steps=100, steps_per_epoch=10)
    for index in range(5):
        # The objective is held fixed: on one repeated batch, a queue would fill with the batch's
        # own keys (its positives as negatives). The state's own evolution is tested below.
        load_state_of(method, initial)
        step(method, optimizer, views, index)
    # Same views, same queue/center/schedule state (that of the start): only the training differs.
    before = loss_with_state_of(initial, initial, views)
    after = loss_with_state_of(method, initial, views)
    assert after < before


@pytest.mark.parametrize("config", CONFIGS)
def test_method__same_seed_same_loss(config: TrialConfig) -> None:
    first, second, other = build(config), build(config), build(config, seed=config.seed + 1)
    views = views_for(first)
    if not first.trainable:
        assert torch.equal(first.backbone(views[0]), second.backbone(views[0]))
        assert not torch.equal(first.backbone(views[0]), other.backbone(views[0]))
        return
    losses = [m.training_loss(views, LABELS).item() for m in (first, second, other)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.parametrize("config", CONFIGS)
def test_method__state_dict_round_trip(config: TrialConfig) -> None:
    method = build(config)
    views = views_for(method)
    method.on_train_start(total_steps=50, steps_per_epoch=5)
    if method.trainable:
        optimizer = torch.optim.SGD(method.optimizer_parameters(), lr=0.1)
        for index in range(2):
            step(method, optimizer, views, index)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = build(config, seed=config.seed + 7)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    original_state, restored_state = method.state_dict(), restored.state_dict()
    assert original_state.keys() == restored_state.keys()
    for key, value in original_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, restored_state[key]), key
        else:
            assert value == restored_state[key], key
    if method.trainable:
        assert loss_with_state_of(method, method, views) == loss_with_state_of(restored, restored, views)


@pytest.mark.parametrize("config", TRAINABLE)
def test_method__loss_impls_agree(config: TrialConfig) -> None:
    fast = build(config.replace(loss_impl="fast"))
    reference = build(config.replace(loss_impl="reference"))
    views = views_for(fast)
    torch.testing.assert_close(fast.training_loss(views, LABELS), reference.training_loss(views, LABELS))


@pytest.mark.parametrize("config", TRAINABLE)
def test_method__bf16_autocast_step_keeps_fp32_state(config: TrialConfig) -> None:
    method = build(config)
    views = views_for(method)
    optimizer = torch.optim.SGD(method.optimizer_parameters(), lr=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.training_loss(views, LABELS)
    assert math.isfinite(loss.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(0)
    for name, tensor in [*method.named_parameters(), *method.named_buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
            assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("config", CONFIGS)
def test_method__optimizer_parameters_are_the_online_ones(config: TrialConfig) -> None:
    method = build(config)
    parameters = method.optimizer_parameters()
    ids = {id(p) for p in parameters}
    assert len(ids) == len(parameters), "no parameter twice"
    assert all(p.requires_grad for p in parameters)
    frozen = [p for p in method.parameters() if id(p) not in ids]
    assert all(not p.requires_grad for p in frozen)
    for target, _ in method.momentum_pairs():
        assert not ids & {id(p) for p in target.parameters()}
    if not method.trainable:
        return
    assert {id(p) for p in method.backbone.parameters()} <= ids
    method.training_loss(views_for(method), LABELS).backward()
    missing = [name for name, p in method.named_parameters() if id(p) in ids and p.grad is None]
    assert not missing, f"parameters given to the optimizer that get no gradient: {missing}"


@pytest.mark.parametrize("name", MOMENTUM_METHODS)
def test_method__ema_target_follows_momentum_formula(name: str) -> None:
    method = build(tiny_config(name))
    views = views_for(method)
    method.on_train_start(total_steps=10, steps_per_epoch=5)
    optimizer = torch.optim.SGD(method.optimizer_parameters(), lr=0.5)
    targets_before = [
        [p.detach().clone() for p in target.parameters()] for target, _ in method.momentum_pairs()
    ]
    step_index = 3
    method.training_loss(views, LABELS).backward()
    optimizer.step()
    online_after_step = [
        [p.detach().clone() for p in online.parameters()] for _, online in method.momentum_pairs()
    ]
    method.after_optimizer_step(step_index)
    base = method.config.momentum
    # MoCo's momentum is constant; BYOL and DINO follow Grill et al. 2020's cosine schedule.
    cosine = 1 - (1 - base) * (math.cos(math.pi * step_index / 10) + 1) / 2
    momentum = base if name == "moco" else cosine
    assert method.target_momentum(step_index) == pytest.approx(momentum)
    moved = False
    for (target, _), before, online in zip(method.momentum_pairs(), targets_before, online_after_step):
        for p, old, new in zip(target.parameters(), before, online):
            torch.testing.assert_close(p, momentum * old + (1 - momentum) * new, rtol=1e-6, atol=1e-7)
            moved |= not torch.equal(p, old)
    assert moved


@pytest.mark.parametrize("name", ["mocov3", "byol", "dino"])
def test_method__cosine_momentum_schedule(name: str) -> None:
    method = build(tiny_config(name, momentum=0.9))
    assert method.target_momentum(0) == pytest.approx(0.9), "the base before on_train_start"
    method.on_train_start(total_steps=100, steps_per_epoch=10)
    values = [method.target_momentum(k) for k in range(0, 101, 10)]
    assert values[0] == pytest.approx(0.9)
    assert values[5] == pytest.approx(0.95)
    assert values[-1] == pytest.approx(1.0)
    assert values == sorted(values)


def test_moco__queue_holds_new_keys_and_pointer_advances() -> None:
    method = build(tiny_config("moco", queue_size=12))
    views = views_for(method)
    queue_before = method.queue.clone()
    assert torch.allclose(queue_before.norm(dim=1), torch.ones(12))
    key_encoder = copy.deepcopy(nn.Sequential(method.key_backbone, method.key_projector))
    with torch.no_grad():
        expected_keys = F.normalize(key_encoder(views[1]), dim=1)
    method.training_loss(views, LABELS)
    assert int(method.queue_ptr) == BATCH
    torch.testing.assert_close(method.queue[:BATCH], expected_keys)
    assert torch.equal(method.queue[BATCH:], queue_before[BATCH:])
    method.training_loss(views, LABELS)  # wraps around: rows 8..11 then 0..3
    assert int(method.queue_ptr) == (2 * BATCH) % 12
    torch.testing.assert_close(method.queue[BATCH:], expected_keys[:4])
    torch.testing.assert_close(method.queue[:4], expected_keys[4:])
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(12))


def test_mocov3__loss_is_symmetric_inbatch_infonce_times_two_tau() -> None:
    method = build(tiny_config("mocov3", temperature=0.5))
    views = views_for(method)
    torch.manual_seed(1)
    loss = method.training_loss(views, LABELS)
    with torch.no_grad():
        torch.manual_seed(1)
        # Both views in one forward pass, as the method batches them (BN sees the 2N images).
        both = torch.cat(views[:2])
        q1, q2 = (method.predictor(z) for z in method.embed(both).chunk(2))
        k1, k2 = method.key_projector(method.key_backbone(both)).chunk(2)

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # Chen, Xie and He 2021, Algorithm 1, written out independently.
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.5
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * 0.5

    expected = ctr(q1, k2) + ctr(q2, k1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert not hasattr(method, "queue"), "MoCo v3 has no queue: the batch gives the negatives"


def test_nnclr__positives_are_nearest_support_rows_and_support_fills() -> None:
    method = build(tiny_config("nnclr", queue_size=12))
    views = views_for(method)
    support_before = method.support.clone()
    with torch.no_grad():
        z1 = method.embed(torch.cat(views[:2]))[:BATCH]  # batched as the method does
    neighbours = method.nearest_neighbours(z1)
    brute = torch.stack(
        [support_before[int(torch.argmax(F.cosine_similarity(z.unsqueeze(0), support_before)))] for z in z1]
    )
    torch.testing.assert_close(neighbours, brute)
    method.training_loss(views, LABELS)
    assert int(method.support_ptr) == BATCH
    torch.testing.assert_close(method.support[:BATCH], F.normalize(z1, dim=1), rtol=1e-4, atol=1e-5)
    assert torch.equal(method.support[BATCH:], support_before[BATCH:])


def test_nnclr__neighbours_carry_no_gradient() -> None:
    method = build(tiny_config("nnclr"))
    views = views_for(method)
    method.training_loss(views, LABELS).backward()
    assert method.support.grad is None and not method.support.requires_grad
    assert all(p.grad is not None for p in method.predictor.parameters())


def test_moco__symmetric_enqueues_both_views() -> None:
    method = build(tiny_config("moco", queue_size=32, moco_symmetric=True))
    views = views_for(method)
    asymmetric = build(tiny_config("moco", queue_size=32))
    loss = method.training_loss(views, LABELS)
    assert int(method.queue_ptr) == 2 * BATCH
    assert math.isfinite(loss.item())
    assert loss.item() != asymmetric.training_loss(views, LABELS).item()


def test_dino__center_follows_momentum_formula() -> None:
    method = build(tiny_config("dino", dino_center_momentum=0.8))
    views = views_for(method)
    method.center.fill_(0.25)
    teacher = copy.deepcopy(method)
    with torch.no_grad():
        outputs = torch.cat([teacher._teacher(v) for v in [torch.cat(views[:2])]])
    method.training_loss(views, LABELS)
    torch.testing.assert_close(method.center, 0.8 * 0.25 + 0.2 * outputs.mean(dim=0))


def test_dino__teacher_temperature_warms_up_in_epochs() -> None:
    method = build(
        tiny_config(
            "dino", dino_warmup_teacher_temp=0.04, dino_teacher_temp=0.07, dino_warmup_teacher_temp_epochs=3
        )
    )
    assert method.teacher_temperature() == pytest.approx(0.04)
    method.on_train_start(total_steps=100, steps_per_epoch=10)
    method.after_optimizer_step(14)  # 15 steps done: epoch 1.5 of a 3-epoch warm-up
    assert method.teacher_temperature() == pytest.approx(0.055)
    method.after_optimizer_step(29)
    assert method.teacher_temperature() == pytest.approx(0.07)
    method.after_optimizer_step(99)
    assert method.teacher_temperature() == pytest.approx(0.07)


def test_swav__prototypes_unit_norm_after_step() -> None:
    method = build(tiny_config("swav"))
    assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(10))
    optimizer = torch.optim.SGD(method.optimizer_parameters(), lr=1.0)
    before = method.prototypes.weight.detach().clone()
    step(method, optimizer, views_for(method), 0)
    assert not torch.equal(method.prototypes.weight, before)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(10))


def test_swav__queue_fills_then_joins_the_codes() -> None:
    method = build(tiny_config("swav", queue_size=16, local_crops=0))
    no_queue = build(tiny_config("swav", queue_size=0, local_crops=0))
    views, other_views = views_for(method, seed=0), views_for(method, seed=1)
    # While the queue fills, the codes come from the batch alone: the loss is the queue-less one.
    loss_filling = method.training_loss(other_views, LABELS)
    assert method.queue_count == BATCH
    assert not method.queue_full
    assert loss_filling.item() == pytest.approx(no_queue.training_loss(other_views, LABELS).item(), rel=1e-5)
    embeddings = [F.normalize(z, dim=1).detach() for z in encode_views(method.embed, other_views[:2])]
    method.training_loss(other_views, LABELS)
    assert method.queue_full
    torch.testing.assert_close(method.queue[:, :BATCH], torch.stack(embeddings))
    torch.testing.assert_close(method.queue[:, BATCH:], torch.stack(embeddings))
    # Full: the other batch's embeddings join the Sinkhorn codes of this batch.
    new_embeddings = [F.normalize(z, dim=1).detach() for z in encode_views(method.embed, views[:2])]
    loss_full = method.training_loss(views, LABELS)
    assert loss_full.item() != pytest.approx(no_queue.training_loss(views, LABELS).item(), rel=1e-4)
    # A ring buffer: the oldest rows are overwritten.
    torch.testing.assert_close(method.queue[:, :BATCH], torch.stack(new_embeddings))


def test_swav__two_crops_equal_swapped_prediction() -> None:
    from harness.losses import swav

    config = tiny_config("swav", local_crops=0)
    method = build(config)
    views = views_for(method)
    loss = method.training_loss(views, LABELS)
    with torch.no_grad():
        scores = [method.prototypes(F.normalize(z, dim=1)) for z in (method.embed(torch.cat(views)).chunk(2))]
        expected = swav(*scores, config.temperature, config.swav_epsilon, config.swav_iterations)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method__declaration_read_from_source_is_the_class_declaration(name: str) -> None:
    """``harness.spec`` reads each ``SPEC`` from the file's source (no torch); the imported class
    must carry the same declaration, and its name, trainable and uses_labels follow it."""
    import dataclasses

    from harness.spec import method_declarations

    read, imported = method_declarations()[name], METHODS[name].spec
    assert dataclasses.replace(read, rules=()) == dataclasses.replace(imported, rules=())
    assert [(r.knob, r.expected, r.context) for r in read.rules] == [
        (r.knob, r.expected, r.context) for r in imported.rules
    ]
    cls = METHODS[name]
    assert (cls.name, cls.trainable, cls.uses_labels) == (read.name, read.trains, read.uses_labels)


def test_random_init__not_trainable() -> None:
    method = build(tiny_config("random_init"))
    assert not method.trainable
    assert method.uses_labels is False
    assert METHODS["supervised"].uses_labels and METHODS["supcon"].uses_labels


def test_method__rejects_configuration_of_another_method() -> None:
    with pytest.raises(ValueError, match="moco"):
        METHODS["simclr"](tiny_config("moco"), in_channels=1, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
