"""Study files: parse, validate and resolve them into frozen trial configurations.

Every knob is declared once, as a field of ``TrialConfig`` made by :func:`knob`: its type, default,
check, one-line meaning, plot label, and the value that reproduces the behaviour from before the knob
existed. Every method is declared once, in its own file under ``harness/methods/`` (a
:class:`MethodSpec` named ``SPEC``): the knobs it reads with its per-method defaults and their
citation, whether it trains and uses labels, its cross-knob rules and its colour. The name lists,
checks, choices, labels and the knob table of docs/STUDIES.md are derived from these declarations.
Nothing in this module imports torch: method declarations are read from the method files' source
(:func:`method_declarations`), not by importing them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from harness.metrics import OBJECTIVE_METRICS
from harness.protocol_spec import EvaluationPlan, parse_evaluate

# ----------------------------------------------------------------------------------------------
# Knob declarations

BACKBONE_NAMES: tuple[str, ...] = ("small_cnn", "resnet18", "resnet50", "vit_small")
# `timm:NAME`: any architecture of the optional `timm` package (the `timm` extra), built without
# pretrained weights. Validation checks the form only (importing timm would import torch); whether
# timm is installed and knows NAME is checked when the trial builds its encoder.
TIMM_PREFIX = "timm:"
_TIMM_MODEL = re.compile(r"[A-Za-z0-9_]+")


def timm_model_name(backbone: str) -> str | None:
    """``NAME`` of a ``timm:NAME`` backbone, None for the harness's own backbones."""
    return backbone[len(TIMM_PREFIX):] if backbone.startswith(TIMM_PREFIX) else None


def _is_timm_backbone(value: Any) -> bool:
    name = timm_model_name(value) if isinstance(value, str) else None
    return name is not None and _TIMM_MODEL.fullmatch(name) is not None


DATASET_NAMES: tuple[str, ...] = (
    "fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "synthetic", "digits", "imagefolder", "imagenet100",
)
# What the encoder pretrains on; k-NN and the probe always use the labeled train and test splits.
PRETRAIN_SPLITS: tuple[str, ...] = ("train", "unlabeled", "train+unlabeled")
# Datasets that have an unlabeled split (an image folder's is ROOT/unlabeled/, found at run time);
# pretrain_split unlabeled or train+unlabeled on any other is refused in validation.
UNLABELED_DATASETS: tuple[str, ...] = ("stl10", "imagefolder", "imagenet100")
# Augmentation presets: the seed notebook's recipe at every size, or the papers' by resolution.
AUG_PRESETS: tuple[str, ...] = ("seed", "paper")
# What preparing an image folder does with an unreadable image.
BAD_IMAGE_POLICIES: tuple[str, ...] = ("skip", "error")
# (train, test) images of each dataset's full splits, where fixed: train_size/test_size above them
# are refused in validation rather than at run time.
DATASET_SIZES: dict[str, tuple[int, int]] = {
    "fashion-mnist": (60_000, 10_000),
    "mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "stl10": (5_000, 8_000),
    "digits": (1_437, 360),
}
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "lars")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
LOSS_IMPLS: tuple[str, ...] = ("reference", "fast")
STUDY_KINDS: tuple[str, ...] = ("grid", "ablate", "search")
SAMPLERS: tuple[str, ...] = ("tpe", "random", "grid", "cmaes", "nsga2")
# Samplers that handle several objectives (Optuna's CMA-ES is single-objective).
MULTI_OBJECTIVE_SAMPLERS: tuple[str, ...] = ("tpe", "random", "grid", "nsga2")
# The trackers a study file (or harness run --mlflow/--tensorboard) can switch on, and where each
# writes when given `true` instead of a location (harness.tracking reads this).
TRACKERS: dict[str, str] = {"mlflow": "mlruns", "tensorboard": "runs"}
PRUNERS: tuple[str, ...] = ("none", "median", "hyperband")
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")
# Largest integer a knob may take: the databases store 64-bit signed integers.
MAX_INT = 2**63 - 1
# Seeds: 32 bits, what every generator (torch, NumPy, Python) takes and a person writes.
MAX_SEED = 2**32 - 1

KNOB_GROUPS: tuple[str, ...] = ("what", "swept", "training", "method", "execution", "evaluation")


class _InIdentity:
    """Marker of a knob that has been part of every configuration's identity since wave 1."""

    def __repr__(self) -> str:
        return "IN_IDENTITY"


IN_IDENTITY: Any = _InIdentity()


@dataclass(frozen=True)
class Check:
    """A range or membership condition: ``holds(value)``, described as ``expected`` after the type
    ("> 0" makes "a number > 0"), or as the whole expectation when ``whole`` (a list of names)."""

    holds: Callable[[Any], bool]
    expected: str
    whole: bool = False


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def above(bound: float) -> Check:
    return Check(lambda v: v > bound, f"> {_number(bound)}")


def at_least(bound: float) -> Check:
    return Check(lambda v: v >= bound, f">= {_number(bound)}")


def within(low: float, high: float) -> Check:
    return Check(lambda v: low <= v <= high, f"in [{_number(low)}, {_number(high)}]")


@dataclass(frozen=True)
class Knob:
    """One knob of ``TrialConfig``, as declared with :func:`knob`."""

    name: str
    hint: Any
    default: Any
    meaning: str
    group: str
    check: Check | None = None  # with choices: the form of the values accepted besides them
    choices: Sequence[str] | Callable[[], Sequence[str]] = ()
    label: str = ""
    # The value that reproduces the behaviour from before the knob existed. A configuration whose
    # value equals it leaves the knob out of its identity, so adding the knob keeps every stored
    # trial's configuration hash. IN_IDENTITY: a knob of the first release, always hashed.
    legacy: Any = IN_IDENTITY
    identity: bool = True  # seed and device are not part of what a configuration is
    training: bool = False  # only training reads it: an untrained method (random_init) ignores it
    null_means: str = ""  # what null stands for, said in error messages ("the whole split")

    @property
    def base_type(self) -> Any:
        return next((a for a in get_args(self.hint) if a is not type(None)), self.hint)

    @property
    def optional(self) -> bool:
        return type(None) in get_args(self.hint)

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    @property
    def type_label(self) -> str:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        label = names.get(self.base_type, str(self.base_type))
        return label + (" or null" if self.optional else "")

    @property
    def expected(self) -> str:
        """What a value must be, e.g. "an integer >= 2 or null (the whole split)"."""
        if self.options:
            text = f"one of {', '.join(self.options)}"
            if self.check is not None:  # a named choice, or a value of the check's form
                text += f", or {self.check.expected}"
        elif self.check is not None and self.check.whole:
            text = self.check.expected
        elif self.check is not None:
            base = self.type_label.removesuffix(" or null")
            text = f"{base} {self.check.expected}"
        else:
            text = self.type_label.removesuffix(" or null")
        if not self.optional:
            return text
        return text + (f" or null ({self.null_means})" if self.null_means else " or null")

    @property
    def plot_label(self) -> str:
        return self.label or self.name.replace("_", " ")


def knob(
    default: Any,
    meaning: str,
    *,
    group: str,
    check: Check | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] = (),
    label: str = "",
    legacy: Any = IN_IDENTITY,
    identity: bool = True,
    training: bool = False,
    null_means: str = "",
) -> Any:
    """Declare a field of ``TrialConfig`` as a knob (see :class:`Knob` for the arguments)."""
    info = {
        "meaning": meaning,
        "group": group,
        "check": check,
        "choices": choices,
        "label": label,
        "legacy": legacy,
        "identity": identity,
        "training": training,
        "null_means": null_means,
    }
    return field(default=default, metadata={"knob": info})


def _method_names() -> tuple[str, ...]:
    return tuple(method_declarations())


