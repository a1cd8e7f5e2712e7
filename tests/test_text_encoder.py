"""The offline sentence encoder: packaged weights, pooling, batching and agreement with references."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from recforge.errors import CheckpointError, DataError  # noqa: E402
from recforge.text import SentenceEncoder  # noqa: E402
from recforge.text import encoder as encoder_module  # noqa: E402

PARAPHRASE = ("A man is playing a guitar.", "Someone plays the guitar.")
UNRELATED = ("The stock market fell today.", "Cats sleep most of the day.", "Rain is expected tomorrow.")
MIXED_LENGTHS = [
    "Hi.",
    "A much longer sentence that goes on for a while, so that it needs many more word pieces than the rest.",
    "Short one.",
    "Medium length sentence about recommender systems.",
    "ok",
    "Another fairly long sentence, with commas, numbers like 1234 and punctuation!",
    "Two words",
]
SYNONYMS = [
    ("The dress fits perfectly and looks great.", "This dress has a perfect fit and looks lovely."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("She bought a new car last week.", "Last week she purchased a new automobile."),
    ("I would like to return these shoes.", "I want to send these shoes back."),
]
UNRELATED_PAIRS = [
    ("The dress fits perfectly and looks great.", "Quantum computers use qubits."),
    ("How do I reset my password?", "The river flooded the village in spring."),
    ("She bought a new car last week.", "The algorithm sorts the list in linear time."),
    ("I would like to return these shoes.", "Photosynthesis converts light into chemical energy."),
]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> SentenceEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return SentenceEncoder.load()


def plain_embedding(encoder: SentenceEncoder, text: str) -> np.ndarray:
    """One text alone, no padding: mean of the token states, L2-normalised."""
    tokens = encoder.tokenizer(text, truncation=True, max_length=encoder.max_length, return_tensors="pt")
    with torch.inference_mode():
        states = encoder.model(**tokens).last_hidden_state[0]
    mean = states.mean(0)
    return (mean / mean.norm()).numpy()


def test_loads_offline_from_the_packaged_weights(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the encoder tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    loaded = SentenceEncoder()
    assert loaded.checksum == encoder_module.WEIGHTS_SHA256
    assert loaded.folder == tmp_path / "models" / "all-MiniLM-L6-v2"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["all-MiniLM-L6-v2"]  # no staging left
    assert capsys.readouterr() == ("", "")
    assert "all_minilm_l6_v2" not in sys.modules  # the model package prints when imported


def test_a_bad_archive_leaves_no_model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(encoder_module, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors in .*model.zip: sha256 .* does not match"):
        encoder_module.model_dir()
    assert list((tmp_path / "models").iterdir()) == []


def test_an_incomplete_model_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path))
    (tmp_path / "models" / "all-MiniLM-L6-v2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="all-MiniLM-L6-v2: no model.safetensors"):
        encoder_module.model_dir()


def test_corrupted_weights_name_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'model.safetensors'}: sha256"):
        SentenceEncoder(tmp_path)


def test_loaded_once_per_process(encoder):
    assert SentenceEncoder.load() is encoder


def test_unit_norm_float32_rows(encoder):
    out = encoder.encode(MIXED_LENGTHS, batch_size=3)
    assert out.shape == (len(MIXED_LENGTHS), 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_rows_follow_the_input_order(encoder):
    a, b = "A short text.", "A noticeably longer text than the first one, by quite a margin."
    forward, backward = encoder.encode([a, b]), encoder.encode([b, a])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-6)


def test_paraphrases_are_closer_than_unrelated_sentences(encoder):
    texts = [*PARAPHRASE, *UNRELATED]
    embeddings = encoder.encode(texts)
    cosine = embeddings @ embeddings.T
    paraphrase = cosine[0, 1]
    pairs = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts)) if (i, j) != (0, 1)]
    unrelated = [cosine[i, j] for i, j in pairs]
    assert paraphrase > 0.7
    assert paraphrase > max(unrelated)


def test_every_paraphrase_pair_scores_above_every_unrelated_pair(encoder):
    def cosines(pairs):
        left, right = (encoder.encode([pair[side] for pair in pairs]) for side in (0, 1))
        return (left * right).sum(1)

    assert cosines(SYNONYMS).min() > cosines(UNRELATED_PAIRS).max()


def test_batches_pad_to_their_longest_text_in_word_pieces(encoder):
    # characters 18, 17, 21, 3; word pieces 6, 11, 9, 4 ([CLS] and [SEP] included)
    texts = ["one two three four", "a b c d e f g h i", "Supercalifragilistic!", "Hi."]
    fed = []
    hook = encoder.model.embeddings.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        batched = encoder.encode(texts, batch_size=2)
    finally:
        hook.remove()
    assert fed == [(2, 11), (2, 6)]
    alone = np.stack([plain_embedding(encoder, text) for text in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_texts_are_tokenised_window_by_window(encoder, monkeypatch):
    monkeypatch.setattr(encoder_module, "_WINDOW_BATCHES", 2)
    windowed = encoder.encode(MIXED_LENGTHS, batch_size=1)
    alone = np.stack([plain_embedding(encoder, text) for text in MIXED_LENGTHS])
    np.testing.assert_allclose(windowed, alone, atol=1e-5)


def test_batched_equals_each_text_alone(encoder):
    batched = encoder.encode(MIXED_LENGTHS, batch_size=3)
    alone = np.stack([plain_embedding(encoder, text) for text in MIXED_LENGTHS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_matches_sentence_transformers(encoder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(
        str(encoder.folder), device="cpu", local_files_only=True
    )
    expected = reference.encode(MIXED_LENGTHS, batch_size=3, convert_to_numpy=True)
    np.testing.assert_allclose(encoder.encode(MIXED_LENGTHS, batch_size=3), expected, atol=1e-5)


def test_an_empty_text_names_its_position(encoder):
    with pytest.raises(DataError, match="text 1 is empty"):
        encoder.encode(["fine", "  "])
    with pytest.raises(DataError, match="text 0 is empty"):
        encoder.token_states([""], max_length=8)
    allowed = encoder.encode(["fine", ""], allow_empty=True)
    np.testing.assert_allclose(np.linalg.norm(allowed, axis=1), 1.0, atol=1e-5)


def test_token_states_pool_to_the_embedding(encoder):
    texts = ["Hi.", "Medium length sentence about recommender systems."]
    states, mask = encoder.token_states(texts, max_length=16)
    assert states.shape == (2, 16, 384) and states.dtype == np.float32
    assert mask.shape == (2, 16) and mask.dtype == bool
    assert mask[:, 0].all() and not mask[0, -1]
    assert not states[~mask].any()
    pooled = states.sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, encoder.encode(texts), atol=1e-5)
