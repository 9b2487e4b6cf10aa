"""``harness run STUDY.yaml --set KEY=VALUE``: change a study file from the command line.

- ``KNOB=VALUE`` sets ``fixed.KNOB`` (``--set epochs=1 --set train_size=512``); a top-level key
  (``seeds``, ``study``, ``description``, ``dataset``) is set as such; a dotted path sets any key
  (``--set search.n_trials=4``, ``--set grid.temperature=[0.1]``).
- VALUE is YAML, read like the file (``1e-3`` is a number, ``[0, 1]`` a list, ``null`` none).
- The overrides are applied before validation, so the result is checked like a file, and a
  problem names the ``--set`` argument it came from.
- An overridden run is a different study: unless ``--set study=NAME`` names it, it is called
  ``NAME.set.KEY-VALUE...`` (so a CPU smoke run of a GPU study never mixes with its results). The
  study stored in the database is the file as run: the overrides applied, and a comment saying so.
- Except for the knobs that say how a trial is run and kept, not what it computes
  (:data:`harness.spec.KEEPING_KNOBS`: ``devices_per_trial``, ``compile_augmentation``, ``resident_share``, the
  checkpoint knobs): ``--set`` of those alone keeps the study's name and its results, as setting
  them in the file's ``fixed:`` does (the pending trials run with the new value). Not ``device``:
  it is outside the identity, but a CUDA trial computes in bf16 autocast where a CPU one does not,
  so a CPU run of a GPU study stays a study of its own. The stored study text is then the file as
  last run, the overrides included.

Stdlib and yaml only (no torch), like ``harness.spec``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness import spec
from harness.spec import SpecError, Study

# Keys of the study file itself; any other bare key is a knob of ``fixed:``.
TOP_LEVEL_KEYS: tuple[str, ...] = ("study", "description", "dataset", "seeds")
SWEEP_SECTIONS: tuple[str, ...] = ("grid", "ablate")
MAX_DERIVED_NAME = spec.MAX_STUDY_NAME
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Override:
    """One ``--set KEY=VALUE``."""

    key: str  # as typed
    path: tuple[str, ...]  # where it goes in the file's mapping
    value: Any
    value_text: str

    @property
    def argument(self) -> str:
        return f"--set {self.key}"


class OverrideError(ValueError):
    """A ``--set`` argument that is not KEY=VALUE, or whose value is not YAML."""


def parse_override(text: str) -> Override:
    """``KEY=VALUE`` -> Override; raises OverrideError naming the argument."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"--set {text}: expected KEY=VALUE (for example --set epochs=1)")
    if not value_text.strip():
        raise OverrideError(f"--set {key}: no value after '='; expected a value (null for none)")
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise OverrideError(f"--set {key}: expected a key or a dotted path of keys (fixed.epochs)")
    try:
        value = yaml.load(value_text, Loader=spec._StudyLoader)
    except yaml.YAMLError as error:
        reason = getattr(error, "problem", None) or str(error)
        raise OverrideError(f"--set {key}: the value {value_text!r} is not YAML ({reason})") from None
    if len(parts) == 1 and parts[0] not in TOP_LEVEL_KEYS:
        parts = ("fixed", parts[0])
    return Override(key=key, path=parts, value=value, value_text=value_text.strip())


def changes_results(override: Override) -> bool:
    """Whether ``override`` can change what a trial computes: anything but a ``fixed:`` knob of
    :data:`harness.spec.KEEPING_KNOBS`."""
    return not (
        override.path[0] == "fixed" and len(override.path) == 2 and override.path[1] in spec.KEEPING_KNOBS
    )


def derived_name(name: str, overrides: Sequence[Override]) -> str:
    """The study name of an overridden run: ``NAME.set.KEY-VALUE.KEY-VALUE`` in the order given,
    characters a study name may not hold replaced; a short hash of the exact overrides is added
    when anything was replaced or the name would be long, so two different runs never share one.
    Overrides that cannot change results (:func:`changes_results`) are left out of the name, and
    with only those ``name`` is kept."""
    overrides = [o for o in overrides if changes_results(o)]
    if not overrides:
        return name
    parts = [f"{o.key}-{o.value_text}" for o in overrides]
    plain = f"{name}.set." + ".".join(parts)
    safe = _NAME_UNSAFE.sub("_", plain)
    if safe == plain and len(safe) <= MAX_DERIVED_NAME:
        return safe
    digest = hashlib.sha256("\n".join(f"{o.key}={o.value_text}" for o in overrides).encode()).hexdigest()[:8]
    return f"{safe[: MAX_DERIVED_NAME - 9]}.{digest}"


