"""Find a public data set locally, or download it from its publisher and check its hashes.

A data set lives in a folder named as in the shared data directory (``movielens-1m`` ...).
:func:`dataset_dir` returns ``$RECFORGE_DATA/<folder>`` when that exists; otherwise it downloads
the publisher's files into ``$RECFORGE_CACHE/<folder>`` (default ``~/.cache/recforge/<folder>``),
checking the sha256 of every file, or of the members of an archive that was re-packed upstream.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recforge.data.inputs import note_folder
from recforge.errors import DataError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One file of a data set as its publisher serves it.

    - ``name``: the file's name inside the data set's folder.
    - ``sha256``: hash of the downloaded file; ``None`` where only its members are checked.
    - ``members``: zip member -> sha256, checked after the download.
    - ``extract``: write the members into the folder (under their member paths) and drop the
      archive; otherwise the archive is kept and read in place.
    """

    url: str
    name: str
    sha256: str | None = None
    members: Mapping[str, str] = field(default_factory=dict)
    extract: bool = False

    def present(self, folder: Path) -> bool:
        if self.extract:
            return all((folder / m).is_file() for m in self.members)
        return (folder / self.name).is_file()


def cache_dir(folder: str) -> Path:
    """Where ``folder`` is downloaded: ``$RECFORGE_CACHE/<folder>``, else ``~/.cache/recforge/``."""
    base = os.environ.get("RECFORGE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "recforge") / folder


def dataset_dir(folder: str, remotes: Sequence[Remote] = (), root: str | Path | None = None) -> Path:
    """The folder holding data set ``folder``: ``root`` when the caller names one, else the local
    copy if any, else a verified download. The folder is noted as an input of the store being prepared."""
    if root is not None:
        note_folder(Path(root))
        return Path(root)
    data = os.environ.get("RECFORGE_DATA")
    if data and (Path(data) / folder).is_dir():
        note_folder(Path(data) / folder)
        return Path(data) / folder
    if not remotes:
        raise DataError(
            f"data set {folder!r} not found: set RECFORGE_DATA to the folder that holds {folder}/"
        )
    target = cache_dir(folder)
    for remote in remotes:
        if not remote.present(target):
            _download(remote, target)
    note_folder(target)
    return target


def fetch(url: str, dest: str | Path, sha256: str | None) -> Path:
    """Download ``url`` to ``dest`` (atomically), checking its sha256 when one is given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, part.open("wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise DataError(
                f"sha256 mismatch for {dest.name} downloaded from {url}: "
                f"expected {sha256}, got {digest.hexdigest()}"
            )
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def check_zip_members(path: str | Path, members: Mapping[str, str]) -> None:
    """Raise if a member of zip ``path`` is missing or its sha256 differs from ``members``."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for member, expected in members.items():
            if member not in names:
                raise DataError(f"{path}: member {member} is missing")
            digest = hashlib.sha256()
            with archive.open(member) as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != expected.lower():
                raise DataError(
                    f"sha256 mismatch for {member} in {path}: "
                    f"expected {expected}, got {digest.hexdigest()}"
                )


def _download(remote: Remote, target: Path) -> None:
    archive = fetch(remote.url, target / remote.name, remote.sha256)
    try:
        if remote.members:
            check_zip_members(archive, remote.members)
        if remote.extract:
            with zipfile.ZipFile(archive) as z:
                for member in remote.members:
                    out = target / member
                    out.parent.mkdir(parents=True, exist_ok=True)
                    part = out.with_name(out.name + ".part")
                    with z.open(member) as src, part.open("wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                    part.replace(out)
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    if remote.extract:
        archive.unlink()
