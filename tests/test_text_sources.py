"""The data sources that give items text: MovieLens-1M with MeLU's plots and credits (and its
cold-start variant), Amazon Musical Instruments reviews. Tiny files written in each format, then
the public copies where RECFORGE_DATA has them."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recforge.data import content
from recforge.data.inputs import reading
from recforge.data.prepare import prepare
from recforge.data.schema import Kind
from recforge.data.sources import SOURCES, check_options, load_source
from recforge.data.sources import amazon_reviews, movielens
from recforge.data.splits import SplitConfig, assign_splits
from recforge.errors import ConfigError, DataError

# --- tiny MovieLens-1M and extras files -------------------------------------------------------
RATINGS = "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n2::30::1::978300275\n"
USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"
MOVIES = (
    "10::Usual Suspects, The (1995)::Crime|Thriller\n"
    "20::Postino, Il (The Postman) (1994)::Comedy|Drama|Romance\n"
    "30::Café au lait (1993)::Comedy\n"  # written ISO-8859-1
)
EXTRA = "{id}::{title}::1995::R::16 Aug 1995::Crime::{director}::W (screenplay)::{actors}::{plot}::http://x/p.jpg"
EXTRAS = "\r\n".join(
    [
        EXTRA.format(id=10, title="The Usual Suspects", director="Bryan Singer", actors="Kevin Spacey, Gabriel Byrne",
                     plot="A sole survivor tells of the twisty events."),
        EXTRA.format(id=20, title="Il Postino", director="Michael Radford, Massimo Troisi(co-director)",
                     actors="Philippe Noiret, Massimo Troisi", plot="N/A"),
    ]
) + "\r\n"  # fmt: skip; movie 30 has no entry


def _ml1m(folder: Path, ratings: str = RATINGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "ml-1m.zip", "w") as z:
        z.writestr("ml-1m/ratings.dat", ratings)
        z.writestr("ml-1m/users.dat", USERS)
        z.writestr("ml-1m/movies.dat", MOVIES.encode("latin-1"))
    return folder


def _extras(folder: Path, text: str | bytes = EXTRAS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    (folder / "movies_extrainfos.dat").write_bytes(data)
    return folder


def test_movielens_text_columns_and_schema(tmp_path: Path) -> None:
    ds = movielens.load("1m", root=_ml1m(tmp_path / "ml"), text=True, extras_root=_extras(tmp_path / "ex"))
    f = ds.frame
    assert f.columns == [
        "user_id", "item_id", "gender", "age", "occupation", "zip", "year", "genres",
        "title", "director", "actors", "plot", "rating", "timestamp", "click",
    ]  # fmt: skip
    assert all(f.schema[c] == pl.String for c in ("title", "director", "actors", "plot"))
    movies = f.unique("item_id").sort("item_id")
    assert movies["title"].to_list() == ["The Usual Suspects", "Il Postino (The Postman)", "Café au lait"]
    assert movies["director"].to_list() == ["Bryan Singer", "Michael Radford, Massimo Troisi", ""]  # role dropped
    assert movies["actors"].to_list() == ["Kevin Spacey, Gabriel Byrne", "Philippe Noiret, Massimo Troisi", ""]
    assert movies["plot"].to_list() == ["A sole survivor tells of the twisty events.", "", ""]  # "N/A", absent
    assert f.null_count().sum_horizontal().item() == 0
    feature = ds.schema.feature("item_text")
    assert feature.kind is Kind.EMBEDDING and feature.key == "item_id" and feature.dim == 384
    assert feature.text == ["title", "year", "genres", "director", "actors", "plot"] and feature.text_from == "key"
    assert set(ds.schema.raw_columns()) <= set(f.columns)
    assert "item_text" not in ds.schema.raw_columns()


def test_movielens_without_text_is_unchanged_and_reads_no_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFORGE_DATA", raising=False)
    root = _ml1m(tmp_path / "ml")
    with reading() as plain:
        ds = movielens.load("1m", root=root)
    assert "title" not in ds.frame.columns and "item_text" not in [f.name for f in ds.schema.features]
    assert ds.schema == movielens.schema(50)
    with reading() as texts:
        movielens.load("1m", root=root, text=True, extras_root=_extras(tmp_path / "ex"))
    assert [p.name for p in plain] == ["ml-1m.zip"]
    assert sorted(p.name for p in texts) == ["ml-1m.zip", "movies_extrainfos.dat"]  # the store notices the extras


def test_movielens_text_needs_1m(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="text needs MovieLens variant '1m'"):
        movielens.load("100k", root=tmp_path, text=True)


@pytest.mark.parametrize(
    ("extras", "message"),
    [
        (EXTRAS + "30::Café au lait::1993\r\n", r"movies_extrainfos\.dat, line 3: expected 11 fields separated by '::', found 3"),
        (EXTRAS.encode() + EXTRA.format(id=30, title="Caf\xe9", director="d", actors="a", plot="p").encode("latin-1"),
         r"movies_extrainfos\.dat, line 3: not UTF-8 text \(byte 0xe9\)"),
        (EXTRAS.replace("20::", "x20::", 1), r"movies_extrainfos\.dat, line 2: MovieID 'x20' is not an integer"),
        (EXTRAS + EXTRAS.split("\r\n")[0], r"movies_extrainfos\.dat, line 3: MovieID 10 appears twice"),
        (EXTRAS.replace("20::", "99::", 1), r"movies_extrainfos\.dat: MovieID 99 is not in .*movies\.dat"),
    ],
)  # fmt: skip
def test_movielens_bad_extras_lines(tmp_path: Path, extras: str | bytes, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        movielens.load("1m", root=_ml1m(tmp_path / "ml"), text=True, extras_root=_extras(tmp_path / "ex", extras))
    assert "\n" not in str(err.value)


def test_movielens_extras_file_missing(tmp_path: Path) -> None:
    (tmp_path / "ex").mkdir()
    with pytest.raises(DataError, match="MovieLens extras file not found"):
        movielens.load("1m", root=_ml1m(tmp_path / "ml"), text=True, extras_root=tmp_path / "ex")


def test_coldstart_text_keeps_people_lists_apart(tmp_path: Path) -> None:
    root, extras = _ml1m(tmp_path / "ml"), _extras(tmp_path / "ex")
    ds = load_source("movielens-1m-coldstart", root=root, extras_root=extras, min_item_ratings=1, extras=["director"], text=True)
    f = ds.frame
    assert f.schema["director"] == pl.List(pl.String) and f.schema["director_text"] == pl.String
    assert f.filter(pl.col("item_id") == 20)["director"][0].to_list() == ["Michael Radford", "Massimo Troisi"]
    assert ds.schema.feature("item_text").text == ["title", "year", "genres", "director_text", "actors_text", "plot"]
    assert set(ds.schema.raw_columns()) <= set(f.columns)
    # the same text as the movielens-1m source gives each movie
    plain = movielens.load("1m", root=root, text=True, extras_root=extras).frame
    columns = ["item_id", "title", "director", "actors", "plot"]
    renamed = f.rename({"director": "people", "director_text": "director", "actors_text": "actors"})
    assert renamed.select(columns).unique().sort("item_id").equals(plain.select(columns).unique().sort("item_id"))
    assert "title" not in load_source("movielens-1m-coldstart", root=root, min_item_ratings=1).frame.columns



def test_coldstart_history_holds_old_movies_only(tmp_path: Path) -> None:
    # movie 10 has 2 ratings (old at history_min_ratings 2), movies 20 and 30 one each (new)
    ratings = "1::20::3::100\n1::10::5::200\n1::30::4::300\n2::10::4::400\n1::10::2::500\n"
    ds = load_source("movielens-1m-coldstart", root=_ml1m(tmp_path / "ml", ratings), min_item_ratings=1, history_len=5, history_min_ratings=3)
    assert ds.schema.feature("hist_item_id").where == {"old_movie": 1}
    assert ds.frame["old_movie"].to_list() == [0, 1, 0, 1, 1]
    store = prepare(ds, tmp_path / "store", SplitConfig(kind="random", ratios=(1.0, 0.0, 0.0)))
    view = store.split("train")
    batch = view.take(np.arange(len(view)))
    vocab = store.vocabulary("item_id")
    name = dict(zip(vocab["index"].to_list(), vocab["value"].to_list()))
    times = ds.frame["timestamp"].to_numpy()[view.row]
    history = {int(t): sorted(int(name[int(v)]) for v in h if v) for t, h in zip(times, batch.sequences["hist_item_id"])}
    # user 1 rated 20 (new), 10 (old), 30 (new) before t=500: only movie 10 is in the history
    assert history == {100: [], 200: [], 300: [10], 400: [], 500: [10]}
    assert "old_movie" not in load_source("movielens-1m-coldstart", root=tmp_path / "ml", min_item_ratings=1).frame.columns

# --- tiny Amazon review files -----------------------------------------------------------------
def _review(user: str, item: str, rating: float, time: int, summary: str | None = "s", text: str | None = "t") -> dict:
    review = {"reviewerID": user, "asin": item, "reviewerName": "n", "helpful": [0, 0], "overall": rating,
              "unixReviewTime": time, "reviewTime": "01 1, 2014"}  # fmt: skip
    if summary is not None:
        review["summary"] = summary
    if text is not None:
        review["reviewText"] = text
    return review


REVIEWS = [
    _review("u1", "i1", 5.0, 300, "Great strings", "They last."),
    _review("u2", "i1", 2.0, 100, "Meh", None),  # no reviewText
    _review("u1", "i2", 4.0, 200, None, "Solid stand."),  # no summary
    _review("u2", "i2", 3.0, 100, "OK", "Fine."),  # same time as u2's other review: item id breaks the tie
]


def _amazon(folder: Path, lines: list[str] | None = None, member: str = "Musical_Instruments.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in REVIEWS] if lines is None else lines
    with zipfile.ZipFile(folder / "Musical_Instruments.zip", "w") as z:
        z.writestr(member, "\n".join(lines) + "\n")
    return folder


def test_amazon_reviews_columns_order_labels_text(tmp_path: Path) -> None:
    ds = load_source("amazon-musical-instruments", root=_amazon(tmp_path))
    f = ds.frame
    assert f.columns == ["user_id", "item_id", "summary", "review_text", "rating", "timestamp", "click"]
    assert f.schema["user_id"] == pl.String and f.schema["rating"] == pl.Int64 and f.schema["click"] == pl.Int8
    assert f.select("user_id", "item_id").rows() == [("u2", "i1"), ("u2", "i2"), ("u1", "i2"), ("u1", "i1")]
    assert f["timestamp"].to_list() == [100, 100, 200, 300]
    assert f["click"].to_list() == [0, 0, 1, 1]  # rating >= 4
    assert f["summary"].to_list() == ["Meh", "OK", "", "Great strings"]
    assert f["review_text"].to_list() == ["", "Fine.", "Solid stand.", "They last."]
    schema = ds.schema
    assert schema.user == "user_id" and schema.time == "timestamp" and schema.labels == ["click"]
    assert schema.feature("hist_item_id").max_len == 50
    item_text = schema.feature("item_text")
    assert item_text.text == ["summary", "review_text"] and item_text.text_from == "fit_rows"
    assert item_text.key == "item_id" and item_text.dim == 384
    assert set(schema.raw_columns()) <= set(f.columns)


def test_amazon_reviews_options(tmp_path: Path) -> None:
    root = _amazon(tmp_path)
    ds = amazon_reviews.load(label_threshold=3, history_len=0, text=False, root=root)
    assert ds.frame.columns == ["user_id", "item_id", "rating", "timestamp", "click"]
    assert [f.name for f in ds.schema.features] == ["user_id", "item_id"]
    assert ds.frame["click"].to_list() == [0, 1, 1, 1]
    with pytest.raises(DataError, match="history_len must be >= 0"):
        amazon_reviews.load(history_len=-1, root=root)
    assert "amazon-musical-instruments" in SOURCES
    with pytest.raises(ConfigError, match="unknown option 'name'"):
        check_options("amazon-musical-instruments", {"name": "Beauty"})


GOOD = json.dumps(REVIEWS[0])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, '{"reviewerID": "u1", "asin": ', GOOD], r"line 2: not valid JSON \(Expecting value, column 30\)"),
        ([GOOD, GOOD, "[1, 2]"], r"line 3: expected a JSON object, found list"),
        ([GOOD, json.dumps({**REVIEWS[0], "overall": "5"})], r"line 2: overall '5' is not a number"),
        ([GOOD, json.dumps({**REVIEWS[0], "summary": ["a"]})], r"line 2: summary \['a'\] is not a string"),
        ([GOOD, json.dumps({k: v for k, v in REVIEWS[0].items() if k != "asin"})], r"line 2: no 'asin'"),
        ([GOOD, json.dumps({**REVIEWS[0], "reviewerID": " "})], r"line 2: reviewerID is empty"),
        ([GOOD, "", json.dumps({**REVIEWS[0], "overall": 6.0})], r"line 3: overall 6\.0 is not a rating from 1 to 5"),
        ([GOOD, json.dumps({**REVIEWS[0], "overall": 4.5})], r"line 2: overall 4\.5 is not a rating"),
        ([json.dumps({**REVIEWS[0], "unixReviewTime": 1.5})], r"line 1: unixReviewTime 1\.5 is not a whole number"),
    ],
)  # fmt: skip
def test_amazon_reviews_bad_lines(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(DataError, match=r"Musical_Instruments\.zip:Musical_Instruments\.json, " + message) as err:
        amazon_reviews.load(root=_amazon(tmp_path, lines))
    assert "\n" not in str(err.value)


def test_amazon_reviews_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "latin"
    folder.mkdir()
    with zipfile.ZipFile(folder / "Musical_Instruments.zip", "w") as z:
        z.writestr("Musical_Instruments.json", (GOOD + "\n" + GOOD.replace("They", "Th\xe9y") + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"Musical_Instruments\.json, line 2: not UTF-8 text"):
        amazon_reviews.load(root=folder)
    with pytest.raises(DataError, match="member Musical_Instruments.json is missing"):
        amazon_reviews.load(root=_amazon(tmp_path / "other", member="Other.json"))
    with pytest.raises(DataError, match=r"Musical_Instruments\.json is empty"):
        amazon_reviews.load(root=_amazon(tmp_path / "empty", ["", "  "]))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "Musical_Instruments.zip").write_text(GOOD)
    with pytest.raises(DataError, match="is not a zip archive"):
        amazon_reviews.load(root=tmp_path / "plain")
    with pytest.raises(DataError, match="archive not found"):
        amazon_reviews.load(root=tmp_path / "nowhere")


# --- the public copies ------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.real_data
def test_real_movielens_1m_text(real_data) -> None:
    root, extras = real_data("movielens-1m"), real_data("movielens-1m-melu-extrainfos")
    assert _sha256(extras / movielens.EXTRAS.name) == movielens.EXTRAS.sha256
    movies = movielens.movie_texts(root / movielens.ML_1M.name, extras / movielens.EXTRAS.name)
    assert movies.height == 3883 and movielens.read_extras(extras / movielens.EXTRAS.name).height == 3881
    assert {c: int((movies[c] != "").sum()) for c in ("director", "actors", "plot")} == {"director": 3869, "actors": 3874, "plot": 3845}
    f = movielens.load("1m", root=root, text=True, extras_root=extras).frame
    assert f.height == 1_000_209 and f.null_count().sum_horizontal().item() == 0
    rated = f.unique("item_id")
    assert rated.height == 3706 and int((rated["plot"] != "").sum()) == 3685
    assert int((f["plot"] != "").sum()) == 999_626
    empty = rated.filter((pl.col("director") == "") & (pl.col("actors") == "") & (pl.col("plot") == ""))
    assert sorted(empty["item_id"].to_list()) == [860, 1795, 3027]
    titles = dict(movies.select("item_id", "title").iter_rows())
    assert titles[1] == "Toy Story" and titles[50] == "The Usual Suspects"
    assert not movies["director"].str.contains(r"[()]").any()


@pytest.mark.real_data
def test_real_musical_instruments(real_data) -> None:
    root = real_data("amazon-musical-instruments-5core")
    assert _sha256(root / amazon_reviews.ARCHIVE.name) == amazon_reviews.ARCHIVE.sha256
    f = load_source("amazon-musical-instruments", root=root).frame
    assert f.height == 10_261 and f["user_id"].n_unique() == 1_429 and f["item_id"].n_unique() == 900
    assert f.group_by("user_id").len()["len"].min() == 5 and f.group_by("item_id").len()["len"].min() == 5
    assert dict(f["rating"].value_counts().iter_rows()) == {5: 6938, 4: 2084, 3: 772, 2: 250, 1: 217}
    assert int(f["click"].sum()) == 9_022 and int((f["review_text"] == "").sum()) == 7
    assert f["timestamp"].is_sorted() and f.null_count().sum_horizontal().item() == 0


@pytest.mark.real_data
def test_real_musical_instruments_item_text_is_made_of_train_reviews_only(real_data, tmp_path, monkeypatch) -> None:
    # the texts, not their vectors, are under test: a stand-in encoder keeps the test fast
    monkeypatch.setattr(content, "sentence_vectors", lambda texts, progress=True: np.ones((len(texts), 384), np.float32))
    raw = load_source("amazon-musical-instruments", root=real_data("amazon-musical-instruments-5core"))
    split = SplitConfig(kind="leave_one_out")
    store = prepare(raw, tmp_path / "store", split)
    texts = store.texts_by_vocab("item_text")
    index = dict(store.vocabulary("item_id").select("value", "index").iter_rows())

    rows = raw.frame.with_columns(
        split=pl.Series(assign_splits(raw.frame, raw.schema, split)),
        text=pl.concat_str(
            [pl.when(pl.col(c).str.strip_chars() != "").then(pl.col(c).str.strip_chars()) for c in ("summary", "review_text")],
            separator=". ", ignore_nulls=True,
        ),
    )  # fmt: skip
    expected = rows.filter((pl.col("split") == 0) & (pl.col("text") != "")).group_by("item_id").agg(pl.col("text").str.join(" | ").str.slice(0, content.MAX_TEXT_CHARS))
    assert expected.height == len(index) == 891  # 9 of the 900 items are reviewed only in valid and test
    for item, text in expected.iter_rows():
        assert texts[index[item]] == text
    held_out = rows.filter((pl.col("split") == 2) & (pl.col("review_text").str.len_chars() >= 40))
    train_texts = set(rows.filter(pl.col("split") == 0)["review_text"].to_list())
    leaked = [
        item for item, review in held_out.select("item_id", "review_text").iter_rows()
        if item in index and review not in train_texts and review in texts[index[item]]
    ]  # fmt: skip
    assert held_out.height > 1000 and leaked == []
