"""Checkpoints: written atomically, read with `weights_only=True` so a file can never run code.

A file that cannot be read whole (truncated, zero bytes, a record whose CRC does not match) is a
`CorruptCheckpoint`; a run that keeps its previous checkpoint then resumes from that one. A
complete file that holds anything but tensors and plain values (a pickle crafted to run code) is
refused outright: it is never a reason to fall back silently.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
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


def save_checkpoint(path: Path, payload: dict[str, Any], *, previous: Path | None = None) -> None:
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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
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


def load_latest_checkpoint(path: Path, previous: Path) -> tuple[dict[str, Any], Path]:
    """`path`, or `previous` with a warning when `path` is corrupt or gone; returns the one
    used. A refused file (one crafted to run code, a foreign format) is an error, never skipped."""
    if not path.is_file() and previous.is_file():
        problem = f"checkpoint {path} is missing."
    else:
        try:
            return load_checkpoint(path), path
        except CorruptCheckpoint as exc:
            if not previous.is_file():
                raise CorruptCheckpoint(
                    f"{exc} There is no previous checkpoint to fall back on."
                ) from None
            problem = str(exc)
    ckpt = load_checkpoint(previous)
    log.warning("warning: %s Resuming from the previous checkpoint %s instead.", problem, previous)
    return ckpt, previous
