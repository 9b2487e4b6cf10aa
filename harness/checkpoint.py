"""Checkpoints of a running trial, and the trained encoder as weights.

A checkpoint holds everything that decides the rest of a trial (``harness.train`` assembles it: the
method's whole ``state_dict``, the optimizer, the data order, every random number generator, the
position, the losses and curves so far). Files are written atomically (temporary file, fsync,
rename, fsync of the folder) and end in a footer with the SHA-256 of their body, so a file cut short
by a kill, a full disk or a copy is recognised as damaged instead of being loaded as garbage.

A trial's folder holds ``step-000001234.ckpt`` files (the two newest are kept while it runs, so a
damaged newest one still has a predecessor), ``final.ckpt`` (the state after the last training
step, kept when the trial completes) and the encoder: ``encoder.safetensors`` plus
``encoder.json``. A checkpoint that cannot be used (damaged, another configuration, another seed or
device type, another format version) is reported and skipped for the next older one; the trial
starts from zero when none is usable.

The encoder's tensors carry the plain layer names (:func:`harness.backbones.plain_copy`): for
``resnet18`` those of ``torchvision.models.resnet18`` with the CIFAR stem (``conv1`` a 3x3 stride-1
convolution, ``maxpool`` and ``fc`` the identity), for ``small_cnn`` those of
``harness.backbones.small_cnn(fused_stem=False)``.

No database access here: the study runner records the paths this module returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.backbones import build_backbone, plain_copy
from harness.spec import TrialConfig
from harness.trial_api import Interrupted

# Bumped whenever the layout of the state changes; older checkpoints are then skipped, not misread.
FORMAT_VERSION = 1
ENCODER_FORMAT = "harness-encoder/1"
CHECKPOINT_SUFFIX = ".ckpt"
FINAL_NAME = "final" + CHECKPOINT_SUFFIX
WEIGHTS_NAME = "encoder.safetensors"
WEIGHTS_INFO_NAME = "encoder.json"
# While a trial runs: the newest checkpoints kept (the newest may be damaged by a kill during a
# write to another disk, a copy, ...; its predecessor is then the fallback).
KEEP_WHILE_RUNNING = 2

_FOOTER_MAGIC = b"HRNSCKP1"
_FOOTER_SIZE = len(_FOOTER_MAGIC) + 32
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where and how often a trial checkpoints. ``every_epochs`` (0 = off) and ``every_minutes``
    (minutes of the run since the last checkpoint, 0 = off) both apply; a trial also checkpoints
    when asked to stop (SIGTERM, SIGINT) and after its last training step."""

    directory: Path
    every_epochs: int = 0
    every_minutes: float = 5.0
    save_weights: bool = True
    keep_final: bool = True

    @classmethod
    def from_config(cls, config: TrialConfig, directory: Path) -> CheckpointPolicy:
        """The policy the trial's knobs ask for, in ``directory`` (the trial's own folder)."""
        return cls(
            directory=Path(directory),
            every_epochs=config.checkpoint_epochs,
            every_minutes=config.checkpoint_minutes,
            save_weights=config.save_weights,
            keep_final=config.keep_final_checkpoint,
        )


class CheckpointProblem(Exception):
    """A checkpoint file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Loaded:
    path: Path
    state: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Files


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a
    part: a temporary file in the same folder, fsync, rename over ``path``, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def encode(payload: Mapping[str, Any]) -> bytes:
    """``torch.save`` of ``payload`` followed by the footer (magic, SHA-256 of the body)."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    body = buffer.getvalue()
    return body + _FOOTER_MAGIC + hashlib.sha256(body).digest()


