"""Schema, splits, prepare and store on tiny generated tables."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recforge.data.prepare import DataError, prepare
from recforge.data.schema import OOV, Feature, Schema
from recforge.data.sources import RawDataset, load_file
from recforge.data.splits import SplitConfig, assign_splits
from recforge.data.store import Store, last_window
from tests.bad_input.files import SCHEMA, log_rows, write_csv


def make_schema(history: int = 3) -> Schema:
    features = [
        Feature(name="user_id", kind="categorical"),
        Feature(name="item_id", kind="categorical"),
        Feature(name="x", kind="numeric"),
        Feature(name="genres", kind="sequence", max_len=2, vocab="genre"),
    ]
    if history:
        features.append(Feature(name="hist_item_id", kind="sequence", timeline="item_id", max_len=history))
    return Schema(features=features, labels=["click"], user="user_id", time="t")


def make_frame(n_users: int = 30, per_user: int = 12, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    return pl.DataFrame(
        {
            "user_id": np.repeat(np.arange(n_users), per_user),
            "item_id": [f"i{v}" for v in rng.integers(0, 40, n)],
            "t": rng.integers(0, 50, n),  # many ties in time
            "x": rng.normal(3.0, 2.0, n),
            "genres": [[f"g{g}" for g in rng.integers(0, 5, rng.integers(0, 4))] for _ in range(n)],
            "click": rng.integers(0, 2, n),
        }
    )


@pytest.fixture
def store(tmp_path):
    return prepare(RawDataset(make_frame(), make_schema(), "memory"), tmp_path / "store", SplitConfig(seed=1))


def test_vocabularies_fitted_on_train_only(tmp_path):
    frame = make_frame()
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("only_once")).otherwise("item_id").alias("item_id"))
    split = SplitConfig(seed=3)
    codes = assign_splits(frame, make_schema(), split)
    store = prepare(RawDataset(frame, make_schema(), "memory"), tmp_path / "s", split)
    vocab = store.vocabulary("item_id")
    train_items = set(frame.filter(pl.Series(codes == 0))["item_id"])
    assert set(vocab["value"]) == train_items
    assert vocab["index"].min() == 2 and store.schema.vocab_size("item_id") == len(train_items) + 2
    counts = vocab["count"].to_numpy()
    assert np.all(np.diff(counts) <= 0)  # frequent values first
    split_name = ["train", "valid", "test"][codes[5]]
    view = store.split(split_name)
    row = int(np.nonzero(view.row[:] == 5)[0][0])
    expected = OOV if split_name != "train" else int(vocab.filter(pl.col("value") == "only_once")["index"][0])
    assert view.column("item_id")[row] == expected


def test_min_count_maps_rare_values_to_oov(tmp_path):
    schema = make_schema()
    schema.features[1] = Feature(name="item_id", kind="categorical", min_count=12)
    store = prepare(RawDataset(make_frame(), schema, "memory"), tmp_path / "s")
    vocab = store.vocabulary("item_id")
    assert vocab["count"].min() >= 12
    assert (store.split("train").column("item_id") == OOV).any()


def test_integer_domains_survive_the_store_round_trip(tmp_path):
    frame = make_frame().with_columns((pl.col("user_id") % 3).alias("domain"))
    schema = make_schema()
    schema = Schema(features=[*schema.features, Feature(name="domain", kind="categorical")], labels=["click"], user="user_id", time="t", domain="domain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no serializer warning for integer keys
        prepare(RawDataset(frame, schema, "memory"), tmp_path / "s")
    reopened = Store.open(tmp_path / "s").schema
    vocab = Store.open(tmp_path / "s").vocabulary("domain")
    for value, index in zip(vocab["value"], vocab["index"]):
        assert reopened.domain_id(int(value)) == reopened.domain_id(value) == index
    with pytest.raises(DataError, match="has no id"):
        reopened.domain_id(7)


def test_numeric_normalised_with_train_statistics(store):
    x = np.asarray(store.split("train").numeric[:, 0])
    assert abs(x.mean()) < 1e-5 and abs(x.std(ddof=1) - 1) < 1e-4


def test_every_row_lands_in_exactly_one_split(store):
    rows = np.concatenate([np.asarray(store.split(s).row) for s in ("train", "valid", "test")])
    assert np.array_equal(np.sort(rows), np.arange(30 * 12))
    assert len(store.split("train")) == 288


def test_history_holds_only_strictly_earlier_events_of_the_same_user(tmp_path):
    frame = make_frame()
    store = prepare(RawDataset(frame, make_schema(history=50), "memory"), tmp_path / "s")
    items = store.vocabulary("item_id")
    decode = dict(zip(items["index"].to_list(), items["value"].to_list()))
    for split in ("train", "test"):
        view = store.split(split)
        batch = view.take(np.arange(len(view)))
        for i in range(0, len(view), 7):  # reference: a naive scan of the raw table
            raw = frame.row(int(view.row[i]), named=True)
            earlier = frame.with_row_index().filter(
                (pl.col("user_id") == raw["user_id"]) & (pl.col("t") < raw["t"])
            ).sort(["t", "index"])
            expected = [v for v in earlier["item_id"].to_list()][-50:]
            got = [h for h in batch.sequences["hist_item_id"][i].tolist() if h != 0]
            assert [decode.get(h, "<oov>") for h in got] == [
                e if e in set(items["value"]) else "<oov>" for e in expected
            ]



def test_a_list_timeline_gives_each_earlier_event_its_last_tokens(tmp_path):
    frame = make_frame().with_columns(
        query=pl.Series([[f"w{(i * 7 + k) % 9}" for k in range(i % 4)] for i in range(30 * 12)], dtype=pl.List(pl.String))
    )  # 0 to 3 tokens per event; an empty list is an event without a query
    schema = make_schema(history=6)
    schema = Schema(
        features=[*schema.features, Feature(name="query", kind="sequence", max_len=2),
                  Feature(name="hist_query", kind="sequence", timeline="query", max_len=6)],
        labels=schema.labels, user=schema.user, time=schema.time,
    )  # fmt: skip
    store = prepare(RawDataset(frame, schema, "memory"), tmp_path / "s")
    words = store.vocabulary("query")
    decode = dict(zip(words["index"].to_list(), words["value"].to_list()))
    view = store.split("train")
    batch = view.take(np.arange(len(view)))
    assert batch.sequences["hist_query"].shape == (len(view), 6, 2)
    for i in range(0, len(view), 5):  # reference: a naive scan of the raw table
        raw = frame.row(int(view.row[i]), named=True)
        earlier = frame.with_row_index().filter((pl.col("user_id") == raw["user_id"]) & (pl.col("t") < raw["t"])).sort(["t", "index"])
        expected = [[None] * (2 - len(q[-2:])) + q[-2:] for q in earlier["query"].to_list()][-6:]
        expected = [[None, None]] * (6 - len(expected)) + expected
        got = [[decode.get(t, "<oov>") if t else None for t in event] for event in batch.sequences["hist_query"][i].tolist()]
        assert got == [[w if w is None or w in decode.values() else "<oov>" for w in event] for event in expected]
        items = [h for h in batch.sequences["hist_item_id"][i].tolist() if h]
        assert len(items) == min(6, earlier.height)  # the two histories read the same events
    with pytest.raises(ValueError, match="which must be a categorical or list feature"):
        Schema(features=[*schema.features, Feature(name="hist_x", kind="sequence", timeline="x", max_len=3)],
               labels=["click"], user="user_id", time="t")  # fmt: skip

def test_list_sequence_keeps_last_max_len_right_aligned(store):
    view = store.split("train")
    batch = view.take(np.arange(len(view)))
    values, offsets = view.lists["genres"]
    lengths = offsets[1:] - offsets[:-1]
    genres = batch.sequences["genres"]
    assert genres.shape == (len(view), 2)
    assert np.array_equal((genres != 0).sum(1).numpy(), np.minimum(lengths, 2))
    i = int(np.argmax(lengths >= 3))
    assert genres[i].tolist() == values[offsets[i + 1] - 2 : offsets[i + 1]].tolist()


def test_last_window_pads_on_the_left():
    values = np.arange(10) + 100
    out = last_window(values, np.array([0, 2, 5]), np.array([3, 2, 9]), 3)
    assert out.tolist() == [[100, 101, 102], [0, 0, 0], [106, 107, 108]]


def test_batches_cover_each_row_once_and_are_deterministic(store):
    view = store.split("train")
    rows = np.concatenate([b.row.numpy() for b in view.batches(50, shuffle=True, seed=4, epoch=2)])
    assert np.array_equal(np.sort(rows), np.arange(len(view)))
    again = np.concatenate([b.row.numpy() for b in view.batches(50, shuffle=True, seed=4, epoch=2)])
    other_epoch = np.concatenate([b.row.numpy() for b in view.batches(50, shuffle=True, seed=4, epoch=3)])
    assert np.array_equal(rows, again) and not np.array_equal(rows, other_epoch)
    skipped = np.concatenate([b.row.numpy() for b in view.batches(50, shuffle=True, seed=4, epoch=2, start=2)])
    assert np.array_equal(skipped, rows[100:])


def test_ranks_get_disjoint_equal_shards(store):
    view = store.split("train")
    shards = [[b.row.numpy() for b in view.batches(32, shuffle=True, rank=r, world_size=2)] for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == view.num_batches(32, world_size=2)
    assert not set(np.concatenate(shards[0])) & set(np.concatenate(shards[1]))


def test_batch_dtypes_and_group(store):
    batch = next(store.split("valid").batches(16))
    assert batch.categorical.dtype == batch.sequences["hist_item_id"].dtype == np.int64 or str(batch.categorical.dtype) == "torch.int64"
    assert str(batch.numeric.dtype) == "torch.float32" and str(batch.labels["click"].dtype) == "torch.float32"
    assert batch.group.tolist() == batch.categorical[:, 0].tolist()


def test_pretrained_vectors_are_looked_up_by_key_even_for_unseen_ids(tmp_path):
    frame = make_frame().with_columns(
        pl.concat_list(pl.col("item_id").str.slice(1).cast(pl.Float32), pl.lit(1.0, pl.Float32)).alias("item_vec")
    )
    schema = make_schema()
    schema.features.append(Feature(name="item_vec", kind="embedding", key="item_id", dim=2))
    store = prepare(RawDataset(frame, Schema.model_validate(schema.model_dump()), "memory"), tmp_path / "s")
    for split in ("train", "test"):
        view = store.split(split)
        batch = view.take(np.arange(len(view)))
        raw_items = frame["item_id"].gather(view.row[:]).str.slice(1).cast(pl.Float32).to_numpy()
        assert np.array_equal(batch.embeddings["item_vec"][:, 0].numpy(), raw_items)


def test_splits_random_temporal_leave_one_out():
    frame = make_frame()
    schema = make_schema()
    random = assign_splits(frame, schema, SplitConfig(ratios=(0.5, 0.25, 0.25), seed=0))
    assert np.bincount(random).tolist() == [180, 90, 90]
    temporal = assign_splits(frame, schema, SplitConfig(kind="temporal"))
    t = frame["t"].to_numpy()
    assert t[temporal == 0].max() < t[temporal == 1].min() and t[temporal == 1].max() < t[temporal == 2].min()
    loo = assign_splits(frame, schema, SplitConfig(kind="leave_one_out"))
    per_user = frame.with_columns(pl.Series("s", loo)).group_by("user_id").agg(
        (pl.col("s") == 2).sum().alias("test"), (pl.col("s") == 1).sum().alias("valid"),
        pl.col("t").filter(pl.col("s") == 2).first().alias("t_test"), pl.col("t").max().alias("t_max"),
    )
    assert (per_user["test"] == 1).all() and (per_user["valid"] == 1).all()
    assert (per_user["t_test"] == per_user["t_max"]).all()


# --- bad input -----------------------------------------------------------------------------


def raw_with(frame: pl.DataFrame, schema: Schema | None = None) -> RawDataset:
    return RawDataset(frame, schema or make_schema(), "events.csv")


def test_missing_column_is_named(tmp_path):
    with pytest.raises(DataError, match=r"events.csv: missing column\(s\) \['x'\]"):
        prepare(raw_with(make_frame().drop("x")), tmp_path / "s")


def test_float_ids_are_rejected(tmp_path):
    frame = make_frame().with_columns(pl.col("user_id").cast(pl.Float64))
    with pytest.raises(DataError, match="events.csv: categorical column 'user_id' has dtype Float64"):
        prepare(raw_with(frame), tmp_path / "s")


def test_missing_categorical_value_names_row(tmp_path):
    frame = make_frame().with_columns(pl.when(pl.int_range(pl.len()) == 17).then(None).otherwise(pl.col("item_id")).alias("item_id"))
    with pytest.raises(DataError, match="events.csv: column 'item_id', line 19: missing value"):
        prepare(raw_with(frame), tmp_path / "s")
    with pytest.raises(DataError, match="memory: column 'item_id', row 18: missing value"):
        prepare(RawDataset(frame, make_schema(), "memory"), tmp_path / "s")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numeric_names_line(tmp_path, value):
    frame = make_frame().with_columns(pl.when(pl.int_range(pl.len()) == 9).then(value).otherwise(pl.col("x")).alias("x"))
    with pytest.raises(DataError, match=f"events.csv: column 'x', line 11: {value} is not a finite number"):
        prepare(raw_with(frame), tmp_path / "s")


def test_text_in_numeric_column_is_rejected(tmp_path):
    frame = make_frame().with_columns(pl.col("x").cast(pl.String))
    with pytest.raises(DataError, match="numeric column 'x' has dtype String"):
        prepare(raw_with(frame), tmp_path / "s")


def test_label_outside_0_1_names_row(tmp_path):
    frame = make_frame().with_columns(pl.when(pl.int_range(pl.len()) == 4).then(2).otherwise(pl.col("click")).alias("click"))
    with pytest.raises(DataError, match="events.csv: label column 'click', line 6: value 2 is not 0 or 1"):
        prepare(raw_with(frame), tmp_path / "s")


def test_sequence_that_is_not_a_list(tmp_path):
    frame = make_frame().with_columns(pl.col("genres").list.join("|"))
    with pytest.raises(DataError, match="sequence column 'genres' must be a list column, got String"):
        prepare(raw_with(frame), tmp_path / "s")


def test_empty_table(tmp_path):
    with pytest.raises(DataError, match="events.csv: the table is empty"):
        prepare(raw_with(make_frame().head(0)), tmp_path / "s")


def test_schema_rejects_inconsistent_declarations():
    with pytest.raises(ValueError, match="needs max_len"):
        Feature(name="s", kind="sequence")
    with pytest.raises(ValueError, match="must be a categorical or list feature"):
        Schema(features=[Feature(name="h", kind="sequence", timeline="nope", max_len=2)], labels=["y"], user="u", time="t")
    with pytest.raises(ValueError, match="duplicate feature names"):
        Schema(features=[Feature(name="a", kind="numeric")] * 2, labels=["y"])
    with pytest.raises(ValueError, match="Extra inputs"):
        Feature(name="a", kind="numeric", colour="red")


# --- user files: read by their schema ------------------------------------------------------------


def user_log(tmp_path, rows: list[dict], schema: dict = SCHEMA) -> Path:
    write_csv(tmp_path / "log.csv", rows)
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    return tmp_path / "log.csv"


def test_ids_and_numbers_that_change_form_late_are_read_by_the_schema(tmp_path):
    rows = log_rows()
    for i, row in enumerate(rows):
        row["zip"] = f"{i % 30:03d}" if i // 30 % 2 else str(i % 30)  # "007" and "7" are two zip codes
        row["price"] = 3.5 if i == 550 else int(row["price"])  # whole numbers, then a fraction
    rows[500]["item_id"] = "i7"  # integers, then text
    path = user_log(tmp_path, rows)
    raw = load_file(path, tmp_path / "schema.json")
    assert raw.inputs == (path, tmp_path / "schema.json")
    assert dict(raw.frame.schema) == {"user_id": pl.String, "item_id": pl.String, "zip": pl.String, "price": pl.Float64, "click": pl.Int64}
    assert raw.frame["zip"].n_unique() == 60 and {"007", "7"} <= set(raw.frame["zip"])
    assert raw.frame["price"][550] == 3.5 and raw.frame["item_id"][500] == "i7"
    store = prepare(raw, tmp_path / "s", SplitConfig(seed=0))
    zips = store.vocabulary("zip")["value"].to_list()
    assert len(zips) == 60 and "007" in zips and "7" in zips
    assert sum(len(store.split(s)) for s in ("train", "valid", "test")) == len(rows)


def test_integer_ids_and_time_when_the_schema_says_so(tmp_path):
    schema = {**SCHEMA, "time": "t", "features": [{**f, "dtype": "integer"} if f["name"] == "zip" else f for f in SCHEMA["features"]]}
    rows = [{**row, "t": i} for i, row in enumerate(log_rows(40))]
    raw = load_file(user_log(tmp_path, rows, schema), schema)
    assert raw.inputs == (tmp_path / "log.csv",)
    assert raw.frame["zip"].dtype == pl.Int64 and raw.frame["zip"].n_unique() == 7  # "07" is 7
    assert raw.frame["t"].dtype == pl.Int64
    rows[3]["t"] = "2024-01-01"
    with pytest.raises(DataError, match=r"log\.csv: column 't', line 5: '2024-01-01' is not a number"):
        load_file(user_log(tmp_path, rows, schema), schema)


def test_line_numbers_count_fields_that_span_lines(tmp_path):
    text = 'user_id,item_id,zip,price,click\n"a\nb",1,07,2.5,1\n"c",2,07,2.5,1\nd,3,07,x,0\n\n\n'
    (tmp_path / "log.csv").write_text(text)
    with pytest.raises(DataError, match=r"log\.csv: column 'price', line 5: 'x' is not a number"):
        load_file(tmp_path / "log.csv", SCHEMA)
    (tmp_path / "log.csv").write_text(text.replace(",x,", ",3,"))  # blank lines that end the file are ignored
    assert load_file(tmp_path / "log.csv", SCHEMA).frame["user_id"].to_list() == ["a\nb", "c", "d"]


def test_parquet_ids_become_text_unless_declared_integer(tmp_path):
    frame = pl.DataFrame({"user_id": [1, 2], "item_id": [3.0, 4.0], "zip": ["07", "7"], "price": [1, 2], "click": [0, 1]})
    frame.write_parquet(tmp_path / "log.parquet")
    raw = load_file(tmp_path / "log.parquet", SCHEMA).frame
    assert raw["user_id"].to_list() == ["1", "2"] and raw["item_id"].to_list() == ["3", "4"] and raw["zip"].to_list() == ["07", "7"]
    integer = {**SCHEMA, "features": [{**f, "dtype": "integer"} if f["kind"] == "categorical" else f for f in SCHEMA["features"]]}
    raw = load_file(tmp_path / "log.parquet", integer).frame
    assert raw["user_id"].dtype == raw["item_id"].dtype == raw["zip"].dtype == pl.Int64 and raw["zip"].to_list() == [7, 7]


def test_schema_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps({**SCHEMA, "labels": []}))
    with pytest.raises(DataError, match=r"schema\.json: at least one label is needed"):
        Schema.load(tmp_path / "schema.json")
    with pytest.raises(DataError, match=r"^schema: features\.0\.dtype: unknown dtype 'int'"):
        Schema.parse({"features": [{"name": "a", "kind": "categorical", "dtype": "int"}], "labels": ["y"]})


def test_rows_that_give_one_key_two_vectors_are_refused(tmp_path):
    frame = make_frame().with_columns(
        pl.concat_list(pl.col("item_id").str.slice(1).cast(pl.Float32), pl.lit(1.0, pl.Float32)).alias("item_vec")
    )
    item = frame["item_id"][3]
    first, later = frame.with_row_index().filter(pl.col("item_id") == item)["index"][:2].to_list()  # the key's first two rows
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == later).then(pl.lit([9.0, 9.0], pl.List(pl.Float32))).otherwise(pl.col("item_vec")).alias("item_vec")
    )
    schema = make_schema()
    schema.features.append(Feature(name="item_vec", kind="embedding", key="item_id", dim=2))
    with pytest.raises(DataError, match=rf"memory: embedding column 'item_vec' gives item_id '{item}' different vectors \(row {first + 1} and row {later + 1}\)"):
        prepare(RawDataset(frame, Schema.model_validate(schema.model_dump()), "memory"), tmp_path / "s")


def test_a_history_takes_its_timelines_vocabulary():
    base = [Feature(name="user_id", kind="categorical"), Feature(name="query", kind="sequence", max_len=3, vocab="term")]
    schema = Schema(features=[*base, Feature(name="hist_query", kind="sequence", timeline="query", max_len=4)],
                    labels=["click"], user="user_id", time="t")  # fmt: skip
    assert schema.feature("hist_query").vocab == "term"
    with pytest.raises(ValueError, match="history 'hist_query' has vocab 'x' but its timeline 'query' has 'term'; a history shares"):
        Schema(features=[*base, Feature(name="hist_query", kind="sequence", timeline="query", max_len=4, vocab="x")],
               labels=["click"], user="user_id", time="t")  # fmt: skip
