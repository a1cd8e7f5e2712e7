"""Files that mark a state: atomic writes, directories replaced as one unit (a checkpoint, a
bundle: at every instant ``<name>`` or ``<name>.old`` is complete) and lock files that survive
their holder's death."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

STAGING, PREVIOUS, TRASH = ".tmp", ".old", ".trash"  # siblings of a directory replaced as one unit
UNREADABLE_LOCK_SECONDS = 60  # a lock file still unreadable after this was left by a process that died writing it


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with staging.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, so it holds the lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < UNREADABLE_LOCK_SECONDS
    except FileNotFoundError:
        return True  # gone meanwhile: another process took it


def take_lock(path: Path) -> bool:
    """Create the lock file ``path`` for this process; False when a live process holds it.

    The file is created with ``O_EXCL``, so of processes taking it at once exactly one wins; a
    lock left by a process that died (or left unreadable for :data:`UNREADABLE_LOCK_SECONDS`) is
    removed and taken anew.
    """
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                alive = _alive(int(holder["pid"]), holder["host"])
            except (OSError, ValueError, KeyError):  # being written by its creator, or left half-written
                alive = _young(path)
            if alive:
                return False
            stale = path.with_name(f"{path.name}.stale.{os.getpid()}")
            try:
                os.replace(path, stale)  # only one taker moves the dead holder's lock away
            except FileNotFoundError:
                return False
            stale.unlink()
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        return True
    return False


def wait_for_lock(path: Path, poll_seconds: float = 0.5) -> None:
    """Take the lock file ``path``, waiting while another live process holds it."""
    while not take_lock(path):
        time.sleep(poll_seconds)


# --- directories replaced as one unit ------------------------------------------------------------
def versions(final: Path) -> list[Path]:
    """``final`` and the siblings its saves make beside it."""
    return [final] + [_sibling(final, suffix) for suffix in (STAGING, PREVIOUS, TRASH)]


def stage_directory(final: Path) -> Path:
    """An empty ``<final>.tmp`` to write the next version of ``final`` into."""
    staging = _sibling(final, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # what a killed save left: never read
    staging.mkdir(parents=True)
    return staging


def install_directory(staging: Path, final: Path, marker: str, text: str) -> None:
    """Complete ``staging`` with its ``marker`` file holding ``text`` and put it in ``final``'s place.

    Every file is on disk before the marker, and the marker before any rename (module docstring).
    """
    for path in sorted(staging.rglob("*"), reverse=True):  # files before the folders holding them
        _fsync(path)
    with (staging / marker).open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(staging)
    previous, trash = _sibling(final, PREVIOUS), _sibling(final, TRASH)
    if (final / marker).is_file():
        _discard(previous, trash)
        os.replace(final, previous)
    elif final.exists():  # not a complete version: nothing to keep
        _discard(final, trash)
    _fsync(final.parent)
    os.replace(staging, final)
    _fsync(final.parent)
    _discard(previous, trash)


def find_complete(final: Path, marker: str) -> Path | None:
    """``final``, or the ``<final>.old`` a killed save left, whichever holds ``marker`` first; None if neither."""
    for candidate in (final, _sibling(final, PREVIOUS)):
        if (candidate / marker).is_file():
            return candidate
    return None


def _sibling(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def _discard(path: Path, trash: Path) -> None:
    """Delete the directory ``path`` (if any), renaming it to ``trash`` first: out of the readers' way."""
    shutil.rmtree(trash, ignore_errors=True)
    if path.exists():
        os.replace(path, trash)
        shutil.rmtree(trash)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
