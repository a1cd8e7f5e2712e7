"""Content embeddings: item text through the sentence encoder at prepare time, and a user's vector file."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from recforge.data import content
from recforge.data.prepare import Fitted, prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.splits import SplitConfig
from recforge.text.encoder import SentenceEncoder, model_dir

# three users; each user's last review (time 3) is the test row, the one before it the valid row
REVIEWS = pl.DataFrame({
    "user_id": [1, 1, 1, 2, 2, 2, 3, 3, 3],
    "item_id": ["a", "b", "c", "a", "b", "d", "c", "d", "a"],
    "title": ["guitar strings", "bass amp", "drum kit", "guitar strings", "bass amp", "piano", "drum kit", "piano", "guitar strings"],
    "tags": [["strings"], ["amp", "bass"], ["drums"], ["strings"], ["amp", "bass"], ["keys"], ["drums"], ["keys"], ["strings"]],
    "review": ["bright and warm", "loud", "noisy", "rusty after a week", "fine", "lovely keys", "hit hard", "soft touch", "snapped on day one"],
    "t": [1, 2, 3, 1, 2, 3, 1, 2, 3],
    "click": [1, 0, 1, 0, 1, 1, 0, 1, 1],
})  # fmt: skip


def text_schema(**extra: Feature) -> Schema:
    return Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="title_text", kind=Kind.EMBEDDING, key="item_id", dim=384, text=["title", "tags"]),
            Feature(name="review_text", kind=Kind.EMBEDDING, key="item_id", dim=384, text=["review"], text_from="fit_rows"),
            *extra.values(),
        ],
        labels=["click"],
        user="user_id",
        time="t",
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty vector cache (the extracted encoder is shared)."""
    models = model_dir().parent
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models)
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def prepared(tmp_path, frame=REVIEWS, schema=None, fitted=None, name="store"):
    raw = RawDataset(frame=frame, schema=schema or text_schema(), origin="reviews.csv")
    return prepare(raw, tmp_path / name, SplitConfig(kind="leave_one_out"), fitted=fitted)


def test_item_text_is_encoded_once_per_key_and_aligned_to_the_vocabulary(tmp_path, cache):
    store = prepared(tmp_path)
    texts = store.texts_by_vocab("title_text")
    vocab = store.vocabulary("item_id")
    index = dict(zip(vocab["value"].to_list(), vocab["index"].to_list()))
    assert texts[index["c"]] == "drum kit. drums"
    assert texts[0] == texts[1] == ""
    vectors = store.vectors_by_vocab("title_text")
    expected = SentenceEncoder.load().encode(["drum kit. drums", "guitar strings. strings"])
    np.testing.assert_allclose(vectors[[index["c"], index["a"]]], expected, atol=1e-5)
    assert not vectors[:2].any()
    batch = store.split("train").take(np.arange(len(store.split("train"))))
    items = batch.categorical[:, store.schema.categorical_index("item_id")].numpy()
    np.testing.assert_allclose(batch.embeddings["title_text"].numpy(), vectors[items], atol=0)


def test_review_text_comes_from_the_train_split_only(tmp_path, cache):
    store = prepared(tmp_path)
    train = set(store.split("train").row.tolist())
    texts = " ".join(store.texts_by_vocab("review_text"))
    for row, review in enumerate(REVIEWS["review"]):
        assert (review in texts) == (row in train), review
    vocab = store.vocabulary("item_id")
    index = dict(zip(vocab["value"].to_list(), vocab["index"].to_list()))
    assert store.texts_by_vocab("review_text")[index["a"]] == "bright and warm | rusty after a week"  # time order
    # items b and d have no train row (they are OOV): no text, no content, counted on each of their rows
    keys = store.vector_keys("review_text")
    assert keys.filter(pl.col("key").is_in(["b", "d"]))["text"].to_list() == ["", ""]
    oov = json.loads((store.path / "oov.json").read_text())
    items = REVIEWS["item_id"].to_numpy()
    without = {split: int(np.isin(items[store.split(split).row], ["b", "d"]).sum()) for split in ("train", "valid", "test")}
    assert {split: oov[split]["review_text"] for split in without} == without == {"train": 0, "valid": 3, "test": 1}


def test_a_second_prepare_encodes_nothing(tmp_path, cache, monkeypatch):
    first = prepared(tmp_path, name="first")
    monkeypatch.setattr(SentenceEncoder, "encode", lambda *a, **k: pytest.fail("encoded a cached text"))
    second = prepared(tmp_path, name="second")
    for name in ("title_text", "review_text"):
        np.testing.assert_array_equal(first.vectors_by_vocab(name), second.vectors_by_vocab(name))


