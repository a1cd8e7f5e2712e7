"""Data sources: each reader on tiny files written in the original formats, the synthetic log,
downloads with hash checks, the dispatcher; the public copies where RECFORGE_DATA has them."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from recforge.data.schema import Kind
from recforge.data.sources import RawDataset, SOURCES, load_source
from recforge.data.sources import _download, amazon_sequential, movielens, synthetic
from recforge.data.sources._download import Remote, dataset_dir, fetch
from recforge.errors import DataError

# --- tiny originals ---------------------------------------------------------------------------
ML1M_RATINGS = (
    "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n2::30::1::978300275\n"
)
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"
ML1M_MOVIES = (
    "10::Toy Story (1995)::Animation|Children's|Comedy\n"
    "20::Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)::Drama\n"
    "30::Café au lait (1993)::Comedy|Romance\n"  # written ISO-8859-1
)


def _write_ml1m(folder: Path, movies: str = ML1M_MOVIES, ratings: str = ML1M_RATINGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "ml-1m.zip", "w") as z:
        z.writestr("ml-1m/ratings.dat", ratings)
        z.writestr("ml-1m/users.dat", ML1M_USERS)
        z.writestr("ml-1m/movies.dat", movies.encode("latin-1"))
    return folder


def _item_line(item: int, title: str, genres: set[int]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in range(19))
    return f"{item}|{title}|01-Jan-1995||http://us.imdb.com/x|{flags}\n"


def _write_ml100k(folder: Path) -> Path:
    data = folder / "ml-100k"
    data.mkdir(parents=True)
    ratings = "1\t242\t3\t881250949\n2\t242\t5\t891717742\n1\t267\t4\t878887116\n"
    (data / "u.data").write_text(ratings)
    (data / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    items = _item_line(242, "Kolya (1996)", {5}) + _item_line(267, "unknown", {0})
    (data / "u.item").write_bytes(items.encode("latin-1"))
    return folder


BEAUTY = "1 1 2 3\n2 4 1\n3 5 6 7 8 2\n"


# --- MovieLens --------------------------------------------------------------------------------
def test_movielens_1m_columns_labels_genres_years(tmp_path: Path) -> None:
    ds = movielens.load("1m", root=_write_ml1m(tmp_path / "ml"))
    f = ds.frame
    assert f.columns == [
        "user_id", "item_id", "gender", "age", "occupation", "zip", "year", "genres",
        "rating", "timestamp", "click",
    ]  # fmt: skip
    assert f.height == 4
    assert f.schema["user_id"] == pl.Int64 and f.schema["timestamp"] == pl.Int64
    assert f.schema["genres"] == pl.List(pl.String) and f.schema["click"] == pl.Int8
    assert f["click"].to_list() == [1, 0, 1, 0]  # rating >= 4
    assert f["genres"][0].to_list() == ["Animation", "Children's", "Comedy"]
    assert f["year"].to_list() == ["1995", "1995", "1995", "1993"]
    assert f.filter(pl.col("item_id") == 30)["genres"][0].to_list() == ["Comedy", "Romance"]
    assert f.filter(pl.col("user_id") == 2)["zip"][0] == "70072"
    schema = ds.schema
    assert schema.labels == ["click"] and schema.user == "user_id" and schema.time == "timestamp"
    genres = schema.feature("genres")
    assert genres.kind is Kind.SEQUENCE and genres.vocab == "genre" and genres.max_len == 6
    hist = schema.feature("hist_item_id")
    assert hist.timeline == "item_id" and hist.max_len == 50 and hist.vocab == "item_id"
    assert "rating" not in [feat.name for feat in schema.features]
    assert set(schema.raw_columns()) <= set(f.columns)


def test_movielens_threshold_and_no_history(tmp_path: Path) -> None:
    ds = movielens.load("1m", label_threshold=3, history_len=0, root=_write_ml1m(tmp_path))
    assert ds.frame["click"].to_list() == [1, 1, 1, 0]
    assert not ds.schema.histories


def test_movielens_1m_latin1_title_read(tmp_path: Path) -> None:
    # the title itself is not a column; a latin-1 byte must not break the utf-8 reader
    movies = ML1M_MOVIES.replace("Café au lait (1993)", "Cérémonie, La (1995)")
    ds = movielens.load("1m", root=_write_ml1m(tmp_path, movies=movies))
    assert ds.frame.filter(pl.col("item_id") == 30)["year"][0] == "1995"


def test_movielens_bad_rows_are_reported(tmp_path: Path) -> None:
    bad = ML1M_RATINGS + "2::10::4\n"
    with pytest.raises(ValueError, match=r"ratings\.dat, line 5: expected 4 fields"):
        movielens.load("1m", root=_write_ml1m(tmp_path / "a", ratings=bad))
    bad = ML1M_RATINGS + "2::10::four::978300275\n"
    with pytest.raises(ValueError, match=r"line 5: rating 'four'"):
        movielens.load("1m", root=_write_ml1m(tmp_path / "b", ratings=bad))
    unknown_user = ML1M_RATINGS + "9::10::4::978300275\n"
    with pytest.raises(ValueError, match=r"users\.dat: no entry for user_id 9"):
        movielens.load("1m", root=_write_ml1m(tmp_path / "c", ratings=unknown_user))
    with pytest.raises(ValueError, match="unknown MovieLens variant"):
        movielens.load("20m", root=tmp_path)


def test_movielens_100k(tmp_path: Path) -> None:
    ds = movielens.load("100k", root=_write_ml100k(tmp_path))
    f = ds.frame
    assert f.height == 3
    assert f["click"].to_list() == [0, 1, 1]
    assert f["genres"].to_list() == [["Comedy"], ["Comedy"], ["unknown"]]
    assert f["year"].to_list() == ["1996", "1996", "unknown"]
    first = f.row(0, named=True)
    assert first["age"] == "24" and first["occupation"] == "technician"
    assert f.schema == movielens.load("1m", root=_write_ml1m(tmp_path / "1m")).frame.schema


# --- Amazon / LastFM sequences ----------------------------------------------------------------
def test_amazon_sequences_explode_in_order(tmp_path: Path) -> None:
    (tmp_path / "Beauty.txt").write_text(BEAUTY)
    ds = amazon_sequential.load("Beauty", history_len=5, root=tmp_path)
    f = ds.frame
    assert f.columns == ["user_id", "item_id", "position", "click"]
    assert f.height == 3 + 2 + 5
    assert f.filter(pl.col("user_id") == 3)["item_id"].to_list() == [5, 6, 7, 8, 2]
    assert f.filter(pl.col("user_id") == 3)["position"].to_list() == [0, 1, 2, 3, 4]
    assert f["click"].unique().to_list() == [1]
    assert ds.schema.time == "position" and ds.schema.feature("hist_item_id").max_len == 5
    assert amazon_sequential.load("Beauty", history_len=0, root=tmp_path).schema.histories == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "is empty"),
        ("1 2 3\n2\n", "line 2: a user id and at least one item"),
        ("1 2 x\n", "line 1: ids must be integers"),
        ("1 2 3\n2 3\n1 4\n", "line 3: user 1 repeats"),
    ],
)
def test_amazon_bad_files(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "Beauty.txt").write_text(text)
    with pytest.raises(ValueError, match=error):
        amazon_sequential.load("Beauty", root=tmp_path)


def test_amazon_attributes_follow_the_item(tmp_path: Path) -> None:
    (tmp_path / "Beauty.txt").write_text(BEAUTY)
    (tmp_path / "Beauty_item2attributes.json").write_text('{"5": [3, 9], "2": [4]}')
    ds = amazon_sequential.load("Beauty", history_len=5, attributes=True, root=tmp_path)
    user3 = ds.frame.filter(pl.col("user_id") == 3)
    assert user3["attributes"].to_list() == [[3, 9], [], [], [], [4]]  # items 5, 6, 7, 8, 2
    assert ds.schema.feature("attributes").kind is Kind.SEQUENCE


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"5": [3, "x"]}', r"Beauty_item2attributes.json: item '5': expected an integer item id and a list of integer attribute ids, got \[3, 'x'\]"),
        ("{5: }", r"Beauty_item2attributes.json: not valid JSON"),
    ],
)
def test_amazon_bad_attribute_files(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "Beauty.txt").write_text(BEAUTY)
    (tmp_path / "Beauty_item2attributes.json").write_text(text)
    with pytest.raises(ValueError, match=error):
        amazon_sequential.load("Beauty", attributes=True, root=tmp_path)


def test_amazon_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Beauty"):
        amazon_sequential.load("Yelp", root=tmp_path)


# --- synthetic --------------------------------------------------------------------------------
def test_synthetic_deterministic_and_labels_consistent() -> None:
    a = synthetic.generate(n_rows=20_000, seed=3).frame
    b = synthetic.generate(n_rows=20_000, seed=3).frame
    assert a.equals(b)
    assert not a.equals(synthetic.generate(n_rows=20_000, seed=4).frame)
    assert a.filter(pl.col("click") == 0)["conversion"].sum() == 0
    assert (a["p_conversion"] <= a["p_click"]).all()
    assert abs(a["click"].mean() - 0.1) < 0.01
    # strictly increasing times within each user
    assert a.select((pl.col("timestamp").diff().over("user_id") > 0).fill_null(True).all()).item()


def test_synthetic_columns_and_schema() -> None:
    ds = synthetic.generate(n_rows=1_000, n_fields=3, n_numeric=2, n_domains=2, history_len=7)
    f = ds.frame
    assert f.columns == [
        "user_id", "item_id", "domain", "f0", "f1", "f2", "n0", "n1", "timestamp",
        "click", "conversion", "p_click", "p_conversion", "p_cvr", "would_convert",
    ]  # fmt: skip
    assert f.schema["f0"] == pl.Int64 and f.schema["n0"] == pl.Float32
    assert set(f["domain"].unique()) <= {0, 1}
    s = ds.schema
    assert s.labels == ["click", "conversion"] and s.domain == "domain" and s.time == "timestamp"
    assert [x.name for x in s.numeric] == ["n0", "n1"]
    assert s.feature("hist_item_id").max_len == 7
    assert "p_click" not in s.raw_columns()
    assert synthetic.load(n_rows=100, history_len=0).schema.histories == []


def test_synthetic_zipf_skew_and_huge_vocabularies() -> None:
    f = synthetic.generate(n_rows=50_000, field_vocab_sizes=[1000] * 7 + [10_000_000]).frame
    counts = f["f0"].value_counts()["count"].sort(descending=True)
    assert counts[0] > 20 * counts[len(counts) // 2]
    assert f["f0"].value_counts().sort("count")["f0"][-1] == 0  # rank 0 is the most frequent
    assert f["f7"].max() < 10_000_000 and f["f7"].n_unique() > 1000


def test_synthetic_bayes_auc_in_target_band() -> None:
    f = synthetic.generate().frame
    auc_click = roc_auc_score(f["click"].to_numpy(), f["p_click"].to_numpy())
    assert 0.74 < auc_click < 0.82
    auc_conv = roc_auc_score(f["conversion"].to_numpy(), f["p_conversion"].to_numpy())
    assert auc_conv > auc_click  # conversion needs a click first


def test_synthetic_zipf_sampler() -> None:
    ids = synthetic.zipf(np.random.default_rng(0), 5, 1.0, 100_000)
    freq = np.bincount(ids, minlength=5) / len(ids)
    expected = 1 / np.arange(1, 6)
    np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.01)


def test_synthetic_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="field_vocab_sizes"):
        synthetic.generate(n_rows=10, n_fields=2, field_vocab_sizes=[5])
    with pytest.raises(ValueError, match="click_rate"):
        synthetic.generate(n_rows=10, click_rate=1.5)


# --- downloads --------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_checks_sha256(tmp_path: Path) -> None:
    src = tmp_path / "remote.txt"
    src.write_bytes(b"1 1 2\n")
    out = fetch(src.as_uri(), tmp_path / "cache" / "Beauty.txt", _sha(b"1 1 2\n"))
    assert out.read_bytes() == b"1 1 2\n"
    with pytest.raises(ValueError, match=r"sha256 mismatch for Other\.txt"):
        fetch(src.as_uri(), tmp_path / "cache" / "Other.txt", "0" * 64)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["Beauty.txt"]


def test_dataset_dir_prefers_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "movielens-1m").mkdir()
    monkeypatch.setenv("RECFORGE_DATA", str(tmp_path))
    assert dataset_dir("movielens-1m", [movielens.ML_1M]) == tmp_path / "movielens-1m"
    with pytest.raises(DataError, match="RECFORGE_DATA"):
        dataset_dir("nowhere")


def test_dataset_dir_downloads_and_checks_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECFORGE_DATA", raising=False)
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))
    archive = _write_ml100k(tmp_path / "publisher") / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("u.data", "u.user", "u.item"):
            z.write(archive.parent / "ml-100k" / name, f"ml-100k/{name}")
    members = {
        f"ml-100k/{n}": _sha((archive.parent / "ml-100k" / n).read_bytes())
        for n in ("u.data", "u.user", "u.item")
    }
    remote = Remote(url=archive.as_uri(), name="ml-100k.zip", members=members, extract=True)
    folder = dataset_dir("movielens-100k", [remote])
    assert folder == tmp_path / "cache" / "movielens-100k"
    assert not (folder / "ml-100k.zip").exists()
    assert movielens.load("100k", root=folder).frame.height == 3

    wrong = Remote(url=archive.as_uri(), name="ml-100k.zip", members={"ml-100k/u.data": "0" * 64})
    with pytest.raises(ValueError, match=r"sha256 mismatch for ml-100k/u\.data"):
        dataset_dir("other", [wrong])
    assert not (_download.cache_dir("other") / "ml-100k.zip").exists()


# --- dispatcher and user files ----------------------------------------------------------------
def test_load_source_dispatch(tmp_path: Path) -> None:
    (tmp_path / "Beauty.txt").write_text(BEAUTY)
    ds = load_source("amazon-beauty", root=tmp_path, history_len=3)
    assert isinstance(ds, RawDataset) and ds.frame.height == 10
    assert load_source("synthetic", n_rows=500).frame.height == 500
    with pytest.raises(ValueError, match="known: movielens-1m, .*synthetic.*, file"):
        load_source("criteo")
    with pytest.raises(ValueError, match="fixes"):
        load_source("amazon-beauty", name="LastFM", root=tmp_path)
    assert set(SOURCES) >= {"movielens-100k", "amazon-sports", "amazon-toys", "lastfm"}


def test_load_source_file_csv_parquet_and_errors(tmp_path: Path) -> None:
    schema = {
        "features": [{"name": "user_id", "kind": "categorical"}, {"name": "x", "kind": "numeric"}],
        "labels": ["click"],
        "user": "user_id",
    }
    frame = pl.DataFrame({"user_id": ["a", "b"], "x": [0.5, 1.0], "click": [1, 0]})
    frame.write_csv(tmp_path / "t.csv")
    frame.write_parquet(tmp_path / "t.parquet")
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for name in ("t.csv", "t.parquet"):
        ds = load_source("file", path=tmp_path / name, schema=tmp_path / "schema.json")
        assert ds.frame.equals(frame) and ds.schema.user == "user_id"
    assert load_source("file", path=tmp_path / "t.csv", schema=schema).frame.height == 2

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv is empty"):
        load_source("file", path=tmp_path / "empty.csv", schema=schema)
    (tmp_path / "header.csv").write_text("user_id,x,click\n")
    with pytest.raises(ValueError, match=r"header\.csv has no rows"):
        load_source("file", path=tmp_path / "header.csv", schema=schema)
    frame.drop("x").write_csv(tmp_path / "short.csv")
    with pytest.raises(ValueError, match=r"short\.csv lacks the schema's columns \['x'\]"):
        load_source("file", path=tmp_path / "short.csv", schema=schema)


# --- the public copies ------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_movielens_1m(real_data) -> None:
    f = movielens.load("1m", root=real_data("movielens-1m")).frame
    assert f.height == 1_000_209 and f["user_id"].n_unique() == 6040
    assert f["item_id"].n_unique() == 3706 and f["genres"].list.len().max() == 6
    assert f.null_count().sum_horizontal().item() == 0 and (f["year"] != "unknown").all()


@pytest.mark.real_data
def test_real_movielens_100k(real_data) -> None:
    f = movielens.load("100k", root=real_data("movielens-100k")).frame
    assert f.height == 100_000
    assert f["user_id"].n_unique() == 943 and f["item_id"].n_unique() == 1682


@pytest.mark.real_data
def test_real_beauty(real_data) -> None:
    f = amazon_sequential.load("Beauty", root=real_data("amazon-sequential-s3rec")).frame
    assert f.height == 198_502 and f["user_id"].n_unique() == 22_363
    assert f["item_id"].n_unique() == 12_101 and f["position"].min() == 0
