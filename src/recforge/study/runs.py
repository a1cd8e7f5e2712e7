"""Run folders of a study: fingerprints, atomic claiming, finished records, the environment stamp.

A run folder is named by the fingerprint of everything that shapes the run (the protocol, its
parameters, the resolved data / model / train sections and the seed), not by labels, so that
studies sharing a run share its folder. ``claim`` creates ``claim.json`` with ``O_EXCL``; a claim
whose process is gone is taken over. ``record.json`` (written atomically) marks the run finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch

CLAIM_FILE = "claim.json"
RECORD_FILE = "record.json"
UNREADABLE_CLAIM_SECONDS = 60  # a claim file still unreadable after this was left by a process that died writing it


def fingerprint(shape: dict[str, Any]) -> str:
    """A short hash of a JSON-serialisable description of a run."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


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
        return True  # another machine's process: cannot tell, so it holds the run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < UNREADABLE_CLAIM_SECONDS
    except FileNotFoundError:
        return True  # gone meanwhile: another process took it


def claim(folder: Path) -> bool:
    """Take ``folder`` for this process; False when a live process holds it.

    The claim file is created with ``O_EXCL``, so of processes claiming at once exactly one wins;
    a claim left by a process that died is removed and claimed anew.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_FILE
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
            stale = path.with_name(f"{CLAIM_FILE}.stale.{os.getpid()}")
            try:
                os.replace(path, stale)  # only one taker moves the dead claim away
            except FileNotFoundError:
                return False
            stale.unlink()
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        return True
    return False


def release(folder: Path) -> None:
    (folder / CLAIM_FILE).unlink(missing_ok=True)


def finished(folder: Path) -> dict[str, Any] | None:
    """The record of a finished run, or None."""
    path = folder / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def environment() -> dict[str, Any]:
    """What the run ran on, measured now: CPU model, cores, torch threads and version, device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
