"""One trial: build the method, train it on the device-resident dataset, evaluate, measure.

``run_trial`` never raises for a trial that fails (divergence, out of memory, a bug in a method):
it returns a record with status ``failed`` and the reason, so a study goes on. Only
KeyboardInterrupt propagates, so that the runner can mark the trial interrupted.

Given a :class:`~harness.checkpoint.CheckpointPolicy`, a trial checkpoints at its cadence, when
asked to stop (SIGINT/SIGTERM: at the next step boundary, then
:class:`~harness.checkpoint.TrialInterrupted`) and after its last step; it resumes from the newest
usable checkpoint in the policy's folder, and writes its encoder there when it completes. Every
random number of the training loop comes from the context's generator (data order and views),
drawn in the same order whatever the cadence, so a resumed trial ends bit-identical on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from harness import distributed, evaluation, provenance
from harness.checkpoint import (
    FINAL_NAME,
    CheckpointPolicy,
    CheckpointProblem,
    Loaded,
    StopRequests,
    TrialCheckpoints,
    TrialInterrupted,
    capture_rng,
    decode,
    encoder_layers,
    restore_rng,
    write_encoder,
)
from harness.data import FOLDER_DATASETS, ImageDataset, fits_on_device, iter_batches, load_dataset, make_views
from harness.db.models import SUMMARY_METRICS, utcnow
from harness.methods import METHODS
from harness.methods.base import Method
from harness.optim import build_optimizer, lr_at, scaled_lr, set_lr
from harness.runtime import PeakMemory, failure_reason, resolve_device, synchronize
from harness.spec import TrialConfig
from harness.tracking import MetricSink
from harness.trial_api import TrialPruned

# Steps excluded from the throughput measurement: the first steps pay for allocator growth,
# cuDNN autotuning and compilation.
WARMUP_STEPS = 3
EVAL_BATCH_SIZE = 1024
# The data subset does not depend on the trial's seed, so seeds vary the training, not the data.
SUBSET_SEED = 0
# Alignment/uniformity use the standard recipe whatever the trial trained with, so an
# aug_strength ablation compares encoders under one measurement.
EVAL_VIEW_STRENGTH = 1.0


class TrialDiverged(Exception):
    """The training loss became non-finite."""


class _RankDone(Exception):
    """A rank other than the first has trained its share; evaluation is the first rank's."""


@dataclass
class TrialRecord:
    """What a trial produced; the study runner writes it to the database in one transaction."""

    status: str
    reason: str | None
    summary: dict[str, float | None]
    curves: list[tuple[float, int, str, float]]
    provenance: dict[str, Any]
    started_at: datetime
    ended_at: datetime = field(default_factory=utcnow)
    data: dict[str, Any] = field(default_factory=dict)
    """What was trained and evaluated on (:func:`describe_data`): splits, image counts, class names
    and counts, resident or streamed, the shard's fingerprint. Stored as ``harness_trial.data``."""
    # With a checkpoint policy: the trial's folder, the encoder written there (complete trials
    # with save_weights) and the step this attempt resumed from (None: from the start).
    checkpoint_dir: str | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    resumed_from_step: int | None = None
    checkpoint_seconds: float = 0.0  # spent writing checkpoints and weights (not in train_seconds)


