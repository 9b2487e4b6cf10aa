"""Study files: parse, validate and resolve them into frozen trial configurations.

Every knob of a trial has exactly one default, here (``TrialConfig``), refined per method by
``METHOD_DEFAULTS`` (each value cites where it comes from). Nothing in this module imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

METHOD_NAMES: tuple[str, ...] = (
    "simclr",
    "moco",
    "byol",
    "simsiam",
    "barlow_twins",
    "vicreg",
    "swav",
    "dino",
    "supcon",
    "random_init",
    "supervised",
)
BASELINE_METHODS: frozenset[str] = frozenset({"random_init", "supervised"})
BACKBONE_NAMES: tuple[str, ...] = ("small_cnn", "resnet18")
DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "synthetic", "digits")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "lars")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
LOSS_IMPLS: tuple[str, ...] = ("reference", "fast")
STUDY_KINDS: tuple[str, ...] = ("grid", "ablate", "search")
SAMPLERS: tuple[str, ...] = ("tpe", "random", "grid", "cmaes")
PRUNERS: tuple[str, ...] = ("none", "median", "hyperband")
OBJECTIVE_METRICS: tuple[str, ...] = (
    "knn_top1",
    "linear_top1",
    "linear_top5",
    "final_loss",
    "alignment",
    "uniformity",
    "effective_rank",
    "feature_std",
    "train_img_per_s",
)
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")


@dataclass(frozen=True)
class TrialConfig:
    """One trial's fully resolved configuration: every knob of DESIGN.md, with its default."""

    # what
    method: str = "simclr"
    backbone: str = "small_cnn"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    train_size: int | None = None  # None = the whole split
    test_size: int | None = None
    # the swept ones
    temperature: float = 0.5
    batch_size: int = 256
    queue_size: int = 0
    aug_strength: float = 1.0
    # training
    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3  # per 256 images, scaled linearly with batch_size
    weight_decay: float = 1e-6
    warmup_epochs: float = 1.0
    momentum: float = 0.99  # EMA of target networks
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    pred_hidden_dim: int = 512
    local_crops: int = 0  # multi-crop: extra low-resolution views (SwAV, DINO)
    moco_symmetric: bool = False
    barlow_lambda: float = 5e-3
    vicreg_sim_coeff: float = 25.0
    vicreg_std_coeff: float = 25.0
    vicreg_cov_coeff: float = 1.0
    swav_prototypes: int = 100
    swav_epsilon: float = 0.05
    swav_iterations: int = 3
    dino_out_dim: int = 1024
    dino_student_temp: float = 0.1
    dino_teacher_temp: float = 0.07
    dino_warmup_teacher_temp: float = 0.04
    dino_warmup_teacher_temp_epochs: float = 3.0
    dino_center_momentum: float = 0.9
    dino_head_bn: bool = False
    simsiam_stop_gradient: bool = True
    simsiam_predictor: bool = True
    # execution
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on the CPU
    channels_last: bool = True  # NHWC activations: faster convolutions with cuDNN and with oneDNN on the CPU
    compile: bool = False
    loss_impl: str = "fast"
    seed: int = 0
    # evaluation
    knn_k: int = 200
    knn_t: float = 0.1
    linear_epochs: int = 50
    eval_features: str = "backbone"
    eval_every: int = 1  # epochs between intermediate k-NN evaluations; 0 = only at the end
    log_every: int = 10  # steps between loss/lr curve points

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def config_hash(self) -> str:
        """Identity of the configuration, seed and execution device excluded (so a rerun on
        another machine, or another seed, is the same configuration)."""
        return config_hash(self.to_dict())

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


HASH_EXCLUDED: frozenset[str] = frozenset({"seed", "device"})


def config_hash(config: Mapping[str, Any]) -> str:
    identity = {k: v for k, v in sorted(config.items()) if k not in HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialConfig))
_KNOB_TYPES: dict[str, Any] = get_type_hints(TrialConfig)
DEFAULTS: TrialConfig = TrialConfig()

