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
from pathlib import Path
from typing import Any

import torch

from recforge.files import take_lock

CLAIM_FILE = "claim.json"
RECORD_FILE = "record.json"


def fingerprint(shape: dict[str, Any]) -> str:
    """A short hash of a JSON-serialisable description of a run."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def claim(folder: Path) -> bool:
    """Take ``folder`` for this process; False when a live process holds it (see :func:`recforge.files.take_lock`)."""
    folder.mkdir(parents=True, exist_ok=True)
    return take_lock(folder / CLAIM_FILE)


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