def _autocast_dtype(config: TrialConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


_DATASETS: dict[tuple[Any, ...], ImageDataset] = {}


def _dataset(config: TrialConfig, split: str, size: int | None, device: torch.device) -> ImageDataset:
    """The dataset split, kept for the next trial of the same process: resident on the device when
    it fits in ``resident_share`` of the device memory, else streamed from host memory."""
    options = {"image_size": config.image_size, "on_bad_image": config.on_bad_image} if config.dataset in FOLDER_DATASETS else {}
    key = (config.dataset, split, config.data_root, size, str(device), config.resident_share, *options.values())
    if key not in _DATASETS:
        if len(_DATASETS) >= 4:
            _DATASETS.pop(next(iter(_DATASETS)))
        loaded = load_dataset(
            config.dataset, split, root=config.data_root, size=size, device="cpu", seed=SUBSET_SEED, **options
        )
        fits = fits_on_device(loaded.images.numel() * loaded.images.element_size(), device, config.resident_share)
        _DATASETS[key] = loaded.resident(device) if fits else loaded.streaming(device)
    return _DATASETS[key]


def _pretraining_dataset(config: TrialConfig, train: ImageDataset, device: torch.device) -> ImageDataset:
    """The split the encoder trains on (``pretrain_split``): the labeled train split itself, the
    unlabeled split, or both (STL-10's usual train+unlabeled); ``train_size`` applies to each."""
    if config.pretrain_split == "train":
        return train
    unlabeled = _dataset(config, "unlabeled", config.train_size, device)
    if config.pretrain_split == "unlabeled":
        return unlabeled
    if train.streamed or unlabeled.streamed:
        host = torch.cat([train.images.cpu(), unlabeled.images.cpu()])
        return ImageDataset(
            host, torch.cat([train.labels, unlabeled.labels]), train.num_classes, train.name,
            "train+unlabeled", train.mean, train.std, train.class_names, streamed=True,
        )
    return ImageDataset(
        torch.cat([train.images, unlabeled.images]), torch.cat([train.labels, unlabeled.labels]),
        train.num_classes, train.name, "train+unlabeled", train.mean, train.std, train.class_names,
    )


def _progress(total: int, desc: str, enabled: bool | None, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    # disable=None lets tqdm stay quiet when the output is not a terminal.
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        leave=False,
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
    )


@dataclass
class _Context:
    config: TrialConfig
    device: torch.device
    train: ImageDataset
    test: ImageDataset
    pretrain: ImageDataset
    method: Method
    autocast: torch.dtype | None
    generator: torch.Generator
    curves: list[tuple[float, int, str, float]] = field(default_factory=list)
    sink: MetricSink | None = None
    on_curves: Callable[[list[tuple[float, int, str, float]]], None] | None = None
    published: int = 0

    def record(self, epoch: float, step: int, name: str, value: float) -> None:
        """One point of a curve: kept for the database, and handed to the trial's tracker."""
        self.curves.append((epoch, step, name, value))
        if self.sink is not None:
            self.sink.on_metric(name, value, step=step, epoch=epoch)

    def publish(self) -> None:
        """Hand the points not yet handed over to ``on_curves`` (live curves), at each log point
        and evaluation."""
        if self.on_curves is not None and self.published < len(self.curves):
            points = self.curves[self.published :]
            self.published = len(self.curves)
            self.on_curves(points)

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        if self.autocast is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                yield

    def features(self, dataset: ImageDataset) -> torch.Tensor:
        # eval_features: the backbone's features (the protocol of the papers) or the projection
        # head's output (the seed's claim that discarding the head helps is measured against it).
        encoder = self.method.backbone if self.config.eval_features == "backbone" else _Projection(self.method)
        return evaluation.extract_features(
            encoder,
            dataset.images,
            mean=dataset.mean,
            std=dataset.std,
            batch_size=EVAL_BATCH_SIZE,
            device=self.device,
        )

    def knn(self, train_features: torch.Tensor, test_features: torch.Tensor) -> float:
        return evaluation.knn_top1(
            train_features,
            self.train.labels,
            test_features,
            self.test.labels,
            k=self.config.knn_k,
            t=self.config.knn_t,
            num_classes=self.train.num_classes,
        )


class _Projection(torch.nn.Module):
    """``method.embed`` as a module, so feature extraction can run the projection head too."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method
        self.train(method.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.embed(x)


def run_trial(
    config: TrialConfig,
    *,
    on_eval: Callable[[int, float], None] | None = None,
    progress: bool | None = None,
    sink: MetricSink | None = None,
    checkpoint_dir: str | Path | CheckpointPolicy | None = None,
    on_curves: Callable[[list[tuple[float, int, str, float]]], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> TrialRecord:
    """Train and evaluate one configuration; see the module docstring for the failure contract.

    ``sink`` (an MLflow/TensorBoard tracker, harness.tracking) gets every curve point as it is
    recorded; it must not raise (``harness.tracking.TrialTracker`` guards its own calls).
    ``checkpoint_dir``: the trial's own folder, checkpointed into at the cadence of its knobs
    (``checkpoint_minutes``, ``checkpoint_epochs``) and resumed from; the encoder is written there
    (``save_weights``). A :class:`CheckpointPolicy` sets the cadence directly. None: no
    checkpoints, no weights. ``on_curves``: receives curve points in batches as they are made (a
    resumed trial first gets the points restored from its checkpoint); ``say``: one line per
    resume and per checkpoint skipped."""
    checkpoint = (
        checkpoint_dir
        if checkpoint_dir is None or isinstance(checkpoint_dir, CheckpointPolicy)
        else CheckpointPolicy.from_config(config, Path(checkpoint_dir))
    )
    if config.devices_per_trial > 1 and METHODS[config.method].trainable and not distributed.is_distributed():
        from harness.ranks import run_on_ranks  # the parent of the trial's processes

        return run_on_ranks(
            config, on_eval=on_eval, progress=progress, sink=sink, checkpoint=checkpoint, on_curves=on_curves, say=say
        )
    # From here on this process is the whole trial, or one rank of it (harness.ranks): rank 0
    # evaluates, checkpoints and reports; the other ranks only train.
    first_rank = distributed.rank() == 0
    started = utcnow()
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
    curves: list[tuple[float, int, str, float]] = []
    device_label = config.device
    data: dict[str, Any] = {}
    checkpoints: _Checkpoints | None = None
    weights: tuple[Path, str] | None = None
    try:
        device = resolve_device(config.device)
        device_label = str(device)
        context = _build(config, device)
        data = describe_data(context.pretrain, context.train, context.test)
        context.sink = sink
        context.on_curves = on_curves
        curves = context.curves
        if checkpoint is not None:
            checkpoints = _Checkpoints(checkpoint, context, say or (lambda line: None), writer=first_rank)
        _train(context, summary, on_eval, progress if first_rank else False, checkpoints)
        if not first_rank:
            raise _RankDone
        _final_evaluation(context, summary)
        if checkpoints is not None and checkpoints.policy.save_weights:
            start = time.perf_counter()
            weights = _write_weights(context, summary, checkpoints.policy.directory)
            checkpoints.seconds += time.perf_counter() - start
        status, reason = "complete", None
    except _RankDone:
        status, reason = "complete", None
    except TrialPruned as pruned:
        status, reason = "pruned", str(pruned) or "pruned"
    except TrialDiverged as diverged:
        status, reason = "failed", str(diverged)
    except torch.OutOfMemoryError:
        status, reason = "failed", "out of memory"
    except KeyboardInterrupt:
        raise
    except Exception as error:  # a failed trial is a result with a reason, never a crashed study
        status, reason = "failed", failure_reason(error)
    finally:
        context = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if checkpoints is not None and checkpoints.writer:
        # A complete trial keeps its final state; a failed or pruned one is rerun from zero.
        if status == "complete":
            checkpoints.files.finish(keep_final=checkpoints.policy.keep_final)
        else:
            checkpoints.files.clear()
    return TrialRecord(
        status=status,
        reason=reason,
        summary=summary,
        curves=curves,
        provenance=provenance.collect(device_label),
        started_at=started,
        data=data,
        checkpoint_dir=str(checkpoint.directory) if checkpoint is not None else None,
        weights_path=str(weights[0]) if weights else None,
        weights_sha256=weights[1] if weights else None,
        resumed_from_step=checkpoints.resumed_from_step if checkpoints is not None else None,
        checkpoint_seconds=checkpoints.seconds if checkpoints is not None else 0.0,
    )


def describe_data(pretrain: ImageDataset, train: ImageDataset, test: ImageDataset) -> dict[str, Any]:
    """The protocol's data: which split pretrained the encoder and which ones k-NN and the probe
    used, with image counts, class counts, residency and, for prepared folders, the shard."""

    def split(ds: ImageDataset) -> dict[str, Any]:
        labels = ds.labels[ds.labels >= 0].cpu()
        out: dict[str, Any] = {
            "dataset": ds.name,
            "split": ds.split,
            "images": len(ds),
            "shape": list(ds.images.shape[1:]),
            "streamed": ds.streamed,
            "labeled": int(labels.numel()),
        }
        if ds.class_names and labels.numel():
            counts = torch.bincount(labels, minlength=len(ds.class_names)).tolist()
            out["class_counts"] = dict(zip(ds.class_names, counts))
        if ds.source is not None:
            out["shard"] = {"source": ds.source.source, "fingerprint": ds.source.fingerprint,
                            "resolution": ds.source.resolution,
                            "skipped": len(ds.source.skipped), "converted": ds.source.converted}
        return out

    return {"pretrain": split(pretrain), "knn_probe_train": split(train), "knn_probe_test": split(test)}


def _build(config: TrialConfig, device: torch.device) -> _Context:
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    train = _dataset(config, "train", config.train_size, device)
    test = _dataset(config, "test", config.test_size, device)
    pretrain = _pretraining_dataset(config, train, device)
    method_class = METHODS[config.method]
    if method_class.uses_labels and pretrain is not train:
        raise ValueError(
            f"method {config.method!r} trains on labels, but pretrain_split={config.pretrain_split!r} "
            "includes unlabeled images; use pretrain_split: train"
        )
    channels, image_size = train.images.shape[1], train.images.shape[-1]
    method = method_class(config, in_channels=channels, image_size=image_size, num_classes=train.num_classes).to(device)
    if distributed.is_distributed():
        # Batch norms over the global batch, and every rank starting from rank 0's model: the
        # forward pass and the update then equal the single-process ones (tests/test_distributed.py).
        distributed.synchronize_batch_norm(method, device.type)
        distributed.broadcast_module(method)
    if config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if config.compile:
        method.backbone.compile()
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return _Context(
        config=config,
        device=device,
        train=train,
        test=test,
        pretrain=pretrain,
        method=method,
        autocast=_autocast_dtype(config, device),
        generator=generator,
    )


@dataclass
class _Position:
    """Where the training loop is and what it has accumulated (the plain part of a checkpoint)."""

    epoch: int = 0
    batch: int = 0  # steps of ``epoch`` taken
    step: int = 0
    checked: int = 0  # steps whose losses are in the curves
    train_seconds: float = 0.0
    measured_seconds: float = 0.0
    measured_images: int = 0


class _Checkpoints:
    """A trial's checkpoints as the training loop uses them: when one is due, what it holds, and
    resuming from the newest usable one."""

    def __init__(
        self, policy: CheckpointPolicy, context: _Context, say: Callable[[str], None], *, writer: bool = True
    ) -> None:
        config = context.config
        images = context.pretrain.images.shape[0]
        steps_per_epoch = images // config.batch_size
        identity = {
            "config_hash": config.config_hash,
            "seed": config.seed,
            "method": config.method,
            "device_type": context.device.type,
            "train_images": int(images),
            "total_steps": steps_per_epoch * config.epochs,
        }
        self.policy = policy
        # One rank writes (the first); on a trial of several processes the others only resume, from
        # the file the first one chose. A checkpoint is the same whichever the number of processes.
        self.writer = writer
        self.files = TrialCheckpoints(policy.directory, identity, say=say)
        self.say = say
        self.stop = StopRequests()
        self.last_saved = time.monotonic()
        self.last_path: Path | None = None
        self.resumed_from_step: int | None = None
        self.resumed_peak: float | None = None
        self.has_final = False
        self.seconds = 0.0

    def due(self, *, epoch_end: bool, epoch: int) -> bool:
        policy = self.policy
        if not self.writer:
            return False
        if self.stop.requested:
            return True
        if policy.every_minutes > 0 and time.monotonic() - self.last_saved >= policy.every_minutes * 60:
            return True
        return epoch_end and policy.every_epochs > 0 and epoch % policy.every_epochs == 0

    def save(self, state: dict[str, Any], step: int, *, final: bool = False) -> float:
        """Write ``state``; returns the seconds it took (left out of the throughput measurement)."""
        start = time.perf_counter()
        self.last_path = self.files.save(state, step=step, final=final)
        self.last_saved = time.monotonic()
        self.has_final |= final
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return seconds

    def stop_if_requested(self) -> None:
        if self.stop.signum is not None:
            raise TrialInterrupted(self.stop.signum, self.last_path)

    def resume(
        self, context: _Context, optimizer: torch.optim.Optimizer, losses: torch.Tensor
    ) -> tuple[_Position, torch.Tensor | None] | None:
        """Load the newest usable checkpoint into the method, optimizer, generators, losses and
        curves; returns the position and the epoch's data order, or None (start from zero)."""
        method_keys = {
            k: tuple(v.shape) for k, v in context.method.state_dict().items() if torch.is_tensor(v)
        }
        group_sizes = [len(g["params"]) for g in optimizer.param_groups]

        def check(state: Mapping[str, Any]) -> None:
            stored = {k: tuple(v.shape) for k, v in state["method"].items() if torch.is_tensor(v)}
            if stored != method_keys:
                changed = sorted(set(stored.items()) ^ set(method_keys.items()))[:3]
                raise CheckpointProblem(f"incompatible: the method's tensors differ (e.g. {changed})")
            if [len(g["params"]) for g in state["optimizer"]["param_groups"]] != group_sizes:
                raise CheckpointProblem("incompatible: the optimizer's parameter groups differ")

        loaded = self.files.latest(map_location=context.device, check=check) if self.writer else None
        if distributed.is_distributed():
            # Every rank restores the file rank 0 chose (it alone may skip and rename damaged ones).
            chosen = distributed.broadcast_object(str(loaded.path) if loaded is not None else None)
            if not self.writer and chosen is not None:
                payload = decode(Path(chosen).read_bytes(), map_location=context.device)
                loaded = Loaded(Path(chosen), payload["state"])
        if loaded is None:
            return None
        state = loaded.state
        context.method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], context.generator)
        position = _Position(**state["position"])
        losses[: position.step] = state["losses"].to(losses.device)
        context.curves[:] = [tuple(point) for point in state["curves"]]
        self.resumed_from_step = position.step
        self.resumed_peak = state.get("peak_mem_bytes")
        self.has_final = loaded.path.name == FINAL_NAME
        within = f", {position.batch} step(s) into epoch {position.epoch + 1}" if position.batch else ""
        self.say(f"resuming from checkpoint {loaded.path} (step {position.step}{within})")
        order = state.get("order")
        return position, (order.to(context.device) if order is not None else None)


