"""Mistakes with run folders, checkpoints and bundles."""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.bad_input import Case
from tests.bad_input.files import log_rows, recforge, trained_run, user_files, write_csv

RESUME = ("train", "mine.yaml", "--out", "run", "--resume")
SAFETENSORS = "not a readable safetensors file (Error while deserializing header: {})"


def damaged(name: str, damage: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """A finished run whose file ``run/<name>`` the user damaged with ``damage(bytes) -> bytes``."""

    def files(folder: Path) -> None:
        trained_run(folder)
        path = folder / "run" / name
        path.write_bytes(damage(path.read_bytes()))

    return files


def locked(folder: Path) -> None:
    """The user's files and ``run/``, locked by a process that is alive (pid 1 always is)."""
    user_files(folder)
    (folder / "run").mkdir()
    (folder / "run" / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))


def unfinished(folder: Path) -> None:
    """A run killed before it finished: no metrics.json."""
    trained_run(folder)
    (folder / "run" / "metrics.json").unlink()


def rows_to_score(edit: Callable[[list[dict]], list[dict]]) -> Callable[[Path], None]:
    """A finished run and ``rows.csv``, new rows without labels, as ``edit`` leaves them."""

    def files(folder: Path) -> None:
        trained_run(folder)
        write_csv(folder / "rows.csv", edit([{k: v for k, v in r.items() if k != "click"} for r in log_rows(50, seed=3)]))

    return files


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def noise(data: bytes) -> bytes:
    return random.Random(0).randbytes(len(data))


CASES = [
    Case("runs", "train again into the folder of a finished run", trained_run, ("train", "mine.yaml", "--out", "run"),
         "run: already holds a run (config.yaml, metrics.json, report.md, metrics.jsonl, model, last, best); "
         "pass --overwrite to delete its outputs first, or --resume to continue it"),
    Case("runs", "--resume into a folder without a checkpoint", user_files, RESUME,
         "run: no checkpoint to resume from; train without --resume to start afresh"),
    Case("runs", "--resume and --overwrite together", trained_run, (*RESUME, "--overwrite"),
         "--resume continues the run in the folder and --overwrite deletes it: pass one of them"),
    Case("runs", "--resume with another monitor", trained_run, (*RESUME, "--set", "train.monitor=valid_click_logloss"),
         "run/last: cannot resume: train.monitor was None, now 'valid_click_logloss'"),
    Case("runs", "--resume with another split seed", trained_run, (*RESUME, "--set", "data.split.seed=1"),
         "run/last: cannot resume: data.split.seed was 0, now 1"),
    Case("runs", "--resume with another model parameter", trained_run, (*RESUME, "--set", "model.params.embedding_dim=8"),
         "run/last: cannot resume: model.params.embedding_dim was 16, now 8"),
    Case("runs", "--resume with another learning rate", trained_run, (*RESUME, "--set", "train.lr=0.01"),
         "run/last: cannot resume: train.lr was 0.001, now 0.01"),
    Case("runs", "a monitor that is not a validation metric", user_files,
         ("train", "mine.yaml", "--out", "run", "--set", "train.monitor=valid_auc"),
         "train.monitor: 'valid_auc' is not a validation metric; "
         "choose one of ['valid_click_auc', 'valid_click_logloss', 'valid_click_gauc']"),
    Case("runs", "evaluate a run whose model.safetensors is truncated", damaged("model/model.safetensors", half),
         ("evaluate", "run"), "run/model/model.safetensors: " + SAFETENSORS.format("incomplete metadata, file not fully covered")),
    Case("runs", "evaluate a run whose model.safetensors is empty", damaged("model/model.safetensors", lambda _: b""),
         ("evaluate", "run"), "run/model/model.safetensors: " + SAFETENSORS.format("header too small")),
    Case("runs", "evaluate a run whose model.safetensors is random bytes", damaged("model/model.safetensors", noise),
         ("evaluate", "run"), "run/model/model.safetensors: " + SAFETENSORS.format("header too large")),
    Case("runs", "--resume from a truncated optimizer.safetensors", damaged("last/optimizer.safetensors", half), RESUME,
         "run/last/optimizer.safetensors: " + SAFETENSORS.format("invalid header length")),
    Case("runs", "--resume from a truncated state.json", damaged("last/state.json", lambda data: data[:40]), RESUME,
         "run/last/state.json: not a readable JSON file (Expecting ',' delimiter: line 4 column 14 (char 40))"),
    Case("runs", "train into a folder another live process is writing", locked, ("train", "mine.yaml", "--out", "run"),
         "run: another process (pid 1) is writing this run folder; wait for it to end or choose another --out"),
    Case("runs", "evaluate a run whose config.yaml was broken by an edit", damaged("config.yaml", lambda data: data + b"  oops: [\n"),
         ("evaluate", "run"), "run/config.yaml: line 32: not valid YAML: expected the node content, but found '<stream end>' "
         "(while parsing a flow node from line 32)"),
    Case("runs", "evaluate a run that never finished", unfinished, ("evaluate", "run"),
         "run: not a finished run (no readable metrics.json); train it to the end first"),
    Case("runs", "evaluate a split that does not exist", trained_run, ("evaluate", "run", "--split", "dev"),
         "--split must be one of train, valid, test, not 'dev'"),
    Case("runs", "score rows that lack a column of the model", rows_to_score(lambda rows: [{k: v for k, v in r.items() if k != "zip"} for r in rows]),
         ("score", "run", "rows.csv"), "data file rows.csv lacks the schema's columns ['zip'] (features.2.name); "
         "it has ['user_id', 'item_id', 'price']"),
    Case("runs", "score rows with a word for a price", rows_to_score(lambda rows: [dict(r, price="cheap") if i == 4 else r for i, r in enumerate(rows)]),
         ("score", "run", "rows.csv"), "rows.csv: column 'price', line 6: 'cheap' is not a number"),
    Case("runs", "score with a folder that holds no run", user_files, ("score", "nowhere", "log.csv"),
         "nowhere: no such run folder"),
]  # fmt: skip


