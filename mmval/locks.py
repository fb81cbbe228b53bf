"""Exclusive locks on the folders and files one mmval command writes: a run folder while it
trains, a data folder while a prep or merge writes it, the `--out` file of `mmval value` and
`mmval report`. A second command on the same target stops with a UserError naming the holder.

The lock is `fcntl.flock` on a lock file (`.mmval.lock` in a folder, `.<name>.mmval.lock` beside
a file): the kernel (on NFS, the file server) releases it when its process ends in any way,
`kill -9` included, so there is no stale lock to detect or remove by hand. The holder writes its
pid, host, start time and command line into the file, only to be named in the refusal. The file
is removed when the lock is released; the name starts with a dot and ends in neither `.tmp` nor a
data suffix, so run and data readers, `remove_stale_temps` and `mmval report` never see it.
docs/reliability.md ("Locks and overwrite") has the file-system caveats.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from mmval.atomic import WriteError
from mmval.errors import UserError

LOCK_FILE = ".mmval.lock"  # in a folder that one command writes
LOCK_SUFFIX = ".mmval.lock"  # `.<name>.mmval.lock` beside a single output file
_ATTEMPTS = 5  # a lock file removed between our open and our flock: open the new one
_HELD: set[Path] = set()  # lock files this process holds: taking one again is a no-op


def lock_file(target: Path, *, folder: bool) -> Path:
    """The lock file of a folder (inside it) or of an output file (beside it)."""
    target = Path(target)
    if folder:
        return target / LOCK_FILE
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def locked(target: Path, *, folder: bool, what: str) -> Iterator[None]:
    """Hold the exclusive lock of `target` (a folder, created if missing, or an output file)
    for the block; `what` names it in the refusal ("run folder runs/x/seed0"). Re-entrant in one
    process, so a command may lock a folder its caller already holds."""
    path = lock_file(target, folder=folder)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        yield
        return
    fd = _acquire(path, what, target)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        # removed while still held: a process that opened it meanwhile finds it gone and retries
        path.unlink(missing_ok=True)
        os.close(fd)
        if folder:  # the folders made only for the lock (a refused command): gone
            with contextlib.suppress(OSError):
                for made in created:  # innermost first; one not empty ends it
                    made.rmdir()


def ensure_free(target: Path, *, folder: bool, what: str) -> None:
    """Refuse (UserError naming the holder) when another process holds `target`'s lock; checked
    before a command reports anything else about a folder that someone may be writing."""
    if lock_file(target, folder=folder).is_file():
        with locked(target, folder=folder, what=what):
            pass


def _acquire(path: Path, what: str, target: Path) -> int:
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a read-only or full file system: name what was to be written
            raise WriteError.of(Path(target), exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(_busy(what, path, holder)) from None
        except OSError as exc:
            os.close(fd)
            raise UserError(
                f"cannot lock {path} ({errno.errorcode.get(exc.errno or 0, exc.errno)}: "
                f"{exc.strerror}): this file system does not support file locks, so mmval "
                f"cannot keep two commands from writing {what} at once. Write to a local disk or "
                "to a network file system mounted with locking (NFS with lockd or v4, Lustre with "
                "-o flock)."
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            try:
                _record(fd)
            except OSError as exc:  # a full disk: name what the command was to write
                os.close(fd)
                path.unlink(missing_ok=True)
                raise WriteError.of(Path(target), exc) from exc
            return fd
        os.close(fd)  # its holder removed it after we opened it: lock the new file
    raise UserError(f"{what} is locked and released by other processes in turn ({path}).")


def _record(fd: int) -> None:
    """Write who holds the lock (for the message a second process prints)."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _read(fd: int) -> dict[str, object]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _busy(what: str, path: Path, holder: dict[str, object]) -> str:
    if {"pid", "host", "since", "command"} <= holder.keys():
        who = (
            f"pid {holder['pid']} on {holder['host']}, since {holder['since']}: "
            f"`{holder['command']}`"
        )
    else:
        who = "a process that has not recorded itself yet"
    return (
        f"{what} is in use by another mmval command ({who}). Wait for it to end or stop it, "
        f"then run this command again. The lock ({path}) is released when its process ends, "
        "even when it is killed; on a network file system the file server may take a minute or "
        "two to notice a machine that died."
    )