# Knobs that only some methods read. A study that sets one for a method that ignores it gets an
# error (in `fixed`) or a note (when a grid sweeps it for other methods); the resolved configuration
# of such a method keeps the default, so the sweep does not multiply its identical trials.
METHOD_KNOBS: dict[str, frozenset[str]] = {
    "simclr": frozenset({"temperature", "proj_hidden_dim", "proj_dim"}),
    "moco": frozenset({"temperature", "queue_size", "momentum", "proj_hidden_dim", "proj_dim", "moco_symmetric"}),
    "byol": frozenset({"momentum", "proj_hidden_dim", "proj_dim", "pred_hidden_dim"}),
    "simsiam": frozenset(
        {"proj_hidden_dim", "proj_dim", "pred_hidden_dim", "simsiam_stop_gradient", "simsiam_predictor"}
    ),
    "barlow_twins": frozenset({"proj_hidden_dim", "proj_dim", "barlow_lambda"}),
    "vicreg": frozenset(
        {"proj_hidden_dim", "proj_dim", "vicreg_sim_coeff", "vicreg_std_coeff", "vicreg_cov_coeff"}
    ),
    "swav": frozenset(
        {
            "temperature",
            "queue_size",
            "proj_hidden_dim",
            "proj_dim",
            "local_crops",
            "swav_prototypes",
            "swav_epsilon",
            "swav_iterations",
        }
    ),
    "dino": frozenset(
        {
            "momentum",
            "proj_hidden_dim",
            "proj_dim",
            "local_crops",
            "dino_out_dim",
            "dino_student_temp",
            "dino_teacher_temp",
            "dino_warmup_teacher_temp",
            "dino_warmup_teacher_temp_epochs",
            "dino_center_momentum",
            "dino_head_bn",
        }
    ),
    "supcon": frozenset({"temperature", "proj_hidden_dim", "proj_dim"}),
    "random_init": frozenset(),
    "supervised": frozenset(),
}
METHOD_SPECIFIC_KNOBS: frozenset[str] = frozenset().union(*METHOD_KNOBS.values())
# Training knobs a method without training ignores: not an error for random_init (a method
# comparison fixes them for every method alike), and reset to their defaults in its resolved
# configuration, so a batch-size sweep does not multiply its identical trials.
UNTRAINED_METHODS: frozenset[str] = frozenset({"random_init"})
TRAINING_KNOBS: frozenset[str] = frozenset(
    {"epochs", "optimizer", "lr", "weight_decay", "warmup_epochs", "batch_size", "aug_strength"}
)

# Per-method defaults, on top of TrialConfig's. Small-budget settings (tens of epochs on
# 28-px images), so Adam at 1e-3 per 256 images everywhere: the papers' LARS/SGD settings need
# hundreds of epochs; a study can set `optimizer: lars` and the papers' lr.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chen et al. 2020 (SimCLR), CIFAR-10 appendix B.9: temperature 0.5; projector 2-layer MLP, 128-d out.
    "simclr": {"temperature": 0.5, "proj_hidden_dim": 512, "proj_dim": 128},
    # Chen et al. 2020 (MoCo v2): temperature 0.2, MLP head 2048-128, key momentum 0.999 on
    # ImageNet; 0.99 and a 4096-key queue are the usual CIFAR settings (solo-learn).
    "moco": {"temperature": 0.2, "queue_size": 4096, "momentum": 0.99, "proj_hidden_dim": 512, "proj_dim": 128},
    # Grill et al. 2020 (BYOL): tau_base 0.996 with a cosine schedule to 1; projector/predictor
    # 4096-256 (scaled down to 1024-256 for small encoders).
    "byol": {"momentum": 0.996, "proj_hidden_dim": 1024, "proj_dim": 256, "pred_hidden_dim": 1024},
    # Chen & He 2021 (SimSiam), CIFAR: 2048-d projector, predictor bottleneck 512.
    "simsiam": {"proj_hidden_dim": 2048, "proj_dim": 2048, "pred_hidden_dim": 512},
    # Zbontar et al. 2021 (Barlow Twins): lambda 5e-3, projector 8192-8192 on ImageNet; 2048 on CIFAR (solo-learn).
    "barlow_twins": {"barlow_lambda": 5e-3, "proj_hidden_dim": 2048, "proj_dim": 2048},
    # Bardes et al. 2022 (VICReg): lambda = mu = 25, nu = 1; projector 2048 on CIFAR (solo-learn).
    "vicreg": {
        "vicreg_sim_coeff": 25.0,
        "vicreg_std_coeff": 25.0,
        "vicreg_cov_coeff": 1.0,
        "proj_hidden_dim": 2048,
        "proj_dim": 2048,
    },
    # Caron et al. 2020 (SwAV): temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, 128-d
    # projection; 100 prototypes is the CIFAR-sized setting; 2 local crops keeps the CPU budget.
    "swav": {
        "temperature": 0.1,
        "swav_epsilon": 0.05,
        "swav_iterations": 3,
        "swav_prototypes": 100,
        "proj_hidden_dim": 512,
        "proj_dim": 128,
        "local_crops": 2,
        "queue_size": 0,
    },
    # Caron et al. 2021 (DINO): student temperature 0.1, teacher 0.04 -> 0.07 warm-up, center
    # momentum 0.9, teacher momentum 0.996; bottleneck 256, output dimension scaled down to 1024.
    "dino": {
        "momentum": 0.996,
        "dino_student_temp": 0.1,
        "dino_teacher_temp": 0.07,
        "dino_warmup_teacher_temp": 0.04,
        "dino_center_momentum": 0.9,
        "dino_head_bn": True,
        "dino_out_dim": 1024,
        "proj_hidden_dim": 512,
        "proj_dim": 256,
        "local_crops": 2,
    },
    # Khosla et al. 2020 (SupCon): temperature 0.1, 128-d projection.
    "supcon": {"temperature": 0.1, "proj_hidden_dim": 512, "proj_dim": 128},
    "random_init": {},
    "supervised": {},
}