def decode(data: bytes, *, map_location: torch.device | str | None = None) -> dict[str, Any]:
    """The payload of :func:`encode`'s bytes; CheckpointProblem when they are cut short or altered."""
    if len(data) < _FOOTER_SIZE or data[-_FOOTER_SIZE:-32] != _FOOTER_MAGIC:
        raise CheckpointProblem(f"damaged: incomplete or not a harness checkpoint ({len(data)} bytes)")
    body, digest = data[:-_FOOTER_SIZE], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointProblem("damaged: its contents do not match the checksum written with it")
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings and containers, nothing that
        # runs code when loaded.
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointProblem(f"unreadable: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict):
        raise CheckpointProblem("unreadable: not a checkpoint dictionary")
    return payload


# ----------------------------------------------------------------------------------------------
# One trial's folder


class TrialCheckpoints:
    """The checkpoints of one trial in ``directory``.

    ``identity`` names what a checkpoint must match to be resumed from (format version,
    configuration hash, seed, device type, run length): anything else is another run's state.
    ``say`` receives one line per checkpoint skipped and why.
    """

    def __init__(
        self,
        directory: Path,
        identity: Mapping[str, Any],
        *,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.identity = {"format": FORMAT_VERSION, **identity}
        self._say = say or (lambda line: None)

    def files(self) -> list[Path]:
        """The checkpoint files, newest first (``final.ckpt`` before any step file)."""
        if not self.directory.is_dir():
            return []
        steps = []
        for path in self.directory.iterdir():
            match = _STEP_FILE.match(path.name)
            if match:
                steps.append((int(match.group(1)), path))
        ordered = [path for _, path in sorted(steps, reverse=True)]
        final = self.directory / FINAL_NAME
        return ([final] if final.is_file() else []) + ordered

    def save(self, state: Mapping[str, Any], *, step: int, final: bool = False) -> Path:
        """Write a checkpoint of ``state`` at ``step`` atomically, then drop all but the newest
        :data:`KEEP_WHILE_RUNNING` step files."""
        path = self.directory / (FINAL_NAME if final else f"step-{step:09d}{CHECKPOINT_SUFFIX}")
        atomic_write(path, encode({"identity": self.identity, "step": int(step), "state": dict(state)}))
        steps = [p for p in self.files() if p.name != FINAL_NAME]
        for old in steps[KEEP_WHILE_RUNNING:]:
            with contextlib.suppress(OSError):
                old.unlink()
        return path

    def latest(
        self,
        *,
        map_location: torch.device | str | None = None,
        check: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> Loaded | None:
        """The newest usable checkpoint, or None. ``check`` may raise CheckpointProblem for a state
        that does not fit (e.g. tensors of other shapes after a code change). A damaged file is
        deleted and one from another run is renamed ``*.rejected`` (kept for inspection, never
        loaded); both are reported through ``say``."""
        for path in self.files():
            try:
                payload = decode(path.read_bytes(), map_location=map_location)
                self._check_identity(payload)
                if check is not None:
                    check(payload["state"])
            except CheckpointProblem as problem:
                self._reject(path, str(problem))
                continue
            except OSError as error:
                self._say(f"checkpoint {path} could not be read ({error}); skipped")
                continue
            return Loaded(path, payload["state"])
        return None

    def _check_identity(self, payload: Mapping[str, Any]) -> None:
        stored = payload.get("identity")
        if not isinstance(stored, Mapping) or "state" not in payload:
            raise CheckpointProblem("unreadable: no identity or state in it")
        if stored.get("format") != FORMAT_VERSION:
            raise CheckpointProblem(
                f"incompatible: format version {stored.get('format')!r}, this code reads {FORMAT_VERSION}"
            )
        differ = [key for key in self.identity if stored.get(key) != self.identity[key]]
        if differ:
            shown = ", ".join(f"{k} {stored.get(k)!r} (now {self.identity[k]!r})" for k in differ)
            raise CheckpointProblem(f"incompatible: from another run: {shown}")

    def _reject(self, path: Path, why: str) -> None:
        if why.startswith("incompatible"):
            target = path.with_name(path.name + ".rejected")
            with contextlib.suppress(OSError):
                path.replace(target)
            self._say(f"checkpoint {path.name} is {why}; skipped (kept as {target.name})")
        else:
            with contextlib.suppress(OSError):
                path.unlink()
            self._say(f"checkpoint {path.name} is {why}; skipped and deleted")

    def finish(self, *, keep_final: bool) -> None:
        """After the trial completed: drop the step files, and ``final.ckpt`` unless ``keep_final``."""
        for path in self.files():
            if path.name != FINAL_NAME or not keep_final:
                with contextlib.suppress(OSError):
                    path.unlink()

    def clear(self) -> None:
        """Drop every checkpoint (a failed or pruned trial starts from zero when it is rerun)."""
        for path in self.files():
            with contextlib.suppress(OSError):
                path.unlink()


# ----------------------------------------------------------------------------------------------
# Random number generators


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a trial draws from: its data generator, torch's global CPU and CUDA
    generators, Python's and NumPy's (as tensors and plain values: loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(numpy_state[0]),
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.uint32).astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _as_tuple(value: Any) -> Any:
    """Python's RNG state with its nested tuples back (a round trip may turn them into lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------
# Stopping at a step boundary


class TrialInterrupted(Interrupted):
    """The trial stopped on a signal after writing a checkpoint (``checkpoint``, or None when it
    had nowhere to write one)."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(signum, f"stopped by {name}{where}")
        self.checkpoint = checkpoint


class StopRequests:
    """While active, SIGINT and SIGTERM are recorded instead of raising at once, so that the
    training loop stops at the next step boundary with a consistent state to checkpoint. A signal
    that comes :data:`REPEAT_SECONDS` or more after the first raises KeyboardInterrupt at once
    (someone who presses Ctrl-C again means it); one sooner is the same request arriving twice
    (``--workers`` forwards the terminal's Ctrl-C that the workers got too) and is ignored.
    Only the main thread can install handlers; elsewhere this records nothing and changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 2.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at >= self.REPEAT_SECONDS:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# ----------------------------------------------------------------------------------------------
# The encoder as weights


# How an encoder's tensor names load, for the backbones that load outside the harness too.
_ENCODER_LAYERS: dict[str, str] = {
    "resnet18": (
        "torchvision.models.resnet18(weights=None) with the CIFAR stem: conv1 = nn.Conv2d(in_channels, "
        "64, 3, stride=1, padding=1, bias=False), maxpool = nn.Identity(), fc = nn.Identity(); then "
        "load_state_dict (strict)"
    ),
}


def encoder_layers(backbone_name: str) -> str:
    """Where the tensor names of a ``backbone_name`` encoder load (written into ``encoder.json``)."""
    harness_own = (
        f"harness.backbones.build_backbone({backbone_name!r}, in_channels, image_size, fused_stem=False); "
        "then load_state_dict (strict)"
    )
    return _ENCODER_LAYERS.get(backbone_name, harness_own)


@dataclass(frozen=True)
class Encoder:
    """A trained encoder loaded from its weights: ``module`` in eval mode, and what its JSON says."""

    module: nn.Module
    info: dict[str, Any]


def encoder_tensors(backbone_name: str, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's parameters and buffers under the plain layer names, contiguous CPU tensors."""
    plain = plain_copy(backbone_name, backbone)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in plain.state_dict().items()}


def write_encoder(
    directory: Path, backbone_name: str, backbone: nn.Module, info: Mapping[str, Any]
) -> tuple[Path, str]:
    """Write ``encoder.safetensors`` (the tensors only, so equal weights give equal bytes) and
    ``encoder.json`` (``info`` plus the file's SHA-256), each atomically. Returns (path, sha256)."""
    from safetensors.torch import save

    directory = Path(directory)
    tensors = encoder_tensors(backbone_name, backbone)
    data = _canonical_header(
        save(tensors, metadata={"format": "pt", "harness": ENCODER_FORMAT, "backbone": backbone_name})
    )
    sha256 = hashlib.sha256(data).hexdigest()
    path = directory / WEIGHTS_NAME
    atomic_write(path, data)
    document = {"format": ENCODER_FORMAT, **info, "weights": WEIGHTS_NAME, "sha256": sha256}
    atomic_write(
        directory / WEIGHTS_INFO_NAME,
        (json.dumps(document, indent=2, default=str, allow_nan=False) + "\n").encode(),
    )
    return path, sha256


def _canonical_header(data: bytes) -> bytes:
    """The safetensors bytes with their JSON header's keys sorted: the library writes the metadata
    in hash-map order, which differs between processes, and equal weights must give equal files.
    The offsets in the header are relative to the data, which does not move."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as the format asks
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def read_encoder(
    path: Path, *, expected_sha256: str | None = None, device: torch.device | str = "cpu"
) -> Encoder:
    """The encoder in ``path`` (an ``encoder.safetensors``, its JSON beside it), built with the
    harness's backbone factory (plain layers) and in eval mode. With ``expected_sha256`` a file
    that changed since it was recorded is an error."""
    from safetensors.torch import load

    path = Path(path)
    info_path = path.with_name(WEIGHTS_INFO_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"no encoder weights at {path}")
    if not info_path.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_INFO_NAME} beside {path} (it says which backbone the weights are)"
        )
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{path}: the file changed since the trial recorded it (SHA-256 differs)")
    info = json.loads(info_path.read_text())
    module, _ = build_backbone(
        info["backbone"], int(info["in_channels"]), int(info["image_size"]), fused_stem=False
    )
    module.load_state_dict(load(data))
    module = module.to(device)
    if info.get("config", {}).get("channels_last"):  # as the trial evaluated it: the same kernels
        module = module.to(memory_format=torch.channels_last)
    return Encoder(module.eval(), info)