def test_new_rows_take_the_fitted_vectors_and_new_items_their_own_text(tmp_path, cache):
    store = prepared(tmp_path)
    fitted = Fitted.load(store.path)
    new = pl.DataFrame({
        "user_id": [1, 4], "item_id": ["a", "e"], "title": ["guitar strings", "ukulele"], "tags": [["strings"], ["small"]],
        "review": ["changed my mind", "cute"], "t": [9, 9], "click": [1, 0],
    })  # fmt: skip
    scored = prepared(tmp_path, new, fitted=fitted, name="scored")
    keys = scored.vector_keys("title_text")["key"].to_list()
    vectors = dict(zip(keys, scored.vectors["title_text"]))
    np.testing.assert_allclose(vectors["a"], store.vectors_by_vocab("title_text")[store.vocabulary("item_id").filter(pl.col("value") == "a")["index"][0]])
    np.testing.assert_allclose(vectors["e"], SentenceEncoder.load().encode(["ukulele. small"])[0], atol=1e-5)
    reviews = dict(zip(scored.vector_keys("review_text")["key"].to_list(), scored.vectors["review_text"]))
    assert not reviews["e"].any()  # no fitted review text: no content, whatever the new row says
    np.testing.assert_array_equal(reviews["a"], store.vectors_by_vocab("review_text")[store.vocabulary("item_id").filter(pl.col("value") == "a")["index"][0]])


def test_a_vector_file_gives_each_key_its_vector(tmp_path):
    file = tmp_path / "vectors.parquet"
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.5, 0.5], "d": [-1.0, 2.0], "unused": [9.0, 9.0]}
    pl.DataFrame({"item_id": list(table), "vector": list(table.values())}).write_parquet(file)
    schema = Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="item_vector", kind=Kind.EMBEDDING, key="item_id", dim=2, vectors=str(file)),
        ],
        labels=["click"], user="user_id", time="t",
    )  # fmt: skip
    store = prepared(tmp_path, REVIEWS.select("user_id", "item_id", "t", "click"), schema)
    vocab = store.vocabulary("item_id")
    by_vocab = store.vectors_by_vocab("item_vector")
    for value, index in zip(vocab["value"], vocab["index"]):
        assert by_vocab[index].tolist() == table[value]


def test_token_states_are_cached_and_empty_texts_have_no_tokens(tmp_path, cache, monkeypatch):
    states, mask = content.token_states(["a bright guitar", "", "a bright guitar"], max_length=8)
    assert states.dtype == np.float16 and states.shape == (3, 8, 384)
    assert mask[0].sum() == 5 and not mask[1].any() and not states[1].any()  # [CLS] a bright guitar [SEP]
    np.testing.assert_array_equal(states[0], states[2])
    direct, direct_mask = SentenceEncoder.load().token_states(["a bright guitar"], max_length=8)
    np.testing.assert_allclose(states[0].astype(np.float32), direct[0], atol=2e-3)
    monkeypatch.setattr(SentenceEncoder, "token_states", lambda *a, **k: pytest.fail("encoded cached tokens"))
    again, _ = content.token_states(["a bright guitar"], max_length=8)
    np.testing.assert_array_equal(again[0], states[0])


def test_a_bundle_serves_content_by_key(tmp_path, cache):
    from recforge.bundle import save_bundle
    from recforge.models import build_model
    from recforge.serve.encode import RowEncoder

    store = prepared(tmp_path)
    save_bundle(build_model("lr", store.schema, store=store), store, tmp_path / "model")
    encoder = RowEncoder(Fitted.load(tmp_path / "model"))
    assert "title_text" not in encoder.fields and "review_text" not in encoder.fields  # looked up, not sent
    batch, oov = encoder.encode([{"user_id": 1, "item_id": "a"}, {"user_id": 2, "item_id": "zither"}])
    a = store.vocabulary("item_id").filter(pl.col("value") == "a")["index"][0]
    np.testing.assert_array_equal(batch.embeddings["title_text"][0].numpy(), store.vectors_by_vocab("title_text")[a])
    assert not batch.embeddings["title_text"][1].any()  # an unseen item has no content: zero, counted
    assert oov["title_text"] == 1 and oov["item_id"] == 1
