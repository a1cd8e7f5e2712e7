"""The data of lifelong (query, item) sequences: the JDsearch reader on tiny files written in its
format, MovieLens-1M with pseudo-queries and long histories, the lifelong-sequence simulator and
its truth; the public copies where RECFORGE_DATA has them."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recforge.data.prepare import prepare
from recforge.data.schema import Kind
from recforge.data.sources import check_options, jdsearch, lifelong_simulator, load_source, movielens
from recforge.data.splits import SplitConfig
from recforge.errors import ConfigError, DataError
from recforge.evaluate.metrics import auc


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _encode(store, vocab: str, values: list) -> list[int]:
    table = dict(zip(store.vocabulary(vocab)["value"].to_list(), store.vocabulary(vocab)["index"].to_list()))
    return [table.get(str(v), 1) for v in values]


# --- JDsearch: tiny files in the release format -------------------------------------------------
T = jdsearch.TERM_SEPARATOR
USERS = [  # the 7 fields of each user's line
    [f"1{T}2", "30_10_40", "3.0_0.0_1.0", f"-1_5{T}6_7", "10_20_30", "ORD_CLICK_FLW", "0_12_4_5"],
    ["-1", "20", "0.0", "", "", "", "7"],  # no history: the search is 7 after the user's start
]
PRODUCTS = [  # wid, name, brand_id, brand_name, cate_id_1, cate_name_1, ..., shop_id; item 30 is absent
    ["10", f"8{T}9", "100", "55", "1", "66", "2", "77", "3", "88", "4", "99", "500"],
    ["20", "9", "101", "", "1", "66", "2", "77", "5", "88", "6", "99", "-1"],
    ["40", "", "102", "56", "1", "66", "7", "77", "8", "88", "9", "99", "501"],
]


def _jd(folder: Path, users=USERS, products=PRODUCTS, names=jdsearch.FILES[1], header: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, fields, rows in zip(names, (jdsearch.BEHAVIOUR_FIELDS, jdsearch.PRODUCT_FIELDS), (users, products)):
        lines = ([fields] if header else []) + rows
        (folder / name).write_text("".join("\t".join(line) + "\n" for line in lines))
    return folder


def test_jdsearch_rows_columns_and_schema(tmp_path: Path) -> None:
    ds = jdsearch.load(root=_jd(tmp_path), history_len=10)
    f = ds.frame
    assert f.columns == [
        "user_id", "item_id", "query", "behaviour", "candidate", "time",
        "brand_id", "cate_id_1", "cate_id_2", "cate_id_3", "cate_id_4", "shop_id", "name", "click",
    ]  # fmt: skip
    assert f.schema["query"] == pl.List(pl.Int64) and f.schema["name"] == pl.List(pl.Int64)
    assert f.schema["user_id"] == pl.Int64 and f.schema["click"] == pl.Int8 and f.schema["time"] == pl.Int64
    assert f.select("user_id", "item_id", "query", "behaviour", "candidate", "time", "click").rows() == [
        (2, 10, [], "ORD", 0, 0, 1),  # the user's line number is its id
        (2, 20, [5, 6], "CLICK", 0, 12, 1),
        (2, 30, [7], "FLW", 0, 16, 1),
        (2, 30, [1, 2], "ORD", 1, 21, 1),  # candidates: the test query, at the search's time
        (2, 10, [1, 2], "NONE", 1, 21, 0),
        (2, 40, [1, 2], "CLICK", 1, 21, 1),
        (3, 20, [], "NONE", 1, 7, 0),
    ]
    attributes = f.select("item_id", *jdsearch.ATTRIBUTES, "name").unique("item_id").sort("item_id").rows()
    assert attributes == [
        (10, 100, 1, 2, 3, 4, 500, [8, 9]), (20, 101, 1, 2, 5, 6, -1, [9]),
        (30, -1, -1, -1, -1, -1, -1, []),  # not in the product file
        (40, 102, 1, 7, 8, 9, 501, []),
    ]  # fmt: skip
    schema = ds.schema
    assert schema.user == "user_id" and schema.time == "time" and schema.labels == ["click"]
    assert [c.name for c in schema.categorical] == ["user_id", "item_id", "brand_id", "cate_id_1", "cate_id_2", "cate_id_3", "cate_id_4", "shop_id"]
    assert {(s.name, s.timeline, s.max_len, s.vocab) for s in schema.sequences} == {
        ("query", None, 8, "term"), ("name", None, 64, "term"),
        ("hist_item_id", "item_id", 10, "item_id"), ("hist_query", "query", 10, "term"),
    }  # fmt: skip
    assert "behaviour" not in [x.name for x in schema.features] and "candidate" not in [x.name for x in schema.features]
    assert ds.inputs == (tmp_path / jdsearch.FILES[1][0], tmp_path / jdsearch.FILES[1][1])
    assert not jdsearch.load(root=tmp_path, history_len=0).schema.histories


def test_jdsearch_reads_the_full_release_names_first_and_needs_no_header(tmp_path: Path) -> None:
    _jd(tmp_path)
    _jd(tmp_path, users=USERS[1:], names=jdsearch.FILES[0], header=False)
    ds = jdsearch.load(root=tmp_path)
    assert ds.origin == str(tmp_path / "release_data.txt")
    assert ds.frame.select("user_id", "item_id", "time").rows() == [(1, 20, 7)]
    with pytest.raises(DataError) as err:
        jdsearch.load(root=tmp_path / "none")
    assert str(err.value) == (
        f"JDsearch files not found in {tmp_path / 'none'}: expected release_data.txt and product_data.txt, "
        "or user_behavior_data_sample.txt and product_meta_data_sample.txt"
    )


def _changed(rows: list[list[str]], index: int, field: int, value: str) -> list[list[str]]:
    rows = [list(r) for r in rows]
    rows[index][field] = value
    return rows


# (the user or product at index i is on line i + 2: the header is line 1)
@pytest.mark.parametrize(
    ("index", "field", "value", "problem"),
    [
        (0, 6, "0_12_4_5\textra", "expected 7 tab-separated fields, found 8"),
        (0, 2, "3.0_0.0", "candidate_label_list has 2 labels for 3 candidates in candidate_wid_list"),
        (0, 3, "-1_7", "history_qry_list has 2 entries for 3 behaviours in history_wid_list"),
        (0, 5, "ORD_CLICK", "history_type_list has 2 entries for 3 behaviours in history_wid_list"),
        (0, 6, "0_12_4", "history_time_list has 3 entries; one more than the 3 behaviours of history_wid_list is expected"),
        (1, 6, "", "history_time_list has 0 entries; one more than the 0 behaviours of history_wid_list is expected"),
        (0, 4, "10_2x_30", "history_wid_list: '2x' is not an integer id"),
        (1, 1, "4.5", "candidate_wid_list: '4.5' is not an integer id"),
        (0, 3, f"-1_5{T}six_7", "history_qry_list: 'six' is not a term id"),
        (1, 0, f"1{T}", "query: '' is not a term id"),
        (1, 2, "0.5", "candidate_label_list: '0.5' is not a label (0, 1, 2 or 3)"),
        (0, 5, "ORD_VIEW_FLW", "history_type_list: 'VIEW' is not one of ORD, CLICK, CART, FLW"),
        (0, 6, "0_12_-4_5", "history_time_list: '-4' is not a time interval (a whole number >= 0)"),
    ],
)
def test_jdsearch_bad_behaviour_lines(tmp_path: Path, index: int, field: int, value: str, problem: str) -> None:
    _jd(tmp_path, users=_changed(USERS, index, field, value))
    with pytest.raises(DataError) as err:
        jdsearch.load(root=tmp_path)
    assert str(err.value) == f"{tmp_path / 'user_behavior_data_sample.txt'}, line {index + 2}: {problem}"


@pytest.mark.parametrize(
    ("index", "field", "value", "problem"),
    [
        (1, 12, "-1\t7", "expected 13 tab-separated fields, found 14"),
        (0, 2, "b7", "brand_id: 'b7' is not an integer id"),
        (2, 12, "", "shop_id: '' is not an integer id"),
        (0, 1, f"8{T}x", "name: 'x' is not an integer id"),
        (2, 0, "10", "wid 10 is listed again (first on line 2)"),
    ],
)
def test_jdsearch_bad_product_lines(tmp_path: Path, index: int, field: int, value: str, problem: str) -> None:
    _jd(tmp_path, products=_changed(PRODUCTS, index, field, value))
    with pytest.raises(DataError) as err:
        jdsearch.load(root=tmp_path)
    assert str(err.value) == f"{tmp_path / 'product_meta_data_sample.txt'}, line {index + 2}: {problem}"


def test_jdsearch_bad_options_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^query_len must be >= 1, got 0$"):
        jdsearch.load(root=_jd(tmp_path), query_len=0)
    (tmp_path / "user_behavior_data_sample.txt").write_text("\t".join(jdsearch.BEHAVIOUR_FIELDS) + "\n")
    with pytest.raises(DataError) as err:
        jdsearch.load(root=tmp_path)
    assert str(err.value) == f"{tmp_path / 'user_behavior_data_sample.txt'} has no lines after its header"


def test_jdsearch_candidates_see_the_whole_history_with_its_queries(tmp_path: Path) -> None:
    raw = load_source("jdsearch", root=_jd(tmp_path), history_len=4, query_len=2)
    store = prepare(raw, tmp_path / "store", SplitConfig(ratios=(1.0, 0.0, 0.0)))
    view = store.split("train")
    batch = view.take(np.arange(len(view)))
    assert batch.sequences["hist_query"].shape == (len(view), 4, 2)
    by_row = {int(r): i for i, r in enumerate(view.row)}
    candidate = by_row[4]  # user 2's second candidate: its history is the user's three behaviours
    assert batch.sequences["hist_item_id"][candidate].tolist() == [0, *_encode(store, "item_id", [10, 20, 30])]
    terms = _encode(store, "term", [5, 6, 7])
    assert batch.sequences["hist_query"][candidate].tolist() == [[0, 0], [0, 0], terms[:2], [0, terms[2]]]
    assert batch.sequences["hist_item_id"][by_row[1]].tolist() == [0, 0, 0, _encode(store, "item_id", [10])[0]]
    assert not batch.sequences["hist_item_id"][by_row[6]].any()  # user 3 has no history


# --- MovieLens-1M with pseudo-queries -------------------------------------------------------------
MOVIES = (
    "10::Usual Suspects, The (1995)::Crime|Thriller\n"
    "20::Children's Hour, The (1961)::Drama\n"
    "30::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
)
USERS_DAT = "1::F::1::10::48067\n2::M::56::16::70072\n"


def _ml1m(folder: Path, ratings: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "ml-1m.zip", "w") as z:
        z.writestr("ml-1m/ratings.dat", ratings)
        z.writestr("ml-1m/users.dat", USERS_DAT)
        z.writestr("ml-1m/movies.dat", MOVIES.encode("latin-1"))
    return folder


RATINGS = "1::10::5::978300760\n1::30::3::978302109\n1::20::4::978302200\n2::30::4::978301968\n"


def test_movielens_query_words_are_the_first_title_words(tmp_path: Path) -> None:
    ds = movielens.load("1m", root=_ml1m(tmp_path, RATINGS), history_len=7, query_words=4)
    f = ds.frame
    assert f.columns[-4:] == ["query", "rating", "timestamp", "click"] and f.schema["query"] == pl.List(pl.String)
    assert f["query"].to_list() == [
        ["the", "usual", "suspects"], ["star", "wars", "episode", "iv"], ["the", "children's", "hour"], ["star", "wars", "episode", "iv"],
    ]  # fmt: skip
    query, hist = ds.schema.feature("query"), ds.schema.feature("hist_query")
    assert (query.kind, query.max_len, query.timeline) == (Kind.SEQUENCE, 4, None)
    assert (hist.timeline, hist.max_len, hist.vocab) == ("query", 7, "query")
    assert ds.schema.feature("hist_item_id").max_len == 7
    assert movielens.load("1m", root=tmp_path, query_words=2, history_len=0).schema.histories == []
    assert "query" not in movielens.load("1m", root=tmp_path).frame.columns
    with pytest.raises(DataError, match="^query_words must be >= 0, got -1$"):
        movielens.load("1m", root=tmp_path, query_words=-1)
    with pytest.raises(DataError, match="^query_words needs MovieLens variant '1m', not '100k'$"):
        movielens.load("100k", root=tmp_path, query_words=5)


def test_movielens_query_history_holds_the_earlier_ratings_queries(tmp_path: Path) -> None:
    raw = movielens.load("1m", root=_ml1m(tmp_path, RATINGS), history_len=3, query_words=2)
    store = prepare(raw, tmp_path / "store", SplitConfig(ratios=(1.0, 0.0, 0.0)))
    view = store.split("train")
    batch = view.take(np.arange(len(view)))
    last = int(np.flatnonzero(view.row == 2)[0])  # user 1's third rating
    words = _encode(store, "query", ["the", "usual", "star", "wars"])
    assert batch.sequences["hist_query"][last].tolist() == [[0, 0], words[:2], words[2:]]
    assert batch.sequences["query"][last].tolist() == _encode(store, "query", ["the", "children's"])


def test_a_history_of_2000_keeps_the_store_linear_in_events(tmp_path: Path) -> None:
    # 2 users x 2,400 ratings: the histories are views into one timeline, never N x L copies
    n = 2400
    times = 978_300_000 + np.arange(n)
    ratings = "".join(f"{u}::{(10, 20, 30)[i % 3]}::{1 + i % 5}::{t}\n" for u in (1, 2) for i, t in enumerate(times))
    raw = movielens.load("1m", root=_ml1m(tmp_path, ratings), history_len=2000, query_words=5)
    store = prepare(raw, tmp_path / "store", SplitConfig(ratios=(1.0, 0.0, 0.0)))
    rows, length = raw.frame.height, 2000
    assert _store_bytes(tmp_path / "store") < 200 * rows  # about 120 bytes a row; N x L int32 would be 8,000
    view = store.split("train")
    late = np.flatnonzero(view.row >= rows - 5)  # user 2's last ratings: 2,395+ earlier events
    batch = view.take(late)
    assert batch.sequences["hist_item_id"].shape == (5, length) and batch.sequences["hist_query"].shape == (5, length, 5)
    assert bool((batch.sequences["hist_item_id"] != 0).all()) and bool((batch.sequences["hist_query"] != 0).any(-1).all())


# --- the lifelong-sequence simulator ----------------------------------------------------------------
SMALL = dict(n_users=40, min_events=16, max_events=3000, n_items=2000, n_clusters=40, history_len=400)


@pytest.fixture(scope="module")
def simulated():
    return lifelong_simulator.generate(**SMALL, seed=3)


def test_simulator_is_deterministic_per_seed(simulated) -> None:
    again = lifelong_simulator.generate(**SMALL, seed=3).frame
    assert again.equals(simulated.frame)
    other = lifelong_simulator.generate(**SMALL, seed=4).frame
    assert not (other.height == again.height and other["item_id"].equals(again["item_id"]))


def test_simulator_columns_schema_and_queries(simulated) -> None:
    f = simulated.frame
    assert f.columns == ["user_id", "item_id", "query", "timestamp", "click", *lifelong_simulator.EVALUATION_COLUMNS]
    features = {x.name for x in simulated.schema.features}
    assert features == {"user_id", "item_id", "query", "hist_item_id", "hist_query"}
    assert not features & set(lifelong_simulator.EVALUATION_COLUMNS)
    lengths = f.group_by("user_id").len()["len"]
    assert lengths.min() >= 16 and lengths.max() <= 3000 and lengths.n_unique() > 30
    assert f.select((pl.col("timestamp").diff().over("user_id") > 0).all()).item()  # strictly increasing per user
    assert f["user_id"].is_sorted()
    searches = f.filter(pl.col("query").list.len() > 0)
    assert abs(searches.height / f.height - 0.3) < 0.02 and searches["query"].list.len().max() == lifelong_simulator.QUERY_LEN
    assert searches.explode("query").select((pl.col("query") // 8 == pl.col("cluster")).all()).item()  # 8 tokens per cluster
    assert f["item_id"].n_unique() > 1900 and f["related_cluster"].n_unique() == 40
    pairs = f.select("cluster", "related_cluster").unique()
    assert pairs.join(pairs, left_on=["cluster", "related_cluster"], right_on=["related_cluster", "cluster"]).height == 40


def test_simulator_clicks_follow_the_planted_rule(simulated) -> None:
    f = simulated.frame
    # the click depends on the relevant events and the item only
    logit = np.log(f["p_click"] / (1 - f["p_click"])) - np.log1p(f["n_same"]) - 0.5 * np.log1p(f["n_related"])
    assert f.with_columns(logit=logit).group_by("item_id").agg(pl.col("logit").std())["logit"].fill_null(0).max() < 1e-9
    # the truth beats each item's click rate (fitted on the other users) by a wide margin
    fit = f.filter(pl.col("user_id") % 2 == 0).group_by("item_id").agg(((pl.col("click").sum() + 1) / (pl.len() + 10)).alias("ctr"))
    test = f.filter(pl.col("user_id") % 2 == 1).join(fit, on="item_id", how="left").with_columns(pl.col("ctr").fill_null(0.1))
    bayes = auc(test["click"].to_numpy(), test["p_click"].to_numpy())
    assert bayes > 0.75 and bayes > auc(test["click"].to_numpy(), test["ctr"].to_numpy()) + 0.15  # 0.78 against 0.56
    assert abs(f["click"].mean() - 0.1) < 0.01


def test_simulator_relevant_events_are_earlier_events_of_the_same_user(simulated) -> None:
    f, length = simulated.frame, SMALL["history_len"]
    rows = np.arange(f.height)
    mask = lifelong_simulator.relevance_mask(f, rows, length)
    assert np.array_equal(mask.sum(1), (f["n_same"] + f["n_related"]).to_numpy())
    target, slot = np.nonzero(mask)
    event = target - length + slot
    user, time, cluster = (f[c].to_numpy() for c in ("user_id", "timestamp", "cluster"))
    assert (event >= 0).all() and (user[event] == user[target]).all() and (time[event] < time[target]).all()
    related = f["related_cluster"].to_numpy()
    assert (cluster[event] == cluster[target]).sum() == f["n_same"].sum()
    assert ((cluster[event] == cluster[target]) | (cluster[event] == related[target])).all()
    for r in (0, 5, f.height // 2, f.height - 1):  # against a naive scan
        earlier = f.with_row_index().filter((pl.col("user_id") == user[r]) & (pl.col("index") < r)).tail(length)
        expected = earlier.filter(pl.col("cluster").is_in([cluster[r], related[r]]))["index"].to_list()
        assert (r - length + np.flatnonzero(mask[r])).tolist() == expected


def test_simulator_relevant_fraction_sets_the_share_of_relevant_history() -> None:
    # one interest per user: its events (in the interest's pair of clusters) are relevant to each other
    f = lifelong_simulator.generate(n_users=30, min_events=1500, max_events=1500, n_items=1000, n_clusters=50,
                                    interests_per_user=1, relevant_fraction=0.3, history_len=500, seed=1).frame  # fmt: skip
    f = f.with_columns(pair=pl.min_horizontal("cluster", "related_cluster"), position=pl.int_range(pl.len()).over("user_id"))
    interest = f.group_by("user_id").agg(pl.col("pair").mode().first().alias("interest"))
    late = f.join(interest, on="user_id").filter((pl.col("pair") == pl.col("interest")) & (pl.col("position") >= 500))
    share = ((late["n_same"] + late["n_related"]) / 500).mean()
    assert abs(share - (0.3 + 0.7 * 2 / 50)) < 0.02


def test_simulator_history_never_holds_the_target_or_a_later_event(simulated, tmp_path: Path) -> None:
    store = prepare(simulated, tmp_path / "store", SplitConfig(kind="leave_one_out"))
    f, length = simulated.frame, SMALL["history_len"]
    items = np.array(_encode(store, "item_id", f["item_id"].to_list()))
    for split in ("train", "test"):
        view = store.split(split)
        rows = np.arange(0, len(view), max(1, len(view) // 300))
        batch = view.take(rows)
        raw = view.row[rows]
        events = raw[:, None] - length + np.arange(length)
        first = np.searchsorted(f["user_id"].to_numpy(), f["user_id"].to_numpy()[raw])
        expected = np.where(events >= first[:, None], items[np.clip(events, 0, None)], 0)
        assert np.array_equal(batch.sequences["hist_item_id"].numpy(), expected)  # slot j holds row r - L + j
        tokens = batch.sequences["hist_query"].numpy()
        assert tokens.shape == (len(rows), length, lifelong_simulator.QUERY_LEN)
        assert np.array_equal((tokens != 0).any(-1), (expected != 0) & (f["query"].list.len().to_numpy()[np.clip(events, 0, None)] > 0))


def test_simulator_prepares_a_16k_event_user_in_bounded_memory(tmp_path: Path) -> None:
    length = 16_384
    raw = lifelong_simulator.generate(n_users=1, min_events=length, max_events=length, n_items=2000, n_clusters=40, history_len=length)
    assert raw.frame.height == length
    tracemalloc.start()
    store = prepare(raw, tmp_path / "store", SplitConfig(kind="leave_one_out"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20  # N x L int32 would be 1 GiB
    assert _store_bytes(tmp_path / "store") < length * length * 4 / 200
    test = store.split("test")
    batch = test.take(np.arange(len(test)))
    assert batch.sequences["hist_item_id"].shape == (1, length) and int((batch.sequences["hist_item_id"] != 0).sum()) == length - 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_clusters": 41}, r"^n_clusters must be even, >= 2 and <= n_items \(2000\), got 41$"),
        ({"n_clusters": 4000}, r"^n_clusters must be even, >= 2 and <= n_items \(2000\), got 4000$"),
        ({"relevant_fraction": 0.3, "interests_per_user": 8}, r"^relevant_fraction must lie in \(0, 0\.2222\] for 8 interests, got 0\.3$"),
        ({"max_events": 10}, r"^max_events \(10\) must be >= min_events \(16\)$"),
        ({"history_len": 0}, r"^history_len must be >= 1, got 0$"),
        ({"search_fraction": 1.5}, r"^search_fraction must lie in \[0, 1\] and click_rate in \(0, 1\)$"),
    ],
)
def test_simulator_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        lifelong_simulator.generate(**(SMALL | options))


def test_sources_are_registered(tmp_path: Path) -> None:
    assert load_source("lifelong-simulator", **SMALL).frame.height > 0
    assert load_source("jdsearch", root=_jd(tmp_path)).frame.height == 7
    with pytest.raises(ConfigError, match="unknown option 'n_user' for source 'lifelong-simulator' \\(did you mean 'n_users'\\?\\)"):
        check_options("lifelong-simulator", {"n_user": 3})


# --- the public copies ------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_jdsearch_sample(real_data, tmp_path: Path) -> None:
    root = real_data("jdsearch-sample")
    f = jdsearch.load(root=root).frame
    sizes = f.group_by("user_id", "candidate", maintain_order=True).len().rows()
    assert sizes == [(2, 0, 182), (2, 1, 90), (3, 0, 46), (3, 1, 89), (4, 0, 2), (4, 1, 83)]
    assert jdsearch.read_products(root / "product_meta_data_sample.txt").height == 409
    assert int((f["brand_id"] == -1).sum()) == 15 and int(f["click"].sum()) == 230 + 5
    assert f.filter(pl.col("user_id") == 4)["time"].unique(maintain_order=True).to_list() == [0, 27, 49687]
    assert f.filter(pl.col("candidate") == 0)["query"].list.len().gt(0).sum() == 230 - 129  # 129 behaviours without a query
    assert f["query"].list.len().max() == 7 and f["name"].list.len().max() == 50
    store = prepare(jdsearch.load(root=root), tmp_path / "store")
    batch = store.split("train").take(np.arange(8))
    assert batch.sequences["hist_query"].shape == (8, 200, 8)


@pytest.mark.real_data
def test_real_movielens_1m_queries_and_lifelong_histories(real_data) -> None:
    f = movielens.load("1m", root=real_data("movielens-1m"), query_words=5, history_len=2314).frame
    queries = dict(f.unique("item_id").select("item_id", "query").iter_rows())
    assert queries[1] == ["toy", "story"] and queries[50] == ["the", "usual", "suspects"]
    assert queries[260] == ["star", "wars", "episode", "iv", "a"]
    assert f["query"].list.len().min() >= 1 and f["query"].list.len().max() == 5
    assert f.group_by("user_id").len()["len"].max() == 2314