def _set(data: dict[str, Any], override: Override) -> str | None:
    """Apply one override in place; a problem message (without the argument) or None."""
    node: Any = data
    for index, part in enumerate(override.path[:-1]):
        child = node.get(part) if isinstance(node, Mapping) else None
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            where = ".".join(override.path[: index + 1])
            return f"{where} is not a mapping in the file, so {override.key} cannot be set inside it"
        node = child
    node[override.path[-1]] = override.value
    return None


def _varied_in(data: Mapping[str, Any], knob: str) -> str | None:
    """Where the file varies ``knob`` (``grid.temperature``, ``search.space.lr``), or None."""
    for section in SWEEP_SECTIONS:
        points = data.get(section)
        if isinstance(points, Mapping) and knob in points:
            return f"{section}.{knob}"
        if isinstance(points, list) and any(isinstance(p, Mapping) and knob in p for p in points):
            return section
    search = data.get("search")
    space = search.get("space") if isinstance(search, Mapping) else None
    if isinstance(space, Mapping) and knob in space:
        return f"search.space.{knob}"
    return None


def apply_overrides(text: str, overrides: Sequence[Override], source: str) -> tuple[str, list[str]]:
    """(the study file's text with the overrides applied, problems naming their ``--set``). The
    file's own problems (YAML syntax, duplicate keys) are raised as SpecError first."""
    try:
        data = yaml.load(text, Loader=spec._StudyLoader)
    except (yaml.YAMLError, RecursionError):
        spec.parse_study(text, source)  # raises the file's own, located message
        raise
    if not isinstance(data, dict):
        spec.parse_study(text, source)
        raise SpecError([f"{source}: the study file must be a mapping of keys"])
    problems: list[str] = []
    original_name = data.get("study")
    for override in overrides:
        if override.path[0] == "fixed" and len(override.path) == 2 and override.key == override.path[1]:
            varied = _varied_in(data, override.path[1])
            if varied is not None:
                problems.append(
                    f"{override.argument}: the study varies {override.path[1]} ({varied}); set that entry "
                    f"instead, for example --set {varied}=[{override.value_text}]"
                    if varied.startswith("grid.")
                    else f"{override.argument}: the study varies {override.path[1]} ({varied}); "
                    f"change {varied} with a dotted --set instead"
                )
                continue
        problem = _set(data, override)
        if problem is not None:
            problems.append(f"{override.argument}: {problem}")
    if not problems and not any(o.path == ("study",) for o in overrides) and isinstance(original_name, str):
        data["study"] = derived_name(original_name, overrides)
    header = "\n".join(
        [
            f"# {source}, run with: " + " ".join(f"--set {o.key}={o.value_text}" for o in overrides),
            "# (the overrides applied below; comments of the original file are not kept)",
        ]
    )
    dumped = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
    return f"{header}\n{dumped}", problems


def _located(problem: str, source: str, overrides: Sequence[Override]) -> str:
    """A validation message about an overridden key, re-addressed to its ``--set`` argument."""
    for override in overrides:
        dotted = ".".join(override.path)
        for prefix in (f"{source}: {dotted}: ", f"{source}: {dotted}."):
            if problem.startswith(prefix):
                rest = problem[len(prefix) :]
                return f"{override.argument}: {rest}" if prefix.endswith(": ") else f"{override.argument}.{rest}"
    return problem


def load_study_with_overrides(
    path: str | Path, arguments: Sequence[str], *, max_trials: int | None = None
) -> tuple[Study, list[Override]]:
    """``load_study`` with ``--set`` arguments applied (none: the file as it is). Raises SpecError
    listing every problem: the argument's own, then the validation of the result. ``max_trials``:
    see ``spec.parse_study``."""
    if not arguments:
        return spec.load_study(path, max_trials=max_trials), []
    problems: list[str] = []
    overrides: list[Override] = []
    for argument in arguments:
        try:
            overrides.append(parse_override(argument))
        except OverrideError as error:
            problems.append(str(error))
    file = Path(path)
    source = str(file)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise SpecError([f"{file}: cannot read the study file ({error.strerror or error})"]) from None
    if problems:
        raise SpecError(problems)
    text = spec.decode_study_text(data, source)
    changed, problems = apply_overrides(text, overrides, source)
    if problems:
        raise SpecError(problems)
    try:
        study = spec.parse_study(changed, source=source, max_trials=max_trials)
    except SpecError as error:
        raise SpecError([_located(p, source, overrides) for p in error.problems]) from None
    return study, overrides