@dataclass(frozen=True)
class TrialConfig:
    """One trial's fully resolved configuration: every knob, with its default (DESIGN.md, "The knobs")."""

    # what
    method: str = knob(
        "simclr",
        "the method, or a baseline (`random_init`: the untrained encoder; `supervised`: trained with labels)",
        group="what",
        choices=_method_names,
    )
    backbone: str = knob(
        "small_cnn",
        "encoder: `small_cnn` (the seed notebook's CNN), `resnet18`/`resnet50` (CIFAR stem below 128 px, "
        "ImageNet stem from 128 px), `vit_small` (ViT-S, patch 4/8/16 at <64/<160/>=160 px), or "
        "`timm:NAME`, any timm architecture, randomly initialized (needs the `timm` extra; docs/DATA.md)",
        group="what",
        choices=BACKBONE_NAMES,
        check=Check(
            _is_timm_backbone,
            "timm:NAME (a timm architecture: letters, digits and _, no `.tag`: no pretrained weights are loaded)",
            whole=True,
        ),
    )
    dataset: str = knob(
        "fashion-mnist",
        "the dataset (same as the top-level `dataset:`); `synthetic` is generated, needs no files; "
        "`imagefolder`/`imagenet100` read `data_root` through prepared shards (docs/DATA.md)",
        group="what",
        choices=DATASET_NAMES,
    )
    data_root: str | None = knob(
        None,
        "folder searched first for the dataset's files (then `$HARNESS_DATA_ROOT`, then system locations)",
        group="what",
    )
    train_size: int | None = knob(
        None,
        "class-balanced training subset; null = the whole split",
        group="what",
        check=at_least(2),
        label="training subset (images)",
        null_means="the whole split",
    )
    test_size: int | None = knob(
        None,
        # Uniformity is a mean over pairs of test projections, so the test subset needs two images.
        "class-balanced test subset for k-NN, the linear probe and alignment/uniformity; null = the whole split",
        group="what",
        check=at_least(2),
        label="test subset (images)",
        null_means="the whole split",
    )
    pretrain_split: str = knob(
        "train",
        "what the encoder trains on: the labeled `train` split, the `unlabeled` split (STL-10, an image "
        "folder's unlabeled/) or `train+unlabeled`; k-NN and the probe use the labeled train/test splits",
        group="what",
        choices=PRETRAIN_SPLITS,
        legacy="train",
        training=True,
    )
    image_size: int | None = knob(
        None,
        "side of the images of `imagefolder`/`imagenet100` shards (shorter side resized, centre crop); "
        "null = 224; other datasets keep their own size",
        group="what",
        check=at_least(8),
        legacy=None,
    )
    on_bad_image: str = knob(
        "skip",
        "preparing an image folder: `skip` unreadable images (counted, listed in the shard) or stop with an `error`",
        group="what",
        choices=BAD_IMAGE_POLICIES,
        legacy="skip",
    )
    # the swept ones
    temperature: float = knob(
        0.5, "softmax temperature of the contrastive losses", group="swept", check=above(0), label="temperature τ"
    )
    batch_size: int = knob(
        256, "images per step (<= `train_size`)", group="swept", check=at_least(2), label="batch size (images)", training=True
    )
    queue_size: int = knob(
        0,
        "negatives (or support set) kept from past batches; see each method's rule",
        group="swept",
        check=at_least(0),
        label="queue size (keys)",
    )
    aug_strength: float = knob(
        1.0,
        "scales the whole augmentation recipe: 0 = identical views, 1 = the standard SimCLR recipe",
        group="swept",
        check=within(0, 2),
        label="augmentation strength (0 = identity, 1 = SimCLR recipe)",
        training=True,
    )
    aug_preset: str = knob(
        "seed",
        "augmentation recipe family: `seed` (the seed notebook's at every size) or `paper` (SimCLR/BYOL/"
        "DINO's by resolution: crop area from 0.08, blur only from 96 px); `aug_strength` scales either",
        group="swept",
        choices=AUG_PRESETS,
        legacy="seed",
        training=True,
    )
    # training
    epochs: int = knob(
        10, "training epochs", group="training", check=within(0, 100_000), label="training epochs", training=True
    )
    optimizer: str = knob(
        "adam", "`sgd`, `adam` (AdamW) or `lars`", group="training", choices=OPTIMIZERS, training=True
    )
    lr: float = knob(
        1e-3,
        "learning rate per 256 images, scaled linearly with `batch_size`",
        group="training",
        check=above(0),
        label="learning rate (per 256 images)",
        training=True,
    )
    weight_decay: float = knob(
        1e-6, "weight decay", group="training", check=at_least(0), label="weight decay", training=True
    )
    warmup_epochs: float = knob(
        1.0,
        "linear warm-up, then cosine decay (may be fractional)",
        group="training",
        check=at_least(0),
        label="warm-up (epochs)",
        training=True,
    )
    # method-specific (which methods read each: their declarations in harness/methods/)
    momentum: float = knob(
        0.99, "EMA momentum of target networks", group="method", check=within(0, 1), label="target EMA momentum"
    )
    proj_hidden_dim: int = knob(
        512, "projector hidden width", group="method", check=at_least(1), label="projector hidden dimension"
    )
    proj_dim: int = knob(128, "projector output width", group="method", check=at_least(1), label="projection dimension")
    pred_hidden_dim: int = knob(
        512, "predictor hidden width", group="method", check=at_least(1), label="predictor hidden dimension"
    )
    local_crops: int = knob(
        0, "extra low-resolution views (multi-crop)", group="method", check=within(0, 16), label="local crops (views)"
    )
    moco_symmetric: bool = knob(False, "symmetrized MoCo loss (both views as queries)", group="method")
    barlow_lambda: float = knob(5e-3, "weight of the off-diagonal term", group="method", check=at_least(0))
    vicreg_sim_coeff: float = knob(25.0, "invariance weight", group="method", check=at_least(0))
    vicreg_std_coeff: float = knob(25.0, "variance weight", group="method", check=at_least(0))
    vicreg_cov_coeff: float = knob(1.0, "covariance weight", group="method", check=at_least(0))
    swav_prototypes: int = knob(100, "number of prototypes", group="method", check=at_least(2), label="prototypes")
    swav_epsilon: float = knob(0.05, "Sinkhorn-Knopp entropy regularization", group="method", check=above(0))
    swav_iterations: int = knob(3, "Sinkhorn-Knopp iterations", group="method", check=at_least(1))
    dino_out_dim: int = knob(1024, "output dimension of the DINO head", group="method", check=at_least(2))
    dino_student_temp: float = knob(0.1, "student temperature", group="method", check=above(0))
    dino_teacher_temp: float = knob(0.07, "teacher temperature after warm-up", group="method", check=above(0))
    dino_warmup_teacher_temp: float = knob(0.04, "teacher temperature at the start", group="method", check=above(0))
    dino_warmup_teacher_temp_epochs: float = knob(
        3.0, "epochs of the teacher-temperature warm-up", group="method", check=at_least(0)
    )
    dino_center_momentum: float = knob(
        0.9, "momentum of the teacher's center", group="method", check=within(0, 1)
    )
    dino_head_bn: bool = knob(
        False,
        "batch norm after the DINO head's hidden layers (the official `use_bn_in_head`)",
        group="method",
        legacy=False,
    )
    supervised_views: int = knob(
        2,
        "augmented views per image the supervised baseline trains on: 2 = both views, the same images, "
        "views and steps as the self-supervised methods (Chen et al. 2020, sec. 6); 1 = one view, "
        "standard supervised training (the reference of the seed's cost table)",
        group="method",
        check=within(1, 2),
        legacy=2,
    )
    random_init_recompute_bn: bool = knob(
        False,
        "recompute the random encoder's batch-norm statistics on the pretraining images (one pass in "
        "training mode, no gradient step) before it is evaluated; false keeps their initial values "
        "(mean 0, variance 1), which were never computed on images; no effect on a backbone without "
        "batch norm (vit_small)",
        group="method",
        legacy=False,
    )
    simsiam_stop_gradient: bool = knob(
        True,
        "stop-gradient on SimSiam's target branch; false is the collapse ablation of Chen & He 2021, sec. 4.1",
        group="method",
        legacy=True,
    )
    simsiam_predictor: bool = knob(
        True,
        "SimSiam's predictor MLP; false regresses the other view's projection directly (Chen & He 2021, sec. 4.2)",
        group="method",
        legacy=True,
    )
    # execution
    device: str = knob(
        "auto",
        "`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; `harness run --device` overrides it",
        group="execution",
        check=Check(
            lambda v: v in DEVICES or re.fullmatch(r"cuda:[0-9]+", v) is not None,
            f"one of {', '.join(DEVICES)} or cuda:N (N >= 0)",
            whole=True,
        ),
        identity=False,
    )
    # How many processes train one trial, not what the trial is: N processes with batch_size / N
    # images each compute the loss and update of the global batch (tests/test_distributed.py), so
    # the knob is outside the identity, like ``device``; before it every trial ran as one process.
    devices_per_trial: int = knob(
        1,
        "processes that train one trial together (`torch.distributed`: one GPU each with NCCL on CUDA, "
        "`cuda:N` .. `cuda:N+devices-1`; gloo on the CPU), each on `batch_size / devices_per_trial` images "
        "of every global batch; evaluation, checkpoints and results on the first; throughput and peak "
        "memory are the whole trial's (docs/SCALING.md)",
        group="execution",
        check=within(1, 1024),
        label="devices per trial",
        legacy=1,
        identity=False,
        training=True,
    )
    # Results differ from the eager augmentation only by float rounding (tests/test_augment.py), so
    # the knob is outside the identity; before it every trial augmented eagerly.
    compile_augmentation: bool = knob(
        False,
        "run the augmentation's pixel stage through `torch.compile` (inductor): about 3.5x the eager "
        "throughput on the CPU at 64 px RGB (13.6x torchvision's ImageFolder + DataLoader; "
        "docs/PERFORMANCE.md), after a one-time compile of tens of seconds per batch shape (cached on "
        "disk); falls back to eager with a warning where it cannot compile (docs/DATA.md)",
        group="execution",
        legacy=False,
        identity=False,
        training=True,
    )
    precision: str = knob(
        "auto", "`auto` (bf16 autocast on CUDA, fp32 on the CPU), `fp32` or `bf16`", group="execution", choices=PRECISIONS
    )
    channels_last: bool = knob(
        True,
        "channels-last (NHWC) activations: faster convolutions with cuDNN and with oneDNN on the CPU",
        group="execution",
    )
    resident_share: float = knob(
        0.5,
        "share of the device memory (RAM on the CPU) a dataset may take to stay resident; a larger one "
        "streams from host memory with prefetch (same results)",
        group="execution",
        check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
        identity=False,
    )
    compile: bool = knob(False, "`torch.compile` the backbone", group="execution")
    loss_impl: str = knob(
        "fast",
        "loss implementation: `fast` or `reference` (the seed notebook's formula as written)",
        group="execution",
        choices=LOSS_IMPLS,
    )
    seed: int = knob(
        0,
        "set by the top-level `seeds:` list, never in `fixed:`/`grid:`",
        group="execution",
        check=within(0, MAX_SEED),
        identity=False,
    )
    # Checkpoints and weights: how a trial is kept, not what it computes, so outside its identity; a
    # trial runs with the values its study file has now (harness.study), not those of when it was
    # registered. Before these knobs a trial kept nothing: checkpoint_minutes 0 and save_weights false.
    checkpoint_minutes: float = knob(
        5.0,
        "minutes of training between checkpoints (0 = none by time); a trial also checkpoints when "
        "stopped (SIGTERM, Ctrl-C) and after its last step",
        group="execution",
        check=at_least(0),
        legacy=0.0,
        identity=False,
        training=True,
    )
    checkpoint_epochs: int = knob(
        0,
        "epochs between checkpoints (0 = none by epoch; with `checkpoint_minutes`, whichever comes first)",
        group="execution",
        check=at_least(0),
        legacy=0,
        identity=False,
        training=True,
    )
    checkpoint_dir: str | None = knob(
        None,
        "folder of the checkpoints and weights, one sub-folder per study and trial; null = beside the "
        "database (`results/harness-checkpoints/` for `results/harness.db`); `harness run --checkpoint-dir` overrides it",
        group="execution",
        legacy=None,
        identity=False,
    )
    save_weights: bool = knob(
        True,
        "write the evaluated encoder as `encoder.safetensors` + `encoder.json` (see `harness weights`)",
        group="execution",
        legacy=False,
        identity=False,
    )
    keep_final_checkpoint: bool = knob(
        True,
        "keep a complete trial's last checkpoint (optimizer and all) beside its weights",
        group="execution",
        legacy=False,
        identity=False,
    )
    # evaluation
    knn_k: int = knob(200, "neighbours of the k-NN evaluation", group="evaluation", check=at_least(1), label="k-NN neighbours k")
    knn_t: float = knob(
        0.1, "temperature of the k-NN's weighted vote", group="evaluation", check=above(0), label="k-NN temperature T"
    )
    linear_epochs: int = knob(
        50, "epochs of the linear probe on cached features", group="evaluation", check=within(1, 100_000), label="linear probe epochs"
    )
    eval_features: str = knob(
        "backbone",
        "what the k-NN, the linear probe, effective rank and feature std read: `backbone` features "
        "or `projector` outputs (the method's projection, `embed`; the backbone for the baselines)",
        group="evaluation",
        choices=("backbone", "projector"),
        label="evaluated features",
        legacy="backbone",
    )
    eval_every: int = knob(
        1,
        "epochs between intermediate k-NN evaluations (curves, pruning); 0 = only at the end",
        group="evaluation",
        check=at_least(0),
    )
    log_every: int = knob(10, "steps between loss/learning-rate curve points", group="evaluation", check=at_least(1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def config_hash(self) -> str:
        """Identity of the configuration, seed and execution device excluded (so a rerun on
        another machine, or another seed, is the same configuration)."""
        return config_hash(self.to_dict())

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


def declared_knobs(config_class: type = TrialConfig) -> dict[str, Knob]:
    """The knobs of a configuration dataclass, by name, in declaration order."""
    hints = get_type_hints(config_class)
    knobs: dict[str, Knob] = {}
    for f in dataclasses.fields(config_class):
        info = f.metadata.get("knob")
        if info is None:
            raise TypeError(f"{config_class.__name__}.{f.name} is not declared with knob(...)")
        knobs[f.name] = Knob(name=f.name, hint=hints[f.name], default=f.default, **info)
    return knobs


KNOBS: dict[str, Knob] = declared_knobs()
KNOB_NAMES: tuple[str, ...] = tuple(KNOBS)
DEFAULTS: TrialConfig = TrialConfig()
HASH_EXCLUDED: frozenset[str] = frozenset(name for name, k in KNOBS.items() if not k.identity)
# Knobs that say how a trial is run and kept, not what it computes: those outside the identity
# but the seed (part of a trial's key) and the device (it decides the precision: bf16 autocast on
# CUDA, float32 on the CPU; `harness run --device` chooses it per run). A pending trial runs with
# the values its study file has when it runs (harness.study.artifacts), and `--set` of only these
# keeps the study's own name (harness.overrides).
KEEPING_KNOBS: tuple[str, ...] = tuple(
    name for name, k in KNOBS.items() if not k.identity and name not in ("seed", "device")
)


def identity_of(config: Mapping[str, Any], knobs: Mapping[str, Knob] | None = None) -> dict[str, Any]:
    """What a configuration's hash covers: every identity knob, except a knob added after the first
    release whose value is still its ``legacy`` one (the configuration behaves as before the knob
    existed, so it is the same configuration). Keys that are not knobs (a stored configuration of a
    newer version) are kept: they still tell configurations apart."""
    knobs = KNOBS if knobs is None else knobs
    identity: dict[str, Any] = {}
    for key, value in sorted(config.items()):
        declared = knobs.get(key)
        if declared is not None and not declared.identity:
            continue
        if declared is not None and declared.legacy is not IN_IDENTITY and value == declared.legacy:
            continue
        identity[key] = value
    return identity


def config_hash(config: Mapping[str, Any], knobs: Mapping[str, Knob] | None = None) -> str:
    identity = identity_of(config, knobs)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Method declarations


@dataclass(frozen=True)
class Rule:
    """A cross-knob rule of one method: ``holds(config)`` or the problem
    ``"{knob}: found V for METHOD with K1 V1, expected {expected}"`` (``context``: the K's named)."""

    knob: str
    holds: Callable[[Any], bool]
    expected: str
    context: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodSpec:
    """A method as the study layer and the reports know it, declared once as ``SPEC`` at the top of
    its file in ``harness/methods/``.

    ``knobs``: each method-specific knob the method reads, with its per-method default (``...`` =
    the knob's own default); ``cite``: where those defaults come from. A knob that no method
    declares is read by every method.
    """

    name: str
    paper: str
    knobs: Mapping[str, Any]
    cite: str = ""
    colour: str = "#777777"
    trains: bool = True
    uses_labels: bool = False
    baseline: bool = False  # a reference row of every comparison (random_init, supervised)
    rules: tuple[Rule, ...] = ()

    def defaults(self) -> dict[str, Any]:
        """The per-method defaults (knobs declared with a value other than ``...``)."""
        return {k: v for k, v in self.knobs.items() if v is not Ellipsis}


METHODS_DIR = Path(__file__).resolve().parent / "methods"


def read_method_declaration(path: Path) -> MethodSpec:
    """The ``SPEC = MethodSpec(...)`` of a method file, evaluated without importing the file (which
    imports torch): the assignment is found with ``ast`` and only its right-hand side is run, with
    the declaration types as its only names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "SPEC"
        ):
            code = compile(ast.Expression(node.value), str(path), "eval")
            value = eval(code, {"__builtins__": {}, "MethodSpec": MethodSpec, "Rule": Rule})
            if not isinstance(value, MethodSpec):
                raise TypeError(f"{path}: SPEC is not a MethodSpec")
            return value
    raise LookupError(f"{path}: no top-level `SPEC = MethodSpec(...)` declaration")


@cache
def method_declarations() -> dict[str, MethodSpec]:
    """Every method's declaration, by name, in ``harness.methods.METHOD_FILES`` order."""
    from harness.methods import METHOD_FILES

    specs = [read_method_declaration(METHODS_DIR / f"{module}.py") for module in METHOD_FILES]
    return {spec.name: spec for spec in specs}


# Tables derived from the method declarations, read on first use (reading the method files is I/O,
# which an import must not do): ``from harness.spec import METHOD_NAMES`` works as before.
@cache
def _derived() -> dict[str, Any]:
    methods = method_declarations()
    method_knobs = {name: frozenset(spec.knobs) for name, spec in methods.items()}
    return {
        "METHOD_NAMES": tuple(methods),
        "METHOD_KNOBS": method_knobs,
        "METHOD_DEFAULTS": {name: spec.defaults() for name, spec in methods.items()},
        "METHOD_SPECIFIC_KNOBS": frozenset().union(*method_knobs.values()),
        "UNTRAINED_METHODS": frozenset(name for name, spec in methods.items() if not spec.trains),
        "BASELINE_METHODS": frozenset(name for name, spec in methods.items() if spec.baseline),
        "LABEL_METHODS": frozenset(name for name, spec in methods.items() if spec.uses_labels),
    }


def __getattr__(name: str) -> Any:
    derived = _derived()
    if name in derived:
        return derived[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def readers_of(knob_name: str) -> tuple[str, ...]:
    """The methods that read a knob: those declaring it, or every method for a common knob."""
    derived = _derived()
    if knob_name in derived["METHOD_SPECIFIC_KNOBS"]:
        return tuple(m for m in derived["METHOD_NAMES"] if knob_name in derived["METHOD_KNOBS"][m])
    return derived["METHOD_NAMES"]


# Training knobs a method without training ignores: not an error for random_init (a method
# comparison fixes them for every method alike), and reset to their defaults in its resolved
# configuration, so a batch-size sweep does not multiply its identical trials.
TRAINING_KNOBS: frozenset[str] = frozenset(name for name, k in KNOBS.items() if k.training)


class SpecError(ValueError):
    """A study file (or configuration) with problems; ``problems`` holds one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} in the study file:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


def describe_value(value: Any) -> str:
    """A value as an error message names it: a string quoted, YAML's null/true/false, or its kind."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return type(value).__name__


def _suggest(name: str, options: Iterable[str]) -> str:
    matches = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def coerce_knob(name: str, value: Any) -> tuple[Any, str | None]:
    """(value converted to the knob's type, None) or (None, what was expected)."""
    declared = KNOBS[name]
    base, label = declared.base_type, declared.type_label
    if value is None:
        return (None, None) if declared.optional else (None, label)
    if base is bool:
        return (value, None) if isinstance(value, bool) else (None, label)
    if base is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return None, label
        if abs(value) > MAX_INT:  # the databases store 64-bit integers
            bounded = declared.check is not None and declared.check.expected.startswith("in [")
            return None, declared.expected if bounded else f"{declared.expected} that fits in 64 bits"
        return value, None
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, label
        if not math.isfinite(float(value)):
            return None, "a finite number"
        return float(value), None
    if base is str:
        return (value, None) if isinstance(value, str) else (None, label)
    return value, None


def check_knob(name: str, value: Any) -> str | None:
    """None if ``value`` is acceptable for knob ``name``, else what was expected."""
    declared = KNOBS[name]
    if value is None:
        return None if declared.optional else declared.expected
    options = declared.options
    if options and (value in options or declared.check is None):
        return None if value in options else declared.expected
    if declared.check is None:
        return None
    try:
        return None if declared.check.holds(value) else declared.expected
    except TypeError:
        return declared.expected


def resolve(overrides: Mapping[str, Any]) -> TrialConfig:
    """A configuration from knob overrides: defaults, then the method's defaults, then ``overrides``.

    Method-specific knobs the method does not read are reset to their defaults. Raises SpecError
    (key names and expectations) on unknown keys, wrong types and out-of-range values.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in KNOBS:
            problems.append(f"{key}: unknown knob{_suggest(key, KNOB_NAMES)}")
            continue
        value, expected = coerce_knob(key, raw)
        if expected is None:
            expected = check_knob(key, value)
        if expected is not None:
            problems.append(f"{key}: found {describe_value(raw)}, expected {expected}")
            continue
        values[key] = value
    if problems:
        raise SpecError(problems)
    spec = method_declarations()[values.get("method", DEFAULTS.method)]
    specific: frozenset[str] = _derived()["METHOD_SPECIFIC_KNOBS"]
    merged: dict[str, Any] = {**spec.defaults(), **values}
    for name in specific - set(spec.knobs):
        merged.pop(name, None)
    if not spec.trains:
        for name in TRAINING_KNOBS:
            merged.pop(name, None)
    for name, value in spec.defaults().items():
        merged.setdefault(name, value)
    config = TrialConfig(**merged)
    cross = cross_check(config)
    if cross:
        raise SpecError(cross)
    return config


def cross_check(config: TrialConfig) -> list[str]:
    """Problems between knobs of one resolved configuration: the method's declared rules, then
    the rules every trained method shares."""
    problems: list[str] = []
    spec = method_declarations()[config.method]
    for rule in spec.rules:
        if not rule.holds(config):
            context = "".join(f" with {name} {getattr(config, name)}" for name in rule.context)
            problems.append(
                f"{rule.knob}: found {getattr(config, rule.knob)} for {config.method}{context}, expected {rule.expected}"
            )
    if config.train_size is not None and config.train_size < config.batch_size and spec.trains:
        problems.append(
            f"batch_size: found {config.batch_size} with train_size {config.train_size}, "
            "expected batch_size <= train_size"
        )
    if spec.trains and config.batch_size % config.devices_per_trial:
        problems.append(
            f"devices_per_trial: found {config.devices_per_trial} with batch_size {config.batch_size}, expected a "
            "divisor of batch_size (batch_size is the global batch, split evenly over the processes)"
        )
    if config.pretrain_split != "train" and config.dataset not in UNLABELED_DATASETS:
        problems.append(
            f"pretrain_split: found {config.pretrain_split} for dataset {config.dataset}, which has no unlabeled "
            f"split, expected train (only {', '.join(UNLABELED_DATASETS)} have one)"
        )
    sizes = DATASET_SIZES.get(config.dataset) if config.data_root is None else None
    for name, full in zip(("train_size", "test_size"), sizes or ()):
        wanted = getattr(config, name)
        if wanted is not None and wanted > full:
            problems.append(f"{name}: found {wanted}, expected at most {full} (the {config.dataset} split's size)")
    return problems


# ----------------------------------------------------------------------------------------------
# Study files


@dataclass(frozen=True)
class SearchParam:
    """One dimension of an Optuna search space."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_categorical(self) -> bool:
        return self.choices is not None

    @property
    def is_int(self) -> bool:
        return not self.is_categorical and _base_type(self.name) is int


@dataclass(frozen=True)
class SearchSpec:
    n_trials: int
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "knn_top1"  # the first objective (the one pruning and "best" use)
    direction: str = "maximize"
    space: tuple[SearchParam, ...] = ()
    enqueue: tuple[Mapping[str, Any], ...] = ()
    # Every objective, in file order, as (metric, direction); one entry for a single objective.
    objectives: tuple[tuple[str, str], ...] = ()

    @property
    def all_objectives(self) -> tuple[tuple[str, str], ...]:
        return self.objectives or ((self.metric, self.direction),)

    @property
    def multi_objective(self) -> bool:
        return len(self.all_objectives) > 1


@dataclass(frozen=True)
class Study:
    """A validated study file. ``points`` are the knob overrides of each grid/ablation point
    (before seeds); a search has one point (``fixed``) and its ``search`` space."""

    name: str
    kind: str
    description: str
    dataset: str
    fixed: Mapping[str, Any]
    seeds: tuple[int, ...]
    points: tuple[Mapping[str, Any], ...]
    search: SearchSpec | None
    text: str
    path: str
    notes: tuple[str, ...] = field(default=())
    # The evaluations run on the saved encoders after training (harness.protocol_spec); they are
    # not knobs: they change no trial's configuration or hash.
    evaluate: EvaluationPlan | None = None
    # tracker name (TRACKERS) -> location, from the file's `tracking:`; empty = none switched on.
    tracking: Mapping[str, str] = field(default_factory=dict)

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def swept_knobs(self) -> tuple[str, ...]:
        """The knobs this study varies (grid/ablate keys, or the search space), in file order."""
        if self.search is not None:
            return tuple(p.name for p in self.search.space)
        keys: list[str] = []
        for point in self.points:
            keys.extend(k for k in point if k not in keys)
        return tuple(keys)

    def trials(self) -> list[TrialConfig]:
        """Every (configuration, seed) of a grid or ablation, deduplicated, in a stable order."""
        seen: set[tuple[str, int]] = set()
        configs: list[TrialConfig] = []
        for point in self.points:
            for seed in self.seeds:
                config = resolve({**self.fixed, **point, "seed": seed})
                key = (config.config_hash, seed)
                if key not in seen:
                    seen.add(key)
                    configs.append(config)
        return configs

    def base_config(self, seed: int | None = None) -> TrialConfig:
        """The fixed point resolved; for a search, with the searched knobs at the first valid corner
        of the space (a searched knob's default may break a rule that every searched value keeps)."""
        if self.search is not None:
            return _resolve_some_search_corner(self.fixed, self.search, 0 if seed is None else seed)
        extra = {"seed": seed} if seed is not None else {}
        return resolve({**self.fixed, **extra})


def _base_type(name: str) -> Any:
    return KNOBS[name].base_type


_TOP_KEYS: dict[str, str] = {
    "study": "the study's name (a string)",
    "description": "a string",
    "dataset": "a dataset name",
    "fixed": "a mapping of knob: value",
    "grid": "a mapping of knob: [values]",
    "ablate": "a mapping of knob: [values]",
    "search": "a mapping with n_trials, sampler, pruner, objective, space",
    "seeds": "a list of integers",
    "evaluate": "a mapping of evaluation protocols (linear, finetune, few_shot, transfer, embedding)",
    "tracking": "a mapping of tracker: location or true (mlflow, tensorboard)",
}
_SEARCH_KEYS: tuple[str, ...] = ("n_trials", "sampler", "pruner", "objective", "space", "enqueue")


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: PyYAML follows YAML 1.1, where ``1e-3`` (an
    exponent without a dot) is a string, and every study writes learning rates that way."""


def _construct_unique_mapping(loader: _StudyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping that refuses a key given twice: YAML loaders keep the last one, so a repeated
    ``study:`` would silently write into another study, a repeated knob would drop a value."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark
            )
        if isinstance(key, str | int | float | bool):
            seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StudyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_study(path: str | Path, *, max_trials: int | None = None) -> Study:
    """Read and validate a study file; raises SpecError listing every problem. ``max_trials``: see
    :func:`parse_study`."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise SpecError([f"{file}: cannot read the study file ({error.strerror or error})"]) from None
    return parse_study(decode_study_text(data, str(file)), source=str(file), max_trials=max_trials)


def decode_study_text(data: bytes, source: str) -> str:
    """A study file's bytes as text: UTF-8 (a UTF-8 byte-order mark is allowed), else a SpecError
    that says what the bytes look like."""
    for bom, encoding in ((b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"), (b"\x00\x00\xfe\xff", "UTF-32")):
        if data.startswith(bom):
            raise SpecError([f"{source}: the file is {encoding} (it starts with a byte-order mark); expected UTF-8 text"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        bad = data[error.start : error.start + 1].hex()
        line = data[: error.start].count(b"\n") + 1
        raise SpecError(
            [f"{source}: line {line}: byte 0x{bad} is not UTF-8 (is the file Latin-1 or binary?); expected UTF-8 text"]
        ) from None


# The most trials one study file may expand to unless ``harness run --trial-limit`` raises it:
# counted before anything is expanded, so a 10^6-point grid is refused at once instead of filling
# memory (a search's n_trials is held to the same limit).
DEFAULT_TRIAL_LIMIT = 10_000
MAX_STUDY_NAME = 100  # fits every backend's column (200) and a file name (255 bytes) with room


def parse_study(text: str, source: str = "<study>", *, max_trials: int | None = None) -> Study:
    """Validate the text of a study file; raises SpecError listing every problem.

    ``max_trials``: refuse a file whose grid/ablation (times its seeds) or search (``n_trials``)
    has more trials, counted before anything is expanded (``harness run`` passes
    ``DEFAULT_TRIAL_LIMIT`` or its ``--trial-limit``); None: no limit (a study already stored).
    """
    problems = _Problems(source)
    try:
        data = yaml.load(text, Loader=_StudyLoader)
    except RecursionError:
        raise SpecError([f"{source}: the YAML nests too deeply to be a study file"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error)
        raise SpecError([f"{source}: {where}YAML syntax error: {reason}"]) from None
    if not isinstance(data, Mapping):
        raise SpecError([f"{source}: the study file must be a mapping of keys (study, grid, ...), found {describe_value(data)}"])

    for key in data:
        if key not in _TOP_KEYS:
            problems.add(str(key), f"unknown key{_suggest(str(key), _TOP_KEYS)}; expected one of {', '.join(_TOP_KEYS)}")

    name = data.get("study")
    if not isinstance(name, str) or not name.strip():
        problems.add("study", f"found {describe_value(name)}, expected {_TOP_KEYS['study']}")
        name = ""
    elif len(name) > MAX_STUDY_NAME:
        problems.add("study", f"found a name of {len(name)} characters, expected at most {MAX_STUDY_NAME}")
        name = ""
    elif not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        problems.add(
            "study",
            f"found {name!r}, expected letters, digits, '-', '_' or '.', not starting with '.' (it names a folder)",
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.add("description", f"found {describe_value(description)}, expected a string")
        description = ""

    kinds = [k for k in STUDY_KINDS if k in data]
    if len(kinds) != 1:
        found = ", ".join(kinds) if kinds else "none of them"
        problems.add("", f"expected exactly one of grid:, ablate: or search:, found {found}")
    kind = kinds[0] if kinds else "grid"

    fixed = _validate_knob_mapping(data.get("fixed", {}), "fixed", problems, lists=False)
    dataset = data.get("dataset", fixed.get("dataset", DEFAULTS.dataset))
    if "dataset" in data:
        if not isinstance(dataset, str) or dataset not in DATASET_NAMES:
            problems.add(
                "dataset",
                f"found {describe_value(dataset)}, expected one of {', '.join(DATASET_NAMES)}"
                + _suggest(str(dataset), DATASET_NAMES),
            )
        elif "dataset" in fixed and fixed["dataset"] != dataset:
            problems.add("fixed.dataset", f"found {fixed['dataset']!r}, which contradicts dataset: {dataset!r}")
        else:
            fixed = {**fixed, "dataset": dataset}

    seeds = _validate_seeds(data.get("seeds", [0]), problems)

    points: list[dict[str, Any]] = []
    search: SearchSpec | None = None
    if max_trials is not None and not _within_trial_limit(kind, data, seeds, max_trials, problems):
        raise SpecError(problems.items)
    if kind in ("grid", "ablate") and kind in data:
        sweep = _validate_knob_mapping(data[kind], kind, problems, lists=True)
        if kind == "grid":
            # (In an ablation a knob in both is the base value and its alternatives.)
            for knob in sweep:
                if knob in fixed:
                    problems.add(f"grid.{knob}", "is also in fixed:, whose value the grid would replace; expected it in one of them")
            keys = list(sweep)
            points = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))] if keys else [{}]
        else:
            points = [{}]
            base = _ablation_base(fixed)
            for knob, values in sweep.items():
                points.extend({knob: value} for value in values if base.get(knob, getattr(DEFAULTS, knob)) != value)
    elif kind == "search" and "search" in data:
        search = _validate_search(data["search"], fixed, problems)
        points = [{}]

    evaluate, evaluate_problems = parse_evaluate(data.get("evaluate"), datasets=DATASET_NAMES)
    for path, message in evaluate_problems:
        problems.add(path, message)
    tracking = _validate_tracking(data["tracking"], problems) if "tracking" in data else {}
    notes: list[str] = []
    # Knobs no method reads are reported with the other problems; resolving the points waits for a
    # file without them (a bad value would come back once per point).
    _check_points(kind, fixed, points, search, seeds, problems, notes, resolve_points=not problems.items)
    if problems.items:
        raise SpecError(problems.items)
    return Study(
        name=name,
        kind=kind,
        description=description.strip(),
        dataset=str(fixed.get("dataset", DEFAULTS.dataset)),
        fixed=fixed,
        seeds=tuple(seeds),
        points=tuple(points),
        search=search,
        text=text,
        path=source,
        notes=tuple(notes),
        evaluate=evaluate,
        tracking=tracking,
    )


def _ablation_base(fixed: Mapping[str, Any]) -> Mapping[str, Any]:
    """The base point of an ablation as it resolves (the method's own defaults included), so that
    a listed value equal to the base method's default is the base point, and one equal only to the
    global default (``dino_head_bn: false`` for DINO) is an alternative. ``fixed`` when it does not
    resolve (its problems are reported elsewhere)."""
    try:
        return resolve(fixed).to_dict()
    except SpecError:
        return fixed


def _within_trial_limit(kind: str, data: Mapping[str, Any], seeds: Sequence[int], limit: int, problems: _Problems) -> bool:
    """Count the trials a file asks for from the list lengths alone; False (with the problem) above
    ``limit``."""
    sweep = data.get(kind)
    if kind == "search":
        n_trials = sweep.get("n_trials") if isinstance(sweep, Mapping) else None
        if isinstance(n_trials, int) and not isinstance(n_trials, bool) and n_trials > limit:
            problems.add(
                "search.n_trials",
                f"found {n_trials}, more than the limit of {limit} trials; expected at most {limit} "
                "(harness run --trial-limit N raises it)",
            )
            return False
        return True
    if not isinstance(sweep, Mapping):
        return True
    lengths = {str(k): len(v) for k, v in sweep.items() if isinstance(v, list)}
    points = math.prod(lengths.values()) if kind == "grid" else 1 + sum(lengths.values())
    total = points * max(len(seeds), 1)
    if total <= limit:
        return True
    factors = " x ".join(f"{length} {kind}.{k}" for k, length in lengths.items())
    how = factors if kind == "grid" else f"1 + {' + '.join(f'{n} {kind}.{k}' for k, n in lengths.items())}"
    problems.add(
        kind,
        f"expands to {total:,} trials ({how}, times {len(seeds)} seeds), more than the limit of {limit:,}; "
        "expected fewer values (harness run --trial-limit N raises the limit)",
    )
    return False


def _validate_seeds(raw: Any, problems: _Problems) -> list[int]:
    if not isinstance(raw, list) or not raw:
        problems.add("seeds", f"found {describe_value(raw)}, expected a non-empty list of integers")
        return [0]
    seeds: list[int] = []
    seen: set[int] = set()  # a set: a list of a million seeds must not cost a million squared
    for i, seed in enumerate(raw):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            problems.add(f"seeds[{i}]", f"found {describe_value(seed)}, expected an integer in [0, {MAX_SEED}]")
        elif seed in seen:
            problems.add(f"seeds[{i}]", f"found {seed} twice, expected distinct seeds")
        else:
            seen.add(seed)
            seeds.append(seed)
    return seeds


def _validate_value(knob: str, raw: Any, path: str, problems: _Problems) -> tuple[bool, Any]:
    value, expected = coerce_knob(knob, raw)
    if expected is None:
        expected = check_knob(knob, value)
    if expected is not None:
        hint = _suggest(str(raw), _choices_of(knob)) if isinstance(raw, str) else ""
        problems.add(path, f"found {describe_value(raw)}, expected {expected}{hint}")
        return False, None
    return True, value


def _choices_of(name: str) -> tuple[str, ...]:
    return KNOBS[name].options


def _validate_knob_mapping(raw: Any, section: str, problems: _Problems, *, lists: bool) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add(section, f"found {describe_value(raw)}, expected a mapping of knob: {'[values]' if lists else 'value'}")
        return {}
    if lists and not raw:
        problems.add(section, "found an empty mapping, expected at least one knob with a list of values")
    result: dict[str, Any] = {}
    for key, raw_value in raw.items():
        path = f"{section}.{key}"
        if key not in KNOB_NAMES:
            problems.add(path, f"unknown knob{_suggest(str(key), KNOB_NAMES)}")
            continue
        if key == "seed":
            # In fixed: it would be silently replaced by each entry of seeds: (default [0]).
            problems.add(path, "seeds are given by the top-level seeds: list (e.g. seeds: [3]), not as a knob")
            continue
        if not lists:
            ok, value = _validate_value(key, raw_value, path, problems)
            if ok:
                result[key] = value
            continue
        if not isinstance(raw_value, list) or not raw_value:
            problems.add(path, f"found {describe_value(raw_value)}, expected a non-empty list of values")
            continue
        values: list[Any] = []
        for i, item in enumerate(raw_value):
            ok, value = _validate_value(key, item, f"{path}[{i}]", problems)
            if ok:
                if value in values:
                    problems.add(f"{path}[{i}]", f"found {describe_value(item)} twice, expected distinct values")
                else:
                    values.append(value)
        result[key] = values
    return result


def _validate_search(raw: Any, fixed: Mapping[str, Any], problems: _Problems) -> SearchSpec | None:
    if not isinstance(raw, Mapping):
        problems.add("search", f"found {describe_value(raw)}, expected {_TOP_KEYS['search']}")
        return None
    for key in raw:
        if key not in _SEARCH_KEYS:
            problems.add(f"search.{key}", f"unknown key{_suggest(str(key), _SEARCH_KEYS)}; expected one of {', '.join(_SEARCH_KEYS)}")
    n_trials = raw.get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        problems.add("search.n_trials", f"found {describe_value(n_trials)}, expected an integer >= 1")
        n_trials = 1
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        problems.add("search.sampler", f"found {describe_value(sampler)}, expected one of {', '.join(SAMPLERS)}{_suggest(str(sampler), SAMPLERS)}")
    pruner = raw.get("pruner", "median")
    if pruner is None:
        pruner = "none"
    if pruner not in PRUNERS:
        problems.add("search.pruner", f"found {describe_value(pruner)}, expected one of {', '.join(PRUNERS)}{_suggest(str(pruner), PRUNERS)}")
    objective = raw.get("objective", {"metric": "knn_top1", "direction": "maximize"})
    objectives = _validate_objectives(objective, problems)
    metric, direction = objectives[0] if objectives else ("knn_top1", "maximize")
    if len(objectives) > 1:
        if "pruner" not in raw:
            pruner = "none"
        elif pruner != "none":
            problems.add("search.pruner", f"found {describe_value(pruner)}, expected none with several objectives (Optuna prunes single-objective searches only)")
        if sampler not in MULTI_OBJECTIVE_SAMPLERS:
            problems.add("search.sampler", f"found {describe_value(sampler)} with several objectives, expected one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}")
    space_raw = raw.get("space")
    space: list[SearchParam] = []
    if not isinstance(space_raw, Mapping) or not space_raw:
        problems.add("search.space", f"found {describe_value(space_raw)}, expected a non-empty mapping of knob: {{low, high, log}} or {{choices: [...]}}")
    else:
        for knob, dim in space_raw.items():
            param = _validate_param(str(knob), dim, fixed, problems)
            if param is not None:
                space.append(param)
    if sampler == "cmaes" and any(p.is_categorical for p in space):
        problems.add("search.sampler", "found cmaes with categorical dimensions, expected only numeric ones (or sampler tpe)")
    if sampler == "grid" and any(not p.is_categorical and p.step is None for p in space):
        problems.add("search.sampler", "found grid with continuous dimensions, expected choices: or step: for every dimension")
    enqueue: list[Mapping[str, Any]] = []
    enqueue_raw = raw.get("enqueue", [])
    if not isinstance(enqueue_raw, list):
        problems.add("search.enqueue", f"found {describe_value(enqueue_raw)}, expected a list of mappings knob: value")
    else:
        by_name = {p.name: p for p in space}
        names = set(by_name)
        for i, point in enumerate(enqueue_raw):
            path = f"search.enqueue[{i}]"
            if not isinstance(point, Mapping):
                problems.add(path, f"found {describe_value(point)}, expected a mapping knob: value")
                continue
            clean: dict[str, Any] = {}
            for knob, value in point.items():
                if knob not in names:
                    # A knob whose space entry was refused already has its problem; say it once.
                    if not (isinstance(space_raw, Mapping) and knob in space_raw):
                        problems.add(f"{path}.{knob}", f"not in search.space, expected one of {', '.join(sorted(names))}")
                    continue
                ok, coerced = _validate_value(str(knob), value, f"{path}.{knob}", problems)
                if ok and (outside := _outside_space(by_name[str(knob)], coerced)):
                    problems.add(f"{path}.{knob}", f"found {describe_value(value)}, expected {outside}")
                elif ok:
                    clean[str(knob)] = coerced
            enqueue.append(clean)
    return SearchSpec(
        n_trials=n_trials,
        sampler=str(sampler),
        pruner=str(pruner),
        metric=str(metric),
        direction=str(direction),
        space=tuple(space),
        enqueue=tuple(enqueue),
        objectives=tuple(objectives) if len(objectives) > 1 else (),
    )


def _validate_objectives(raw: Any, problems: _Problems) -> list[tuple[str, str]]:
    """``objective:`` as a mapping {metric, direction}, or a list of them (a multi-objective search,
    e.g. accuracy and throughput); the valid ones as (metric, direction)."""
    entries = [("search.objective", raw)] if isinstance(raw, Mapping) else None
    if isinstance(raw, list) and raw:
        entries = [(f"search.objective[{i}]", item) for i, item in enumerate(raw)]
    if entries is None:
        problems.add("search.objective", f"found {describe_value(raw)}, expected a mapping {{metric: ..., direction: ...}} or a non-empty list of them")
        return []
    objectives: list[tuple[str, str]] = []
    for path, entry in entries:
        if not isinstance(entry, Mapping):
            problems.add(path, f"found {describe_value(entry)}, expected a mapping {{metric: ..., direction: ...}}")
            continue
        for key in entry:
            if key not in ("metric", "direction"):
                problems.add(f"{path}.{key}", "unknown key; expected metric or direction")
        metric = entry.get("metric", "knn_top1")
        direction = entry.get("direction", "maximize")
        ok = True
        if metric not in OBJECTIVE_METRICS:
            problems.add(f"{path}.metric", f"found {describe_value(metric)}, expected one of {', '.join(OBJECTIVE_METRICS)}{_suggest(str(metric), OBJECTIVE_METRICS)}")
            ok = False
        elif any(metric == m for m, _ in objectives):
            problems.add(f"{path}.metric", f"found {metric!r} twice, expected distinct objectives")
            ok = False
        if direction not in DIRECTIONS:
            problems.add(f"{path}.direction", f"found {describe_value(direction)}, expected maximize or minimize")
            ok = False
        if ok:
            objectives.append((str(metric), str(direction)))
    return objectives


def _validate_tracking(raw: Any, problems: _Problems) -> dict[str, str]:
    """``tracking: {mlflow: URI-or-folder | true, tensorboard: folder | true}``; false/null = off."""
    if not isinstance(raw, Mapping):
        problems.add("tracking", f"found {describe_value(raw)}, expected {_TOP_KEYS['tracking']}")
        return {}
    settings: dict[str, str] = {}
    for key, value in raw.items():
        if key not in TRACKERS:
            problems.add(f"tracking.{key}", f"unknown tracker{_suggest(str(key), TRACKERS)}; expected one of {', '.join(TRACKERS)}")
        elif value is True:
            settings[str(key)] = TRACKERS[str(key)]
        elif value is False or value is None:
            continue
        elif isinstance(value, str) and value.strip():
            settings[str(key)] = value.strip()
        else:
            problems.add(f"tracking.{key}", f"found {describe_value(value)}, expected a location (a URI or a folder), true or false")
    return settings


def _outside_space(param: SearchParam, value: Any) -> str | None:
    """None if ``value`` is a point of the dimension, else what it should be (Optuna only warns
    about an enqueued value outside the space, then samples it anyway)."""
    if param.choices is not None:
        return None if value in param.choices else f"one of the search.space choices {list(param.choices)}"
    if param.low is not None and param.high is not None and not param.low <= value <= param.high:
        return f"a value in the search.space range [{param.low}, {param.high}]"
    return None


def _validate_param(knob: str, dim: Any, fixed: Mapping[str, Any], problems: _Problems) -> SearchParam | None:
    path = f"search.space.{knob}"
    if knob not in KNOB_NAMES or knob == "seed":
        problems.add(path, f"unknown knob{_suggest(knob, KNOB_NAMES)}")
        return None
    if knob in fixed:
        problems.add(path, f"is also set in fixed.{knob}, expected a knob to be either fixed or searched")
    if not isinstance(dim, Mapping):
        problems.add(path, f"found {describe_value(dim)}, expected {{low, high, log}} or {{choices: [...]}}")
        return None
    unknown = [k for k in dim if k not in ("low", "high", "log", "step", "choices")]
    for key in unknown:
        problems.add(f"{path}.{key}", "unknown key; expected low, high, log, step or choices")
    if "choices" in dim:
        choices = dim["choices"]
        if not isinstance(choices, list) or not choices:
            problems.add(f"{path}.choices", f"found {describe_value(choices)}, expected a non-empty list")
            return None
        ok_all = True
        for i, choice in enumerate(choices):
            ok, _ = _validate_value(knob, choice, f"{path}.choices[{i}]", problems)
            ok_all &= ok
        return SearchParam(name=knob, choices=tuple(choices)) if ok_all else None
    base = _base_type(knob)
    if base not in (int, float):
        problems.add(path, f"{knob} is not numeric, expected {{choices: [...]}}")
        return None
    low, high = dim.get("low"), dim.get("high")
    ok = True
    for key, value in (("low", low), ("high", high)):
        good, _ = _validate_value(knob, value, f"{path}.{key}", problems)
        ok &= good
    if not ok:
        return None
    log = dim.get("log", False)
    if not isinstance(log, bool):
        problems.add(f"{path}.log", f"found {describe_value(log)}, expected true or false")
        log = False
    if low >= high:
        problems.add(path, f"found low {low} >= high {high}, expected low < high")
        return None
    if log and low <= 0:
        problems.add(f"{path}.low", f"found {low} with log: true, expected low > 0")
        return None
    step = dim.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        problems.add(f"{path}.step", f"found {describe_value(step)}, expected a number > 0")
        step = None
    if step is not None and log:
        # Optuna cannot combine a log scale with a step.
        problems.add(path, f"found log: true and step: {step}, expected one of them")
        return None
    return SearchParam(name=knob, low=low, high=high, log=log, step=step)


# Enough corners of a search space to find one valid point without enumerating a large space.
MAX_SEARCH_CORNERS = 256


def _resolve_some_search_corner(fixed: Mapping[str, Any], search: SearchSpec, seed: int) -> TrialConfig:
    """Resolve ``fixed`` with the searched knobs at the corners of the space (each choice, each bound)
    and return the first valid configuration; raise the first corner's SpecError when none is. A
    searched knob's default must not fail the file (``batch_size`` 256 with ``train_size`` 200 when
    the space is [16, 32]); a corner that breaks a cross-knob rule is only a failed Optuna trial."""
    values = []
    for param in search.space:
        if param.choices is not None:
            values.append([(param.name, choice) for choice in param.choices])
        else:
            cast = int if _base_type(param.name) is int else float
            values.append([(param.name, cast(bound)) for bound in (param.low, param.high)])
    first_error: SpecError | None = None
    for corner in itertools.islice(itertools.product(*values), MAX_SEARCH_CORNERS):
        try:
            return resolve({**fixed, **dict(corner), "seed": seed})
        except SpecError as error:
            first_error = first_error or error
    if first_error is not None:
        raise first_error
    return resolve({**fixed, "seed": seed})


def _legal_but_surprising(config: TrialConfig) -> list[str]:
    """Values that run, but not as a researcher may expect: said as notes, not refused."""
    notes = []
    if config.train_size is not None and config.knn_k > config.train_size:
        notes.append(
            f"knn_k {config.knn_k} is more than train_size {config.train_size}: the k-NN vote uses all "
            f"{config.train_size} training images"
        )
    if method_declarations()[config.method].trains and config.warmup_epochs > config.epochs:
        notes.append(
            f"warmup_epochs {config.warmup_epochs:g} is more than epochs {config.epochs}: the learning rate "
            "never reaches its base value"
        )
    return notes


def _check_points(
    kind: str,
    fixed: Mapping[str, Any],
    points: Sequence[Mapping[str, Any]],
    search: SearchSpec | None,
    seeds: Sequence[int],
    problems: _Problems,
    notes: list[str],
    *,
    resolve_points: bool = True,
) -> None:
    """Find unused method knobs, then (``resolve_points``) resolve every point to find range and
    cross-knob problems."""
    derived = _derived()
    METHOD_NAMES, METHOD_KNOBS = derived["METHOD_NAMES"], derived["METHOD_KNOBS"]
    METHOD_SPECIFIC_KNOBS = derived["METHOD_SPECIFIC_KNOBS"]
    methods: set[str] = set()
    for point in points:
        methods.add(point.get("method", fixed.get("method", DEFAULTS.method)))
    if search is not None:
        for param in search.space:
            if param.name == "method" and param.choices:
                methods.update(param.choices)
    for knob in fixed:
        if knob in METHOD_SPECIFIC_KNOBS and not any(knob in METHOD_KNOBS[m] for m in methods):
            problems.add(f"fixed.{knob}", f"is not used by {', '.join(sorted(methods))}; expected a knob one of the study's methods reads")
    swept = list(dict.fromkeys(knob for point in points for knob in point))
    if search is not None:
        for param in search.space:
            if param.name in METHOD_SPECIFIC_KNOBS and not any(param.name in METHOD_KNOBS[m] for m in methods):
                problems.add(f"search.space.{param.name}", f"is not used by {', '.join(sorted(methods))}")
    base_method = fixed.get("method", DEFAULTS.method)
    for knob in swept:
        if knob in METHOD_SPECIFIC_KNOBS:
            # An ablation varies one knob at a time from the base: a knob's points run with the base
            # method, whatever other methods the ablation lists under method:.
            runs_with = {base_method} if kind == "ablate" else methods
            ignoring = sorted(m for m in runs_with if knob not in METHOD_KNOBS[m])
            users = sorted(m for m in runs_with if knob in METHOD_KNOBS[m])
            if not users and kind == "ablate":
                readers = sorted(m for m in METHOD_NAMES if knob in METHOD_KNOBS[m])
                problems.add(
                    f"{kind}.{knob}",
                    f"is not used by {base_method}, the base method its points run with (an ablation varies one "
                    f"knob at a time); expected method: {readers[0] if readers else '...'} in fixed:, or a grid:",
                )
            elif not users:
                problems.add(f"{kind}.{knob}", f"is not used by {', '.join(ignoring)}; expected a knob one of the study's methods reads")
            elif ignoring:
                verb = "ignores" if len(ignoring) == 1 else "ignore"
                notes.append(
                    f"{kind}.{knob} is swept for {', '.join(users)}; {', '.join(ignoring)} {verb} it (one trial each per seed)"
                )
    seen_messages: set[str] = set()
    for point in points if resolve_points else ():
        try:
            if search is not None:
                config = _resolve_some_search_corner(fixed, search, seeds[0] if seeds else 0)
            else:
                config = resolve({**fixed, **point, "seed": seeds[0] if seeds else 0})
            for note in _legal_but_surprising(config):
                if note not in notes:
                    notes.append(note)
        except SpecError as error:
            label = ", ".join(f"{k}={v}" for k, v in point.items())
            for message in error.problems:
                if message not in seen_messages:
                    seen_messages.add(message)
                    if search is not None:
                        where = "search.space: no corner of the space (each choice, each bound) is valid; the first"
                    else:
                        where = f"{kind} point ({label})" if point else "fixed"
                    problems.add(where, message)
