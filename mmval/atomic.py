"""Atomic file writes: readers see either the old file or the complete new one, never a torn one.

A write that fails for the file system's reason (disk full, quota, read-only, permissions, file
too large) raises `WriteError`, an `OSError` that names the file meant and whose temp file is
already gone; the CLI prints it with the free space (`write_failure`) and exits 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# how much the probe appends to find out whether a failed write met a full disk: a disk a
# write failed on has less than a block left, a disk with room takes this much
_PROBE_BYTES = 1 << 20
# errnos that say the file system refused a write, not that mmval has a bug
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


class WriteError(OSError):
    """Writing `filename` failed with the OS error `errno`; nothing of it was left behind."""

    @classmethod
    def of(cls, target: Path, cause: OSError) -> WriteError:
        code = cause.errno or errno.EIO
        return cls(code, os.strerror(code), str(target))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync it and rename it over `target`.
    A failure of the file system (also one torch reports as a RuntimeError) is a `WriteError`
    naming `target`; the temp file is removed in every case."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent
        )
        # mkstemp makes 0600 files: give the usual mode (0666 less the umask) so that
        # colleagues on a shared cluster can read the data and runs, as with open()
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError.of(target, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except WriteError:
        raise
    except Exception as exc:
        cause = _file_system_cause(exc, tmp, target)
        if cause is None:
            raise
        raise WriteError.of(target, cause) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _file_system_cause(exc: Exception, tmp: Path, target: Path) -> OSError | None:
    """The OS error behind a failed write of `tmp`, or None when the failure is not the file
    system's (a bug, or an error about another file, which passes through unchanged)."""
    if isinstance(exc, OSError):
        return exc if exc.filename in (None, str(tmp), str(target)) else None
    chained = exc.__cause__ or exc.__context__
    if isinstance(chained, OSError) and chained.filename in (None, str(tmp)):
        return chained  # torch.save to a file object: the OSError is the RuntimeError's context
    if not isinstance(exc, RuntimeError):
        return None
    # torch.save to a path writes from C++ and says only "unexpected pos" / "file write failed":
    # ask the file system whether it takes more bytes in the same file
    try:
        with open(tmp, "ab") as fh:
            fh.write(bytes(_PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as probe:
        return probe
    return None


def write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and move the result to `target` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)


def write_text_atomic(target: Path, text: str) -> None:
    write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files `atomic_path` left in `folder` (not below it) when its process was
    killed (`kill -9`, power loss); call it only on a folder one command owns, before writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of `path` (its nearest existing folder), None if unknown."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def write_failure(exc: OSError) -> str:
    """One paragraph for a write the file system refused: the file, what failed, the free
    space there, and what to do."""
    path = exc.filename or "a file"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    head = f"could not write {path}" if isinstance(exc, WriteError) else str(path)
    free = free_bytes(Path(exc.filename)) if exc.filename else None
    room = f"; {_size(free)} free on that file system" if free is not None else ""
    if exc.errno == errno.ENOSPC:
        advice = "Free some space (or write elsewhere) and run the command again."
    elif exc.errno == errno.EDQUOT:
        advice = "Your quota there is used up: free some (or write elsewhere) and run it again."
    elif exc.errno == errno.EFBIG:
        advice = "The file is larger than this process (ulimit -f) or the file system allows."
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "Write to a folder you may write to."
    else:
        advice = "Check the file system and run the command again."
    kept = " Nothing half-written was left." if isinstance(exc, WriteError) else ""
    return f"{head}: {reason}{room}.{kept} {advice}"


def _size(n: int) -> str:
    """Bytes in the largest binary unit below 1024 of it (up to GiB)."""
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
