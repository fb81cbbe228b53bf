"""Checkpoints: a typed `Checkpoint` (recipe, data, weights, training state), written
atomically and read with `weights_only=True` so that a file can never run code.

A file that cannot be read whole (truncated, zero bytes, a record whose CRC does not match) is a
`CorruptCheckpoint`; a run that keeps its previous checkpoint then resumes from that one. A
complete file that holds anything but tensors and plain values (a pickle crafted to run code) is
refused outright: it is never a reason to fall back silently.

On disk a checkpoint is one flat `mmval-checkpoint-v1` dict: `recipe`, `data`, `model`, `epoch`,
then `metrics` (best.pt) or the training state's keys (last.pt), as files of every mmval
version so far hold it.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from mmval.atomic import atomic_path
from mmval.errors import UserError

FORMAT = "mmval-checkpoint-v1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives; a cut one still starts with this
log = logging.getLogger(__name__)


class CorruptCheckpoint(UserError):
    """A checkpoint file that is incomplete or damaged (not one crafted to run code)."""


@dataclass
class DataInfo:
    """The data a model was trained on, so that `mmval value` needs nothing else: where it was,
    its manifest fingerprint (to refuse other data) and what the model's inputs and outputs are."""

    path: str
    dataset: str
    fingerprint: str
    classes: list[str]
    modalities: list[str]


@dataclass
class TrainingState:
    """What a resumed run needs beside the weights (last.pt only)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    sampler: dict[str, int]
    method: dict[str, Any]
    method_modules: dict[str, torch.Tensor] | None  # absent from runs before methods had modules
    rng: dict[str, Any]
    run_state: dict[str, Any]  # the loop's counters and every epoch's metrics row


@dataclass
class Checkpoint:
    recipe: dict[str, Any]  # the recipe dump (JSON mode) the model was trained with
    data: DataInfo
    model: dict[str, torch.Tensor]
    epoch: int  # epochs trained, counted from 1
    metrics: dict[str, float] | None = None  # the epoch's metrics row (best.pt)
    training: TrainingState | None = None  # (last.pt)

    def payload(self) -> dict[str, Any]:
        """The on-disk dict (without `format`)."""
        payload: dict[str, Any] = {
            "recipe": self.recipe,
            "data": asdict(self.data),
            "model": self.model,
            "epoch": self.epoch,
        }
        if self.metrics is not None:
            payload["metrics"] = self.metrics
        if self.training is not None:  # the state itself, not a deep copy as asdict makes
            state = {f.name: getattr(self.training, f.name) for f in fields(TrainingState)}
            payload |= {k: v for k, v in state.items() if k != "method_modules" or v is not None}
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any], where: Path) -> Checkpoint:
        missing = [k for k in ("recipe", "data", "model", "epoch") if k not in payload]
        if missing:
            raise UserError(f"{where} is an mmval checkpoint without {', '.join(missing)}.")
        training = None
        if "optimizer" in payload:
            names = [f.name for f in fields(TrainingState)]
            training = TrainingState(**{name: payload.get(name) for name in names})
        return cls(
            recipe=payload["recipe"],
            data=DataInfo(**payload["data"]),
            model=payload["model"],
            epoch=int(payload["epoch"]),
            metrics=payload.get("metrics"),
            training=training,
        )


def save_checkpoint(path: Path, checkpoint: Checkpoint, *, previous: Path | None = None) -> None:
    """Write `path` atomically; with `previous`, the file it replaces is kept there."""
    save_payload(path, checkpoint.payload(), previous=previous)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    return Checkpoint.from_payload(load_payload(path, map_location), path)


def load_latest_checkpoint(path: Path, previous: Path) -> tuple[Checkpoint, Path]:
    """`path`, or `previous` with a warning when `path` is corrupt or gone; returns the one
    used. A refused file (one crafted to run code, a foreign format) is an error, never skipped."""
    payload, used = load_latest_payload(path, previous)
    return Checkpoint.from_payload(payload, used), used


def save_payload(path: Path, payload: dict[str, Any], *, previous: Path | None = None) -> None:
    """Write `path` atomically; with `previous`, the file it replaces is kept there (also
    atomically), so that one good checkpoint survives whatever happens to the newest."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
        if previous is not None and path.is_file():
            with atomic_path(previous) as keep:
                keep.unlink()
                try:
                    os.link(path, keep)  # the same bytes, no copy
                except OSError:  # file systems without hard links
                    shutil.copyfile(path, keep)


def _check_archive(path: Path) -> None:
    """Raise CorruptCheckpoint unless every record of the zip archive reads back whole."""
    with open(path, "rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    if head and head != _ZIP_MAGIC:
        return  # not a zip: torch.load says what it is (a legacy or crafted pickle)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CorruptCheckpoint(
            f"checkpoint {path} is truncated or damaged ({exc or 'empty file'})."
        ) from None
    if bad is not None:
        raise CorruptCheckpoint(f"checkpoint {path} is damaged: record {bad} fails its CRC.")


def load_payload(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The on-disk dict of a checkpoint file, after the safety checks."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path} is not a loadable mmval checkpoint ({reason}). It may be truncated, or "
            "hold objects other than tensors and plain values, which mmval refuses to unpickle."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is a torch file but not an mmval checkpoint ({FORMAT}).")
    return payload


def load_latest_payload(path: Path, previous: Path) -> tuple[dict[str, Any], Path]:
    """`load_latest_checkpoint` for the on-disk dict."""
    if not path.is_file() and previous.is_file():
        problem = f"checkpoint {path} is missing."
    else:
        try:
            return load_payload(path), path
        except CorruptCheckpoint as exc:
            if not previous.is_file():
                raise CorruptCheckpoint(
                    f"{exc} There is no previous checkpoint to fall back on."
                ) from None
            problem = str(exc)
    payload = load_payload(previous)
    log.warning("warning: %s Resuming from the previous checkpoint %s instead.", problem, previous)
    return payload, previous