_EXPORTED: dict[str, Path] = {}


def damaged_export(name: str, damage: Callable[[bytes], bytes] | None) -> Callable[[Path], None]:
    """A finished run, ``bundle/`` (its export, made once per process) and the file ``bundle/<name>``
    damaged with ``damage(bytes) -> bytes``, or deleted when ``damage`` is None."""

    def files(folder: Path) -> None:
        trained_run(folder)
        if "bundle" not in _EXPORTED:
            scratch = Path(tempfile.mkdtemp(prefix="recforge-exported-"))
            trained_run(scratch)
            done = recforge(scratch, "export", "run", "--out", "bundle")
            assert done.returncode == 0, done.stderr
            _EXPORTED["bundle"] = scratch / "bundle"
        shutil.copytree(_EXPORTED["bundle"], folder / "bundle")
        path = folder / "bundle" / name
        path.unlink() if damage is None else path.write_bytes(damage(path.read_bytes()))

    return files


def flip_byte(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 1]) + data[101:]


CASES += [
    Case("runs", "export a folder that holds no run", user_files, ("export", ".", "--out", "bundle"),
         ".: not a finished run (no readable metrics.json); train it to the end first"),
    Case("runs", "export without --out", trained_run, ("export", "run"),
         "--out names the bundle folder to write: recforge export RUN --out BUNDLE"),
    Case("runs", "export into the folder of the user's own files", trained_run, ("export", "run", "--out", "."),
         ".: exists and holds no exported bundle (no manifest.json); choose another --out"),
    Case("runs", "--check a run folder instead of an exported bundle", trained_run, ("export", "--check", "run"),
         "run: no exported bundle (no manifest.json); write one with `recforge export RUN --out BUNDLE`"),
    Case("runs", "--check a bundle whose model.safetensors was changed", damaged_export("model.safetensors", flip_byte),
         ("export", "--check", "bundle"),
         "bundle/model.safetensors: sha256 differs from the manifest (the file is corrupted or was changed)"),
    Case("runs", "--check a bundle one of whose files was deleted", damaged_export("vocab/item_id.parquet", None),
         ("export", "--check", "bundle"), "bundle/vocab/item_id.parquet: missing (the manifest lists it)"),
]  # fmt: skip