def _train(
    context: _Context,
    summary: dict[str, float | None],
    on_eval: Callable[[int, float], None] | None,
    progress: bool | None,
    checkpoints: _Checkpoints | None = None,
) -> None:
    config, device, method = context.config, context.device, context.method
    data = context.pretrain
    images, labels = data.images, data.labels
    n = images.shape[0]
    steps_per_epoch = n // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    if not method.trainable or total_steps == 0:
        if config.random_init_recompute_bn:
            # random_init's calibrated floor: every trained run, even one whose loss stays flat,
            # moves its batch-norm statistics onto the images; this gives the random encoder the same.
            evaluation.recompute_batch_norm(
                method.backbone, images, mean=data.mean, std=data.std, batch_size=EVAL_BATCH_SIZE, device=device
            )
        summary.update(train_img_per_s=None, train_seconds=0.0, peak_mem_bytes=None)
        return
    base_lr = scaled_lr(config.lr, config.batch_size)
    optimizer = build_optimizer(
        config.optimizer, method.optimizer_parameters(), lr=base_lr, weight_decay=config.weight_decay
    )
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    method.on_train_start(total_steps, steps_per_epoch)
    # On several processes every rank draws the views of the whole global batch (the random numbers
    # of the single-process run, so a seed reproduces whatever the number of processes) and trains
    # on its slice of it; the method gathers the slices back before its loss.
    world, first_rank = distributed.world_size(), distributed.rank() == 0
    share = config.batch_size // world
    rows = slice(distributed.rank() * share, (distributed.rank() + 1) * share)
    channels_last = config.channels_last
    # Losses stay on the device and are checked at log points only, so the loop never waits on
    # the GPU each step; the first non-finite entry still gives the exact step of divergence.
    losses = torch.zeros(total_steps, device=device)
    position, order = _Position(), None
    resumed = checkpoints.resume(context, optimizer, losses) if checkpoints is not None else None
    if resumed is not None:
        position, order = resumed
        # A resumed search trial is a new Optuna trial: it gets the evaluations it already made.
        for epoch_done, _, name, value in list(context.curves):
            if name == "knn_top1" and on_eval is not None:
                on_eval(int(epoch_done), value)
    context.publish()
    first_step = position.step

    def state(
        extra_seconds: float = 0.0, extra_measured: float = 0.0, extra_images: int = 0
    ) -> dict[str, Any]:
        """What a checkpoint holds; the ``extra_*`` are the running epoch's time so far."""
        mid_epoch = position.batch > 0
        return {
            "position": {
                **position.__dict__,
                "train_seconds": position.train_seconds + extra_seconds,
                "measured_seconds": position.measured_seconds + extra_measured,
                "measured_images": position.measured_images + extra_images,
            },
            "order": order if mid_epoch else None,
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": capture_rng(context.generator),
            "losses": losses[: position.step].clone(),
            "curves": list(context.curves),
        }

    stop = checkpoints.stop if checkpoints is not None else contextlib.nullcontext()
    with stop:
        with PeakMemory(device) as memory:
            while position.epoch < config.epochs:
                epoch = position.epoch
                method.train()
                if position.batch == 0:
                    order = torch.randperm(n, device=device, generator=context.generator)
                assert order is not None
                synchronize(device)
                epoch_start = time.perf_counter()
                timed_start, timed_images = None, 0
                bar = _progress(
                    steps_per_epoch,
                    f"{config.method} epoch {epoch + 1}/{config.epochs}",
                    progress,
                    position.batch,
                )
                size = config.batch_size
                # A streamed dataset gathers on the host: one copy of the order per epoch, not per step.
                gather_order = order.cpu() if data.streamed else order
                batches = iter_batches(
                    images,
                    [gather_order[b * size : (b + 1) * size] for b in range(position.batch, steps_per_epoch)],
                    device,
                    stream=data.streamed,
                )
                for batch, batch_images in enumerate(batches, start=position.batch):
                    step = position.step
                    if step == first_step + WARMUP_STEPS or (batch == 0 and step > first_step + WARMUP_STEPS):
                        synchronize(device)
                        timed_start, timed_images = time.perf_counter(), 0
                    index = order[batch * size : (batch + 1) * size]
                    views = make_views(
                        batch_images,
                        method.view_recipe,
                        config.aug_strength,
                        n_local=method.n_local_crops,
                        n_views=method.n_views,
                        generator=context.generator,
                        mean=data.mean,
                        std=data.std,
                        preset=config.aug_preset,
                        compiled=config.compile_augmentation,
                    )
                    batch_labels = labels[index]
                    if world > 1:
                        views, batch_labels = [v[rows] for v in views], batch_labels[rows]
                    if channels_last:
                        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                    lr = lr_at(step, total_steps, warmup_steps, base_lr)
                    set_lr(optimizer, lr)
                    with context.precision():
                        loss = method.training_loss(views, batch_labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    distributed.average_gradients(method.optimizer_parameters)  # a no-op on one process
                    optimizer.step()
                    method.after_optimizer_step(step)
                    losses[step] = loss.detach().float()
                    position.step, position.batch = step + 1, batch + 1
                    timed_images += index.numel()
                    if position.step % config.log_every == 0 or batch == steps_per_epoch - 1:
                        position.checked, mean_loss = _check_losses(
                            losses, position.checked, position.step, epoch, steps_per_epoch, context.record
                        )
                        context.record(epoch + (batch + 1) / steps_per_epoch, position.step, "lr", lr)
                        bar.set_postfix_str(f"loss {mean_loss:.4g}, lr {lr:.3g}", refresh=False)
                        context.publish()
                    bar.update(1)
                    if checkpoints is not None and checkpoints.due(epoch_end=False, epoch=epoch):
                        synchronize(device)
                        now = time.perf_counter()
                        timed = now - timed_start if timed_start is not None else 0.0
                        pause = checkpoints.save(
                            state(now - epoch_start, timed, timed_images if timed_start is not None else 0),
                            position.step,
                        )
                        checkpoints.stop_if_requested()
                        # The write is not training: it stays out of the time and throughput.
                        epoch_start += pause
                        if timed_start is not None:
                            timed_start += pause
                bar.close()
                synchronize(device)
                now = time.perf_counter()
                position.train_seconds += now - epoch_start
                if timed_start is not None:
                    position.measured_seconds += now - timed_start
                    position.measured_images += timed_images
                if (
                    first_rank
                    and config.eval_every
                    and (epoch + 1) % config.eval_every == 0
                    and epoch + 1 < config.epochs
                ):
                    _intermediate_eval(context, epoch + 1, position.step, on_eval)
                position.epoch, position.batch = epoch + 1, 0
                if (
                    checkpoints is not None
                    and position.epoch < config.epochs
                    and checkpoints.due(epoch_end=True, epoch=position.epoch)
                ):
                    checkpoints.save(state(), position.step)
                    checkpoints.stop_if_requested()
        peak = None if memory.peak is None else float(memory.peak)  # None: not measurable here
        # The trial's figure: every rank's peak on its own device, summed (measurable on all ranks
        # or none: they run on one kind of device).
        if world > 1 and peak is not None:
            peak = distributed.sum_over_ranks(peak)
        if checkpoints is not None:
            if checkpoints.resumed_peak is not None:  # the attempt that trained to the end measured it
                peak = max(peak or 0.0, float(checkpoints.resumed_peak))
            if not checkpoints.has_final:
                checkpoints.save({**state(), "peak_mem_bytes": peak}, position.step, final=True)
            checkpoints.stop_if_requested()
    summary["final_loss"] = float(losses[-steps_per_epoch:].mean())
    summary["train_seconds"] = position.train_seconds
    summary["train_img_per_s"] = (
        position.measured_images / position.measured_seconds if position.measured_seconds > 0 else None
    )
    summary["peak_mem_bytes"] = peak


def _check_losses(
    losses: torch.Tensor,
    checked: int,
    step: int,
    epoch: int,
    steps_per_epoch: int,
    record: Callable[[float, int, str, float], None],
) -> tuple[int, float]:
    """Record the mean loss since the last check and return (step, that mean); raise
    TrialDiverged at the first non-finite."""
    window = losses[checked:step]
    finite = torch.isfinite(window)
    if not bool(finite.all()):
        first = checked + int((~finite).nonzero()[0, 0]) + 1
        raise TrialDiverged(f"diverged at step {first} (loss {float(window[first - checked - 1])})")
    epoch_position = epoch + (step - epoch * steps_per_epoch) / steps_per_epoch
    mean = float(window.mean())
    record(epoch_position, step, "loss", mean)
    return step, mean


@torch.no_grad()
def _intermediate_eval(context: _Context, epoch: int, step: int, on_eval: Callable[[int, float], None] | None) -> None:
    train_features = context.features(context.train)
    test_features = context.features(context.test)
    knn = context.knn(train_features, test_features)
    context.record(float(epoch), step, "knn_top1", knn)
    context.publish()
    if on_eval is not None:
        on_eval(epoch, knn)


def _final_evaluation(context: _Context, summary: dict[str, float | None]) -> None:
    config = context.config
    start = time.perf_counter()
    with torch.no_grad():
        train_features = context.features(context.train)
        test_features = context.features(context.test)
        knn = context.knn(train_features, test_features)
    if context.method.trainable:
        final_epoch, final_step = config.epochs, (context.pretrain.images.shape[0] // config.batch_size) * config.epochs
    else:  # an untrained encoder (random_init) is the state at epoch 0, whatever its reset knobs say
        final_epoch, final_step = 0, 0
    context.record(float(final_epoch), final_step, "knn_top1", knn)
    top1, top5 = evaluation.linear_probe(
        train_features,
        context.train.labels,
        test_features,
        context.test.labels,
        num_classes=context.train.num_classes,
        epochs=config.linear_epochs,
        seed=config.seed,
    )
    alignment, uniformity = _alignment_uniformity(context)
    summary.update(
        knn_top1=knn,
        linear_top1=top1,
        linear_top5=top5,
        alignment=alignment,
        uniformity=uniformity,
        effective_rank=evaluation.effective_rank(test_features),
        feature_std=evaluation.feature_std(test_features),
        eval_seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _alignment_uniformity(context: _Context) -> tuple[float, float]:
    """Wang & Isola (2020) on the projections of two augmented views of the test images."""
    method = context.method
    method.eval()
    generator = torch.Generator(device=context.device)
    generator.manual_seed(context.config.seed + 1)
    first, second = [], []
    chunks = [slice(start, start + EVAL_BATCH_SIZE) for start in range(0, len(context.test), EVAL_BATCH_SIZE)]
    for batch in iter_batches(context.test.images, chunks, context.device, stream=context.test.streamed):
        views = make_views(
            batch,
            "simclr",
            EVAL_VIEW_STRENGTH,
            generator=generator,
            mean=context.test.mean,
            std=context.test.std,
        )
        with context.precision():
            first.append(method.embed(views[0]).float())
            second.append(method.embed(views[1]).float())
    return evaluation.alignment_uniformity(torch.cat(first), torch.cat(second))


def _write_weights(
    context: _Context, summary: Mapping[str, float | None], directory: Path
) -> tuple[Path, str]:
    """The evaluated encoder as ``encoder.safetensors`` + ``encoder.json`` in the trial's folder."""
    config, train = context.config, context.train
    info = {
        "method": config.method,
        "backbone": config.backbone,
        "dataset": config.dataset,
        "in_channels": int(train.images.shape[1]),
        "image_size": int(train.images.shape[-1]),
        "feature_dim": context.method.feature_dim,
        "normalization": {
            "mean": list(train.mean),
            "std": list(train.std),
            "input": "uint8 images scaled to [0, 1], then (x - mean) / std per channel",
        },
        "layers": encoder_layers(config.backbone),
        "config_hash": config.config_hash,
        "seed": config.seed,
        "config": config.to_dict(),
        # JSON has no NaN: a non-finite metric is written as its name ("nan", "inf").
        "metrics": {
            name: value if math.isfinite(value) else str(value)
            for name, value in summary.items()
            if value is not None
        },
    }
    return write_encoder(directory, config.backbone, context.method.backbone, info)
