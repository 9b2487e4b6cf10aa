"""The ``evaluate:`` section of a study file: which evaluation protocols run on a finished trial's
saved encoder, with what settings (torch-free: ``spec``, the CLI and the reports read it).

A study file declares them once; ``harness evaluate STUDY`` (or the runner after training) expands
the section into :class:`Task` objects, one per stored result, each with a canonical ``key`` so a
result is computed once per trial and task. Example::

    evaluate:
      label_seed: 0                  # draws the labeled fractions and the few-shot sets
      linear: {fractions: [0.01, 0.1]}
      finetune: {fractions: [0.01, 0.1], epochs: 20}
      few_shot: {shots: [1, 3, 5], draws: 5}
      transfer:
        - {dataset: digits, protocols: [knn, linear, finetune]}
      embedding: {points: 1000}

Every setting has one default, below; docs/REPORTS.md ("Evaluation protocols") explains them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "EMBEDDING_METHODS",
    "HEAD_INITS",
    "LEGACY_HEAD_INIT",
    "PROTOCOLS",
    "TRANSFER_PROTOCOLS",
    "Embedding",
    "EvaluationPlan",
    "FewShot",
    "FineTune",
    "LinearFractions",
    "Task",
    "Transfer",
    "head_init_of",
    "parse_evaluate",
]

# The result kinds a Task can have (the ``protocol`` column of the evaluations table).
PROTOCOLS: tuple[str, ...] = ("knn", "linear", "finetune", "few_shot_knn", "embedding")
TRANSFER_PROTOCOLS: tuple[str, ...] = ("knn", "linear", "finetune")
EMBEDDING_METHODS: tuple[str, ...] = ("tsne",)
# How fine-tuning starts its linear head (name -> how the report says it): "probe" fits it on the frozen features first (the linear
# probe's own fit, then everything is fine-tuned from it: LP-FT, Kumar et al. 2022); "zero" starts
# it at zero. Fine-tuning from before the option existed started at zero (LEGACY_HEAD_INIT): a task
# with that value keeps the key it had then, so stored results keep their hash and their meaning.
HEAD_INITS: dict[str, str] = {
    "probe": "at the linear probe's fit on the frozen features (LP-FT)",
    "zero": "at zero",
}
LEGACY_HEAD_INIT = "zero"


@dataclass(frozen=True)
class FineTune:
    """The whole encoder plus a linear head, trained on a class-balanced fraction of the labels.

    SGD with Nesterov momentum 0.9, no weight decay, cosine decay, ``lr`` per 256 images scaled
    linearly with the batch (SimCLR's fine-tuning recipe, Chen et al. 2020, appendix B.5: 0.05 x
    batch / 256). The pre-trained layers train at ``lr * backbone_lr_scale``: SimCLR and BYOL use
    one rate for all layers (scale 1) at ImageNet scale; with a few hundred labels a 10x lower rate
    for the pre-trained layers (the usual discriminative fine-tuning ratio) keeps the features from
    being overwritten by the first noisy steps. The head always gets ``lr``. A randomly initialized
    encoder (random_init) is trained from scratch: its layers get the full rate (scale 1), so its
    row is "training from scratch on the same labels".

    ``head_init`` "probe" (LP-FT, Kumar et al. 2022) first fits the head as the linear probe does
    (``evaluation.linear_probe``'s fit on the frozen, unaugmented features of the same labeled
    images, the trial's ``linear_epochs`` and seed), then fine-tunes everything from it: a zero
    head sends the gradients of an untrained classifier through the encoder in the first steps,
    which at short schedules destroys more of the pre-trained features than the head recovers
    (docs/REPORTS.md, "Evaluation protocols"). "zero" starts the head at zero, as fine-tuning did
    before the option existed."""

    fractions: tuple[float, ...] = (1.0,)
    epochs: int = 30
    lr: float = 0.05
    backbone_lr_scale: float = 0.1
    batch_size: int = 256
    augment: bool = True  # random resized crop (area 60-100%) and horizontal flip per step
    head_init: str = "probe"


@dataclass(frozen=True)
class LinearFractions:
    """The linear probe (``evaluation.linear_probe``) trained on a fraction of the labels; ``epochs``
    None means the trial's ``linear_epochs``."""

    fractions: tuple[float, ...] = (0.01, 0.1)
    epochs: int | None = None


@dataclass(frozen=True)
class FewShot:
    """n-shot k-NN: ``shots`` labeled images per class drawn ``draws`` times; each draw classifies
    the test split by the weighted k-NN vote over those images. ``k`` None means every drawn image
    votes; ``t`` None means the trial's ``knn_t``."""

    shots: tuple[int, ...] = (1, 5, 10)
    draws: int = 5
    k: int | None = None
    t: float | None = None


@dataclass(frozen=True)
class Transfer:
    """Pre-trained on the study's dataset, evaluated on ``dataset``: images resized to the source
    image size and converted to its channels (the adaptation is recorded), normalized with the
    source dataset's statistics (the encoder's input convention). ``train_size``/``test_size``
    take class-balanced subsets of the target's splits (None = the whole split)."""

    dataset: str
    protocols: tuple[str, ...] = ("knn", "linear")
    train_size: int | None = None
    test_size: int | None = None


@dataclass(frozen=True)
class Embedding:
    """A 2-D t-SNE map of ``points`` test features (class-balanced), stored for the report."""

    points: int = 1000
    method: str = "tsne"
    perplexity: float = 30.0


@dataclass(frozen=True)
class Task:
    """One stored evaluation result of one trial: the protocol and every setting it ran with."""

    protocol: str
    dataset: str | None = None  # None: the trial's own dataset; else a transfer target
    fraction: float | None = None
    shots: int | None = None
    label_seed: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """Canonical JSON of everything above: equal keys are the same evaluation."""
        return json.dumps(
            {
                "protocol": self.protocol,
                "dataset": self.dataset,
                "fraction": self.fraction,
                "shots": self.shots,
                "label_seed": self.label_seed,
                "settings": dict(self.settings),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def setting(self, name: str, default: Any = None) -> Any:
        return dict(self.settings).get(name, default)


@dataclass(frozen=True)
class EvaluationPlan:
    label_seed: int = 0
    linear: LinearFractions | None = None
    finetune: FineTune | None = None
    few_shot: FewShot | None = None
    transfer: tuple[Transfer, ...] = ()
    embedding: Embedding | None = None
    fine_tune_settings: FineTune = field(default_factory=FineTune)

    def tasks(self) -> tuple[Task, ...]:
        """The plan as one Task per stored result, in a fixed order."""
        tasks: list[Task] = []
        if self.linear is not None:
            for fraction in self.linear.fractions:
                tasks.append(
                    Task("linear", None, fraction, None, self.label_seed, _items({"epochs": self.linear.epochs}))
                )
        if self.finetune is not None:
            settings = _fine_tune_items(self.finetune)
            for fraction in self.finetune.fractions:
                tasks.append(Task("finetune", None, fraction, None, self.label_seed, settings))
        if self.few_shot is not None:
            settings = _items({"draws": self.few_shot.draws, "k": self.few_shot.k, "t": self.few_shot.t})
            for shots in self.few_shot.shots:
                tasks.append(Task("few_shot_knn", None, None, shots, self.label_seed, settings))
        for transfer in self.transfer:
            sizes = {"train_size": transfer.train_size, "test_size": transfer.test_size}
            for protocol in transfer.protocols:
                extra = _fine_tune_items(self.fine_tune_settings) if protocol == "finetune" else ()
                fraction = 1.0 if protocol in ("linear", "finetune") else None
                seed = self.label_seed if fraction is not None else None
                tasks.append(Task(protocol, transfer.dataset, fraction, None, seed, _items(sizes) + extra))
        if self.embedding is not None:
            tasks.append(Task("embedding", None, None, None, None, _items(asdict(self.embedding))))
        return tuple(tasks)


def _items(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(values.items()))


def _fine_tune_items(settings: FineTune) -> tuple[tuple[str, Any], ...]:
    values = asdict(settings)
    values.pop("fractions")
    if values["head_init"] == LEGACY_HEAD_INIT:
        # Absent from the key, as in the tasks stored before the option existed (same hash).
        del values["head_init"]
    return _items(values)


def head_init_of(settings: Mapping[str, Any]) -> str:
    """How a fine-tuning task's head started, from its settings (a Task's or a stored task's
    ``settings`` dict): "zero" when the setting is absent (stored before the option existed)."""
    return str(settings.get("head_init", LEGACY_HEAD_INIT))


# ---------------------------------------------------------------------------------------------
# Parsing

_SECTION_KEYS: dict[str, str] = {
    "label_seed": "an int >= 0 (draws the labeled fractions and few-shot sets)",
    "linear": "a mapping with fractions, epochs",
    "finetune": "a mapping with fractions, epochs, lr, backbone_lr_scale, batch_size, augment, head_init",
    "few_shot": "a mapping with shots, draws, k, t",
    "transfer": "a list of mappings with dataset, protocols, train_size, test_size",
    "embedding": "a mapping with points, method, perplexity",
}


def parse_evaluate(
    section: Any, *, datasets: Sequence[str], path: str = "evaluate"
) -> tuple[EvaluationPlan | None, list[tuple[str, str]]]:
    """The plan of an ``evaluate:`` section and its problems as (key path, message) pairs; the plan
    is None when there are problems. ``datasets`` lists the transfer targets that exist."""
    problems: list[tuple[str, str]] = []
    if section is None:
        return None, problems
    if not isinstance(section, Mapping):
        return None, [(path, f"expected a mapping with keys {', '.join(_SECTION_KEYS)}, found {_describe(section)}")]
    for key in section:
        if key not in _SECTION_KEYS:
            problems.append((f"{path}.{key}", f"unknown key; expected one of {', '.join(_SECTION_KEYS)}"))
    if not any(k in section for k in _SECTION_KEYS if k != "label_seed"):
        problems.append((path, "declares no protocol; expected at least one of linear, finetune, few_shot, transfer, embedding"))
    label_seed = _int(section.get("label_seed", 0), f"{path}.label_seed", problems, minimum=0)

    def block(name: str) -> Mapping[str, Any] | None:
        value = section.get(name)
        if name not in section:
            return None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            problems.append((f"{path}.{name}", f"expected {_SECTION_KEYS[name]}, found {_describe(value)}"))
            return None
        return value

    linear = finetune = few_shot = embedding = None
    if (raw := block("linear")) is not None:
        _unknown(raw, ("fractions", "epochs"), f"{path}.linear", problems)
        linear = LinearFractions(
            fractions=_fractions(raw.get("fractions", LinearFractions.fractions), f"{path}.linear.fractions", problems),
            epochs=_int(raw.get("epochs"), f"{path}.linear.epochs", problems, minimum=1, optional=True),
        )
    fine_tune_settings = FineTune()
    if (raw := block("finetune")) is not None:
        finetune = _fine_tune(raw, f"{path}.finetune", problems)
        fine_tune_settings = finetune
    if (raw := block("few_shot")) is not None:
        _unknown(raw, ("shots", "draws", "k", "t"), f"{path}.few_shot", problems)
        shots = raw.get("shots", list(FewShot.shots))
        shots_list = shots if isinstance(shots, list) else [shots]
        checked = tuple(
            _int(s, f"{path}.few_shot.shots[{i}]", problems, minimum=1) or 1 for i, s in enumerate(shots_list)
        )
        if not checked:
            problems.append((f"{path}.few_shot.shots", "expected at least one number of shots per class"))
        t = raw.get("t")
        if t is not None and (not _is_number(t) or not t > 0):
            problems.append((f"{path}.few_shot.t", f"expected a number > 0, found {_describe(t)}"))
        few_shot = FewShot(
            shots=tuple(sorted(set(checked))),
            draws=_int(raw.get("draws", FewShot.draws), f"{path}.few_shot.draws", problems, minimum=1) or 1,
            k=_int(raw.get("k"), f"{path}.few_shot.k", problems, minimum=1, optional=True),
            t=float(t) if _is_number(t) else None,
        )
    transfers: list[Transfer] = []
    if "transfer" in section:
        raw_list = section["transfer"]
        if isinstance(raw_list, Mapping):
            raw_list = [raw_list]
        if not isinstance(raw_list, list):
            problems.append((f"{path}.transfer", f"expected {_SECTION_KEYS['transfer']}, found {_describe(raw_list)}"))
            raw_list = []
        for i, item in enumerate(raw_list):
            where = f"{path}.transfer[{i}]"
            if not isinstance(item, Mapping):
                problems.append((where, f"expected a mapping with dataset, protocols, found {_describe(item)}"))
                continue
            _unknown(item, ("dataset", "protocols", "train_size", "test_size"), where, problems)
            target = item.get("dataset")
            if not isinstance(target, str) or target not in datasets:
                problems.append((f"{where}.dataset", f"found {_describe(target)}, expected one of {', '.join(datasets)}"))
                continue
            protocols = item.get("protocols", list(Transfer.protocols))
            protocols = protocols if isinstance(protocols, list) else [protocols]
            bad = [p for p in protocols if p not in TRANSFER_PROTOCOLS]
            if bad or not protocols:
                problems.append(
                    (f"{where}.protocols", f"found {_describe(bad[0]) if bad else 'an empty list'}, expected some of {', '.join(TRANSFER_PROTOCOLS)}")
                )
                continue
            transfers.append(
                Transfer(
                    dataset=target,
                    protocols=tuple(p for p in TRANSFER_PROTOCOLS if p in protocols),
                    train_size=_int(item.get("train_size"), f"{where}.train_size", problems, minimum=1, optional=True),
                    test_size=_int(item.get("test_size"), f"{where}.test_size", problems, minimum=2, optional=True),
                )
            )
    if (raw := block("embedding")) is not None:
        _unknown(raw, ("points", "method", "perplexity"), f"{path}.embedding", problems)
        method = raw.get("method", Embedding.method)
        if method not in EMBEDDING_METHODS:
            problems.append((f"{path}.embedding.method", f"found {_describe(method)}, expected one of {', '.join(EMBEDDING_METHODS)}"))
        perplexity = raw.get("perplexity", Embedding.perplexity)
        if not _is_number(perplexity) or not perplexity > 0:
            problems.append((f"{path}.embedding.perplexity", f"expected a number > 0, found {_describe(perplexity)}"))
            perplexity = Embedding.perplexity
        embedding = Embedding(
            points=_int(raw.get("points", Embedding.points), f"{path}.embedding.points", problems, minimum=10) or 10,
            method=str(method),
            perplexity=float(perplexity),
        )
    if problems:
        return None, problems
    plan = EvaluationPlan(
        label_seed=label_seed or 0,
        linear=linear,
        finetune=finetune,
        few_shot=few_shot,
        transfer=tuple(transfers),
        embedding=embedding,
        fine_tune_settings=fine_tune_settings,
    )
    return plan, problems


def _fine_tune(raw: Mapping[str, Any], where: str, problems: list[tuple[str, str]]) -> FineTune:
    names = ("fractions", "epochs", "lr", "backbone_lr_scale", "batch_size", "augment", "head_init")
    _unknown(raw, names, where, problems)
    defaults = FineTune()
    lr = raw.get("lr", defaults.lr)
    if not _is_number(lr) or not lr > 0:
        problems.append((f"{where}.lr", f"expected a number > 0 (per 256 images), found {_describe(lr)}"))
        lr = defaults.lr
    scale = raw.get("backbone_lr_scale", defaults.backbone_lr_scale)
    if not _is_number(scale) or not 0 <= scale <= 1:
        problems.append((f"{where}.backbone_lr_scale", f"expected a number in [0, 1], found {_describe(scale)}"))
        scale = defaults.backbone_lr_scale
    augment = raw.get("augment", defaults.augment)
    if not isinstance(augment, bool):
        problems.append((f"{where}.augment", f"expected true or false, found {_describe(augment)}"))
        augment = defaults.augment
    head_init = raw.get("head_init", defaults.head_init)
    if head_init not in HEAD_INITS:
        problems.append((f"{where}.head_init", f"expected one of {', '.join(HEAD_INITS)}, found {_describe(head_init)}"))
        head_init = defaults.head_init
    return FineTune(
        fractions=_fractions(raw.get("fractions", list(defaults.fractions)), f"{where}.fractions", problems),
        epochs=_int(raw.get("epochs", defaults.epochs), f"{where}.epochs", problems, minimum=1) or 1,
        lr=float(lr),
        backbone_lr_scale=float(scale),
        batch_size=_int(raw.get("batch_size", defaults.batch_size), f"{where}.batch_size", problems, minimum=1) or 1,
        augment=augment,
        head_init=str(head_init),
    )


def _fractions(value: Any, where: str, problems: list[tuple[str, str]]) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    good: list[float] = []
    for i, v in enumerate(values):
        if not _is_number(v) or not 0 < v <= 1:
            problems.append((f"{where}[{i}]" if isinstance(value, list) else where, f"expected a fraction in (0, 1], found {_describe(v)}"))
        else:
            good.append(float(v))
    if not values:
        problems.append((where, "expected at least one fraction in (0, 1]"))
    return tuple(sorted(set(good)))


def _int(value: Any, where: str, problems: list[tuple[str, str]], *, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append((where, f"expected an int >= {minimum}{' or null' if optional else ''}, found {_describe(value)}"))
        return None
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(raw: Mapping[str, Any], known: Sequence[str], where: str, problems: list[tuple[str, str]]) -> None:
    for key in raw:
        if key not in known:
            problems.append((f"{where}.{key}", f"unknown key; expected one of {', '.join(known)}"))


def _describe(value: Any) -> str:
    # Imported here: harness.spec imports this module (the evaluate: section of a study file).
    from harness.spec import describe_value

    return describe_value(value)