# Range checks: knob -> (predicate, what was expected).
_CHECKS: dict[str, tuple[Any, str]] = {
    "temperature": (lambda v: v > 0, "a number > 0"),
    "batch_size": (lambda v: v >= 2, "an integer >= 2"),
    "queue_size": (lambda v: v >= 0, "an integer >= 0"),
    "aug_strength": (lambda v: 0 <= v <= 2, "a number in [0, 2]"),
    "epochs": (lambda v: v >= 0, "an integer >= 0"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
    "momentum": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "proj_hidden_dim": (lambda v: v >= 1, "an integer >= 1"),
    "proj_dim": (lambda v: v >= 1, "an integer >= 1"),
    "pred_hidden_dim": (lambda v: v >= 1, "an integer >= 1"),
    "local_crops": (lambda v: 0 <= v <= 16, "an integer in [0, 16]"),
    "barlow_lambda": (lambda v: v >= 0, "a number >= 0"),
    "vicreg_sim_coeff": (lambda v: v >= 0, "a number >= 0"),
    "vicreg_std_coeff": (lambda v: v >= 0, "a number >= 0"),
    "vicreg_cov_coeff": (lambda v: v >= 0, "a number >= 0"),
    "swav_prototypes": (lambda v: v >= 2, "an integer >= 2"),
    "swav_epsilon": (lambda v: v > 0, "a number > 0"),
    "swav_iterations": (lambda v: v >= 1, "an integer >= 1"),
    "dino_out_dim": (lambda v: v >= 2, "an integer >= 2"),
    "dino_student_temp": (lambda v: v > 0, "a number > 0"),
    "dino_teacher_temp": (lambda v: v > 0, "a number > 0"),
    "dino_warmup_teacher_temp": (lambda v: v > 0, "a number > 0"),
    "dino_warmup_teacher_temp_epochs": (lambda v: v >= 0, "a number >= 0"),
    "dino_center_momentum": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "train_size": (lambda v: v is None or v >= 2, "an integer >= 2 or null (the whole split)"),
    # Uniformity is a mean over pairs of test projections, so the test subset needs two images.
    "test_size": (lambda v: v is None or v >= 2, "an integer >= 2 or null (the whole split)"),
    "knn_k": (lambda v: v >= 1, "an integer >= 1"),
    "knn_t": (lambda v: v > 0, "a number > 0"),
    "linear_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "eval_every": (lambda v: v >= 0, "an integer >= 0 (0 = only at the end)"),
    "log_every": (lambda v: v >= 1, "an integer >= 1"),
    "method": (lambda v: v in METHOD_NAMES, f"one of {', '.join(METHOD_NAMES)}"),
    "backbone": (lambda v: v in BACKBONE_NAMES, f"one of {', '.join(BACKBONE_NAMES)}"),
    "dataset": (lambda v: v in DATASET_NAMES, f"one of {', '.join(DATASET_NAMES)}"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "device": (lambda v: v in DEVICES or v.startswith("cuda:"), f"one of {', '.join(DEVICES)} or cuda:N"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "loss_impl": (lambda v: v in LOSS_IMPLS, f"one of {', '.join(LOSS_IMPLS)}"),
    "seed": (lambda v: v >= 0, "an integer >= 0"),
    "eval_features": (lambda v: v in ("backbone", "projector"), "one of backbone, projector"),
}


class SpecError(ValueError):
    """A study file (or configuration) with problems; ``problems`` holds one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} in the study file:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _suggest(name: str, options: Iterable[str]) -> str:
    matches = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _type_label(hint: Any) -> str:
    base = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is not None else [hint]
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    label = " or ".join(names.get(b, str(b)) for b in base)
    return label + (" or null" if type(None) in get_args(hint) else "")


def coerce_knob(name: str, value: Any) -> tuple[Any, str | None]:
    """(value converted to the knob's type, None) or (None, what was expected)."""
    hint = _KNOB_TYPES[name]
    optional = type(None) in get_args(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint)
    if value is None:
        return (None, None) if optional else (None, _type_label(hint))
    if base is bool:
        return (value, None) if isinstance(value, bool) else (None, _type_label(hint))
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
                return int(value), None
            return None, _type_label(hint)
        return value, None
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, _type_label(hint)
        if not math.isfinite(float(value)):
            return None, "a finite number"
        return float(value), None
    if base is str:
        return (value, None) if isinstance(value, str) else (None, _type_label(hint))
    return value, None


def check_knob(name: str, value: Any) -> str | None:
    """None if ``value`` is acceptable for knob ``name``, else what was expected."""
    if name not in _CHECKS or (value is None and name not in ("train_size", "test_size")):
        return None
    predicate, expected = _CHECKS[name]
    try:
        return None if predicate(value) else expected
    except TypeError:
        return expected


def resolve(overrides: Mapping[str, Any]) -> TrialConfig:
    """A configuration from knob overrides: defaults, then the method's defaults, then ``overrides``.

    Method-specific knobs the method does not read are reset to their defaults. Raises SpecError
    (key names and expectations) on unknown keys, wrong types and out-of-range values.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in KNOB_NAMES:
            problems.append(f"{key}: unknown knob{_suggest(key, KNOB_NAMES)}")
            continue
        value, expected = coerce_knob(key, raw)
        if expected is None:
            expected = check_knob(key, value)
        if expected is not None:
            problems.append(f"{key}: found {_describe(raw)}, expected {expected}")
            continue
        values[key] = value
    if problems:
        raise SpecError(problems)
    method = values.get("method", DEFAULTS.method)
    merged: dict[str, Any] = {**METHOD_DEFAULTS.get(method, {}), **values}
    used = METHOD_KNOBS.get(method, frozenset())
    for knob in METHOD_SPECIFIC_KNOBS - used:
        merged.pop(knob, None)
    if method in UNTRAINED_METHODS:
        for knob in TRAINING_KNOBS:
            merged.pop(knob, None)
    for knob in METHOD_DEFAULTS.get(method, {}):
        merged.setdefault(knob, METHOD_DEFAULTS[method][knob])
    config = TrialConfig(**merged)
    cross = cross_check(config)
    if cross:
        raise SpecError(cross)
    return config


def cross_check(config: TrialConfig) -> list[str]:
    """Problems between knobs of one resolved configuration."""
    problems: list[str] = []
    if config.method == "moco" and config.queue_size < config.batch_size:
        problems.append(
            f"queue_size: found {config.queue_size} for moco with batch_size {config.batch_size}, "
            "expected queue_size >= batch_size"
        )
    if config.method == "swav" and 0 < config.queue_size < config.batch_size:
        problems.append(
            f"queue_size: found {config.queue_size} for swav with batch_size {config.batch_size}, "
            "expected 0 (no queue) or >= batch_size"
        )
    if config.train_size is not None and config.train_size < config.batch_size and config.method not in UNTRAINED_METHODS:
        problems.append(
            f"batch_size: found {config.batch_size} with train_size {config.train_size}, "
            "expected batch_size <= train_size"
        )
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
    metric: str = "knn_top1"
    direction: str = "maximize"
    space: tuple[SearchParam, ...] = ()
    enqueue: tuple[Mapping[str, Any], ...] = ()


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


def _base_type(knob: str) -> Any:
    hint = _KNOB_TYPES[knob]
    return next((a for a in get_args(hint) if a is not type(None)), hint)


_TOP_KEYS: dict[str, str] = {
    "study": "the study's name (a string)",
    "description": "a string",
    "dataset": "a dataset name",
    "fixed": "a mapping of knob: value",
    "grid": "a mapping of knob: [values]",
    "ablate": "a mapping of knob: [values]",
    "search": "a mapping with n_trials, sampler, pruner, objective, space",
    "seeds": "a list of integers",
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


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raises SpecError listing every problem."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise SpecError([f"{file}: cannot read the study file ({error.strerror or error})"]) from None
    return parse_study(text, source=str(file))


def parse_study(text: str, source: str = "<study>") -> Study:
    """Validate the text of a study file; raises SpecError listing every problem."""
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
        raise SpecError([f"{source}: the study file must be a mapping of keys (study, grid, ...), found {_describe(data)}"])

    for key in data:
        if key not in _TOP_KEYS:
            problems.add(str(key), f"unknown key{_suggest(str(key), _TOP_KEYS)}; expected one of {', '.join(_TOP_KEYS)}")

    name = data.get("study")
    if not isinstance(name, str) or not name.strip():
        problems.add("study", f"found {_describe(name)}, expected {_TOP_KEYS['study']}")
        name = ""
    elif not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        problems.add(
            "study",
            f"found {name!r}, expected letters, digits, '-', '_' or '.', not starting with '.' (it names a folder)",
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.add("description", f"found {_describe(description)}, expected a string")
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
                f"found {_describe(dataset)}, expected one of {', '.join(DATASET_NAMES)}"
                + _suggest(str(dataset), DATASET_NAMES),
            )
        elif "dataset" in fixed and fixed["dataset"] != dataset:
            problems.add("fixed.dataset", f"found {fixed['dataset']!r}, which contradicts dataset: {dataset!r}")
        else:
            fixed = {**fixed, "dataset": dataset}

    seeds = _validate_seeds(data.get("seeds", [0]), problems)

    points: list[dict[str, Any]] = []
    search: SearchSpec | None = None
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
            for knob, values in sweep.items():
                points.extend({knob: value} for value in values if fixed.get(knob, getattr(DEFAULTS, knob)) != value)
    elif kind == "search" and "search" in data:
        search = _validate_search(data["search"], fixed, problems)
        points = [{}]

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
    )


def _validate_seeds(raw: Any, problems: _Problems) -> list[int]:
    if not isinstance(raw, list) or not raw:
        problems.add("seeds", f"found {_describe(raw)}, expected a non-empty list of integers")
        return [0]
    seeds: list[int] = []
    for i, seed in enumerate(raw):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            problems.add(f"seeds[{i}]", f"found {_describe(seed)}, expected an integer >= 0")
        elif seed in seeds:
            problems.add(f"seeds[{i}]", f"found {seed} twice, expected distinct seeds")
        else:
            seeds.append(seed)
    return seeds


def _validate_value(knob: str, raw: Any, path: str, problems: _Problems) -> tuple[bool, Any]:
    value, expected = coerce_knob(knob, raw)
    if expected is None:
        expected = check_knob(knob, value)
    if expected is not None:
        hint = _suggest(str(raw), _choices_of(knob)) if isinstance(raw, str) else ""
        problems.add(path, f"found {_describe(raw)}, expected {expected}{hint}")
        return False, None
    return True, value


def _choices_of(knob: str) -> tuple[str, ...]:
    return {
        "method": METHOD_NAMES,
        "backbone": BACKBONE_NAMES,
        "dataset": DATASET_NAMES,
        "optimizer": OPTIMIZERS,
        "device": DEVICES,
        "precision": PRECISIONS,
        "loss_impl": LOSS_IMPLS,
    }.get(knob, ())


def _validate_knob_mapping(raw: Any, section: str, problems: _Problems, *, lists: bool) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add(section, f"found {_describe(raw)}, expected a mapping of knob: {'[values]' if lists else 'value'}")
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
            problems.add(path, f"found {_describe(raw_value)}, expected a non-empty list of values")
            continue
        values: list[Any] = []
        for i, item in enumerate(raw_value):
            ok, value = _validate_value(key, item, f"{path}[{i}]", problems)
            if ok:
                if value in values:
                    problems.add(f"{path}[{i}]", f"found {_describe(item)} twice, expected distinct values")
                else:
                    values.append(value)
        result[key] = values
    return result


def _validate_search(raw: Any, fixed: Mapping[str, Any], problems: _Problems) -> SearchSpec | None:
    if not isinstance(raw, Mapping):
        problems.add("search", f"found {_describe(raw)}, expected {_TOP_KEYS['search']}")
        return None
    for key in raw:
        if key not in _SEARCH_KEYS:
            problems.add(f"search.{key}", f"unknown key{_suggest(str(key), _SEARCH_KEYS)}; expected one of {', '.join(_SEARCH_KEYS)}")
    n_trials = raw.get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        problems.add("search.n_trials", f"found {_describe(n_trials)}, expected an integer >= 1")
        n_trials = 1
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        problems.add("search.sampler", f"found {_describe(sampler)}, expected one of {', '.join(SAMPLERS)}{_suggest(str(sampler), SAMPLERS)}")
    pruner = raw.get("pruner", "median")
    if pruner is None:
        pruner = "none"
    if pruner not in PRUNERS:
        problems.add("search.pruner", f"found {_describe(pruner)}, expected one of {', '.join(PRUNERS)}{_suggest(str(pruner), PRUNERS)}")
    objective = raw.get("objective", {"metric": "knn_top1", "direction": "maximize"})
    metric, direction = "knn_top1", "maximize"
    if not isinstance(objective, Mapping):
        problems.add("search.objective", f"found {_describe(objective)}, expected a mapping {{metric: ..., direction: ...}}")
    else:
        for key in objective:
            if key not in ("metric", "direction"):
                problems.add(f"search.objective.{key}", "unknown key; expected metric or direction")
        metric = objective.get("metric", metric)
        direction = objective.get("direction", direction)
        if metric not in OBJECTIVE_METRICS:
            problems.add("search.objective.metric", f"found {_describe(metric)}, expected one of {', '.join(OBJECTIVE_METRICS)}{_suggest(str(metric), OBJECTIVE_METRICS)}")
        if direction not in DIRECTIONS:
            problems.add("search.objective.direction", f"found {_describe(direction)}, expected maximize or minimize")
    space_raw = raw.get("space")
    space: list[SearchParam] = []
    if not isinstance(space_raw, Mapping) or not space_raw:
        problems.add("search.space", f"found {_describe(space_raw)}, expected a non-empty mapping of knob: {{low, high, log}} or {{choices: [...]}}")
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
        problems.add("search.enqueue", f"found {_describe(enqueue_raw)}, expected a list of mappings knob: value")
    else:
        names = {p.name for p in space}
        for i, point in enumerate(enqueue_raw):
            path = f"search.enqueue[{i}]"
            if not isinstance(point, Mapping):
                problems.add(path, f"found {_describe(point)}, expected a mapping knob: value")
                continue
            clean: dict[str, Any] = {}
            for knob, value in point.items():
                if knob not in names:
                    # A knob whose space entry was refused already has its problem; say it once.
                    if not (isinstance(space_raw, Mapping) and knob in space_raw):
                        problems.add(f"{path}.{knob}", f"not in search.space, expected one of {', '.join(sorted(names))}")
                    continue
                ok, coerced = _validate_value(str(knob), value, f"{path}.{knob}", problems)
                if ok:
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
    )


def _validate_param(knob: str, dim: Any, fixed: Mapping[str, Any], problems: _Problems) -> SearchParam | None:
    path = f"search.space.{knob}"
    if knob not in KNOB_NAMES or knob == "seed":
        problems.add(path, f"unknown knob{_suggest(knob, KNOB_NAMES)}")
        return None
    if knob in fixed:
        problems.add(path, f"is also set in fixed.{knob}, expected a knob to be either fixed or searched")
    if not isinstance(dim, Mapping):
        problems.add(path, f"found {_describe(dim)}, expected {{low, high, log}} or {{choices: [...]}}")
        return None
    unknown = [k for k in dim if k not in ("low", "high", "log", "step", "choices")]
    for key in unknown:
        problems.add(f"{path}.{key}", "unknown key; expected low, high, log, step or choices")
    if "choices" in dim:
        choices = dim["choices"]
        if not isinstance(choices, list) or not choices:
            problems.add(f"{path}.choices", f"found {_describe(choices)}, expected a non-empty list")
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
        problems.add(f"{path}.log", f"found {_describe(log)}, expected true or false")
        log = False
    if low >= high:
        problems.add(path, f"found low {low} >= high {high}, expected low < high")
        return None
    if log and low <= 0:
        problems.add(f"{path}.low", f"found {low} with log: true, expected low > 0")
        return None
    step = dim.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        problems.add(f"{path}.step", f"found {_describe(step)}, expected a number > 0")
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
    if config.method not in UNTRAINED_METHODS and config.warmup_epochs > config.epochs:
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
