"""Checkpoints: a typed `Checkpoint` (recipe, data, weights, training state), written
atomically and read with `weights_only=True` so that a file can never run code.

Before anything is inflated, the sizes a file's zip records declare are added up and checked
(`check_declared_size`): torch.save stores records uncompressed, so a file whose records inflate
to more than 4 times its size (a deflated "bomb") was not written by torch.save, and no file may
declare more than MMVAL_MAX_CHECKPOINT_SIZE (default 8 GiB). After loading, the payload is
validated against the dataclasses below (keys and types), so that a foreign or damaged file is a
UserError naming its wrong keys, not a KeyError later.

A file that cannot be read whole (truncated, zero bytes, a record whose CRC does not match) is a
`CorruptCheckpoint`; a run that keeps its previous checkpoint then resumes from that one. A
complete file that holds anything but tensors and plain values (a pickle crafted to run code) is
refused outright: it is never a reason to fall back silently.

On disk a checkpoint is one flat `mmval-checkpoint-v1` dict: `recipe`, `data`, `model`, `epoch`,
then `metrics` (best.pt) or the training state's keys (last.pt), as files of every mmval
version so far hold it.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, StrictInt, StrictStr, TypeAdapter, ValidationError

from mmval.atomic import atomic_path
from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.validation import format_problems, problems_of, shown

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

FORMAT = "mmval-checkpoint-v1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives; a cut one still starts with this
log = logging.getLogger(__name__)

SIZE_LIMIT_ENV = "MMVAL_MAX_CHECKPOINT_SIZE"
DEFAULT_SIZE_LIMIT = 8 << 30  # bytes: far above any model mmval trains (resnet18: 45 MB)
INFLATION = 4  # the most a file's records may declare, as a multiple of its size on disk
INFLATION_FLOOR = 64 << 20  # ...or this, for small files compressed by another tool
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TYPED = ConfigDict(arbitrary_types_allowed=True)  # tensors are checked with isinstance


class CorruptCheckpoint(UserError):
    """A checkpoint file that is incomplete or damaged (not one crafted to run code)."""


# The field types below are also the schema a loaded payload is validated against (pydantic,
# Strict*: no conversion, so that "3" or true is not an epoch).
@dataclass
class DataInfo:
    """The data a model was trained on, so that `mmval value` needs nothing else: where it was,
    its manifest fingerprint (to refuse other data) and what the model's inputs and outputs are."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    path: StrictStr
    dataset: StrictStr
    fingerprint: StrictStr
    classes: list[StrictStr]
    modalities: list[StrictStr]


@dataclass
class TrainingState:
    """What a resumed run needs beside the weights (last.pt only)."""

    __pydantic_config__ = _TYPED
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    sampler: dict[str, StrictInt]
    method: dict[str, Any]
    method_modules: dict[str, torch.Tensor] | None  # absent from runs before methods had modules
    rng: dict[str, Any]
    run_state: dict[str, Any]  # the loop's counters and every epoch's metrics row


@dataclass
class Checkpoint:
    __pydantic_config__ = _TYPED
    recipe: dict[str, Any]  # the recipe dump (JSON mode) the model was trained with
    data: DataInfo
    model: dict[str, torch.Tensor]
    epoch: StrictInt  # epochs trained, counted from 1
    metrics: dict[str, Any] | None = None  # the epoch's metrics row, numbers (best.pt)
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
        """The checkpoint of an on-disk dict, validated: a missing key or one of the wrong type
        is a UserError naming it. Keys it does not know (`format`) are left out."""
        names = [f.name for f in fields(TrainingState)]
        state = {k: v for k, v in payload.items() if k in names}
        core = {k: v for k, v in payload.items() if k not in names and k != "training"}
        problems: list[tuple[str, str]] = []
        checkpoint = training = None
        try:
            checkpoint = _adapters()[0].validate_python(core)
        except ValidationError as exc:
            problems += problems_of(exc, core)
        if state:  # last.pt; runs before methods had modules saved none
            try:
                training = _adapters()[1].validate_python({"method_modules": None, **state})
            except ValidationError as exc:
                problems += problems_of(exc, state)
        if problems or checkpoint is None:
            raise UserError(
                format_problems(problems, f"checkpoint {where}")
                + "\nIt was not written by mmval, or it is damaged."
            )
        return replace(checkpoint, training=training)


@functools.cache
def _adapters() -> tuple[TypeAdapter[Checkpoint], TypeAdapter[TrainingState]]:
    """The validators of a loaded payload, built on the first load: their types hold tensors,
    and building them imports torch."""
    return TypeAdapter(Checkpoint), TypeAdapter(TrainingState)


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


def _size_text(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # the loop returns at GiB


def size_limit() -> int:
    """The most a checkpoint may declare: MMVAL_MAX_CHECKPOINT_SIZE (bytes, or a number with K,
    M, G or T for powers of 1024), else DEFAULT_SIZE_LIMIT."""
    text = os.environ.get(SIZE_LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_SIZE_LIMIT
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?", text.upper())
    if match is None or float(match[1]) * _UNITS[match[2]] < 1:
        raise UserError(
            f"{SIZE_LIMIT_ENV}={shown(text)} is not a size: give bytes or a number with K, M, G "
            "or T (e.g. 16G)."
        )
    return int(float(match[1]) * _UNITS[match[2]])


def check_declared_size(path: Path, what: str) -> None:
    """Refuse a file whose records would inflate beyond the limits of the module docstring,
    from the sizes its zip directory declares (nothing is inflated); a file that is not a zip
    (a legacy pickle) counts its size on disk."""
    on_disk = path.stat().st_size
    declared = on_disk
    with open(path, "rb") as fh:
        zipped = fh.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if zipped:
        try:
            with zipfile.ZipFile(path) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, EOFError):
            return  # no readable directory: _check_archive says what is wrong
    limit, inflation = size_limit(), max(INFLATION * on_disk, INFLATION_FLOOR)
    if declared <= min(limit, inflation):
        return
    allowed, why = limit, f"{SIZE_LIMIT_ENV}; raise it if the file is genuine, e.g. to 32G"
    if declared > inflation:
        allowed = inflation
        why = (
            f"{INFLATION} times its size on disk, here {_size_text(on_disk)}, or "
            f"{_size_text(INFLATION_FLOOR)}; torch.save stores records uncompressed, so a file "
            "that inflates further was compressed by another program"
        )
    raise UserError(
        f"{what} {path} declares {_size_text(declared)} of records, more than the "
        f"{_size_text(allowed)} allowed ({why}). It was refused before anything was inflated."
    )


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


def read_torch_file(
    path: Path, what: str = "mmval checkpoint", map_location: str | torch.device = "cpu"
) -> Any:
    """The object a torch file holds, read after the safety checks (declared size, then every
    record's CRC) with `weights_only=True`; `what` names the file in messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    check_declared_size(path, what)
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path} is not a loadable {what} ({reason}). It may be truncated, or hold "
            "objects other than tensors and plain values, which mmval refuses to unpickle."
        ) from None


def load_payload(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The on-disk dict of a checkpoint file, after the safety checks."""
    payload = read_torch_file(path, "mmval checkpoint", map_location)
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
