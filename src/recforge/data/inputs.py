"""The inputs of a store: the files it was prepared from, and whether they changed since.

Each input is recorded with its size, modification time and sha256. A store is fresh while every
recorded input has the same size and modification time, or, where those changed, the same content
(then the new times are recorded). A public data set's input files are every file of the folder
its loader read (:func:`note_folder`, called by the loader's folder lookup).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_FOLDERS: ContextVar[list[Path] | None] = ContextVar("recforge_input_folders", default=None)


def note_folder(folder: Path) -> None:
    """Record ``folder`` as read by the loader running inside :func:`reading`."""
    folders = _FOLDERS.get()
    if folders is not None:
        folders.append(folder)


@contextmanager
def reading() -> Iterator[list[Path]]:
    """Collect the files under every folder a loader notes while the block runs (filled on exit)."""
    found: list[Path] = []
    folders: list[Path] = []
    token = _FOLDERS.set(folders)
    try:
        yield found
    finally:
        _FOLDERS.reset(token)
    found += sorted(p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def describe(paths: list[Path]) -> list[dict[str, Any]]:
    """Path, size, modification time and sha256 of each distinct file of ``paths``."""
    described = []
    for path in dict.fromkeys(p.resolve() for p in paths):
        stat = path.stat()
        described.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest(path)})
    return described


def fingerprint(config: dict[str, Any], inputs: list[dict[str, Any]]) -> str:
    """Digest of a data config and the content of its inputs."""
    payload = {"config": config, "inputs": sorted(item["sha256"] for item in inputs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check(inputs: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(why the inputs are not the recorded ones, or None; the records with refreshed times)``."""
    refreshed = []
    for item in inputs:
        path = Path(item["path"])
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"its input {path} is gone", inputs
        if (stat.st_size, stat.st_mtime_ns) != (item["size"], item["mtime_ns"]):
            if stat.st_size != item["size"] or digest(path) != item["sha256"]:
                return f"its input {path} changed", inputs
            item = {**item, "mtime_ns": stat.st_mtime_ns}
        refreshed.append(item)
    return None, refreshed
