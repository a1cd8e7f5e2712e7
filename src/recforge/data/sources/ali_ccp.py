"""Ali-CCP (Alibaba Click and Conversion Prediction; Ma et al., SIGIR 2018): exposures with click
and purchase labels from Taobao, in either of its two common layouts.

- **raw**, as published on Tianchi: ``sample_skeleton_{part}.csv`` joined with
  ``common_features_{part}.csv``. A skeleton line is
  ``sample_id,click,conversion,common_feature_index,feature_count,feature_list`` and a common
  line ``common_feature_index,feature_count,feature_list``; a feature list holds features
  separated by ``\\x01``, each ``field_id \\x02 feature_id \\x03 value``. The skeleton carries the
  item-side fields, the common row (shared by many exposures) the user-side ones.
- **processed**, the layout of the widely used torch-rechub preprocessing
  (``ali_ccp_{part}.csv`` or ``ali_ccp_{part}_sample.csv``): a header
  ``click,purchase,<23 sparse fields>,<8 dense values>``.

Both give the same columns: the 23 sparse fields (``101`` user, ``205`` item, ... named by
their field id; strings in the raw layout, integers in the processed one), the 8 dense values
``D109_14 ... D853`` (the value of that field's feature; 0 where absent), ``click``,
``conversion`` and ``part`` (the file it came from, not a feature). For a sparse field listed
several times in a row the last feature wins (as in the processed layout); an absent field is
``"0"`` (the processed layout's missing id). Rows with a conversion but no click are
impossible; they are dropped and counted in the dataset's origin.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.sources._download import dataset_dir
from recforge.errors import DataError

SPARSE = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210",
    "216", "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14",
)  # fmt: skip
DENSE = ("109_14", "110_14", "127_14", "150_14", "508", "509", "702", "853")
_SKELETON = ("sample_id", "click", "conversion", "common_feature_index", "feature_count", "feature_list")
_COMMON = ("common_feature_index", "feature_count", "feature_list")


def load(
    root: str | Path | None = None,
    layout: str = "auto",
    parts: tuple[str, ...] | list[str] | None = None,
    max_rows: int | None = None,
) -> RawDataset:
    """Read Ali-CCP from ``root`` (default ``$RECFORGE_DATA/ali-ccp-sample``).

    - ``layout``: "raw", "processed" or "auto" (raw when ``sample_skeleton_train.csv`` exists).
    - ``parts``: which files to read, in order (raw default: train, test; processed default:
      train, val, test); each row's ``part`` says which.
    - ``max_rows``: read at most this many rows of each part (the head of the file).
    """
    base = dataset_dir("ali-ccp-sample", root=root)
    if not base.is_dir():
        raise DataError(f"Ali-CCP folder not found: {base}")
    if layout == "auto":
        layout = "raw" if (base / "sample_skeleton_train.csv").is_file() else "processed"
    if layout == "raw":
        names = list(parts) if parts is not None else ["train", "test"]
        frames = [_read_raw(base, p, max_rows) for p in names]
    elif layout == "processed":
        names = list(parts) if parts is not None else ["train", "val", "test"]
        frames = [_read_processed(base, p, max_rows) for p in names]
    else:
        raise DataError(f"Ali-CCP layout must be 'raw', 'processed' or 'auto', got {layout!r}")
    frame = pl.concat(frames, how="vertical")
    impossible = (pl.col("click") == 0) & (pl.col("conversion") == 1)
    dropped = frame.filter(impossible).height
    frame = frame.filter(~impossible)
    origin = f"{base} ({layout}: {', '.join(names)}; dropped {dropped} rows with a conversion but no click)"
    return RawDataset(frame=frame, schema=schema(), origin=origin)


def schema() -> Schema:
    """The 23 sparse fields (categorical) and 8 dense values (numeric); labels click, conversion."""
    features = [Feature(name=f, kind=Kind.CATEGORICAL) for f in SPARSE]
    features += [Feature(name=f"D{f}", kind=Kind.NUMERIC) for f in DENSE]
    return Schema(features=features, labels=["click", "conversion"], user="101")


def _read_processed(base: Path, part: str, max_rows: int | None) -> pl.DataFrame:
    candidates = [base / f"ali_ccp_{part}.csv", base / f"ali_ccp_{part}_sample.csv"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"Ali-CCP part {part!r} not found: none of {[str(p) for p in candidates]}")
    try:
        frame = pl.read_csv(path, n_rows=max_rows, infer_schema_length=10_000)
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{path} could not be read: {e}") from e
    expected = ["click", "purchase", *SPARSE, *(f"D{f}" for f in DENSE)]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    for column in ["click", "purchase", *SPARSE]:
        if not frame[column].dtype.is_integer():
            row = int(frame[column].cast(pl.Int64, strict=False).is_null().arg_true()[0]) if frame.height else 0
            raise DataError(f"{path}: column {column!r}, data row {row + 1}: not an integer id")
    return frame.select(
        *SPARSE, *(pl.col(f"D{f}").cast(pl.Float32) for f in DENSE),
        pl.col("click").cast(pl.Int8), pl.col("purchase").cast(pl.Int8).alias("conversion"),
        pl.lit(part).alias("part"),
    )  # fmt: skip


def _read_raw(base: Path, part: str, max_rows: int | None) -> pl.DataFrame:
    skeleton = _read_lines(base / f"sample_skeleton_{part}.csv", _SKELETON, max_rows)
    common = _read_lines(base / f"common_features_{part}.csv", _COMMON, None)
    for column in ("click", "conversion"):
        values = skeleton[column].cast(pl.Int8, strict=False)
        bad = values.is_null() | ~values.is_in([0, 1])
        if bad.any():
            line = skeleton["line"][int(bad.arg_true()[0])]
            raise DataError(f"{base / f'sample_skeleton_{part}.csv'}, line {line}: {column} is not 0 or 1")
    item_side = _features(skeleton.select(pl.col("line").alias("key"), "feature_list"), base / f"sample_skeleton_{part}.csv")
    user_side = _features(
        common.select(pl.col("common_feature_index").alias("key"), "feature_list"), base / f"common_features_{part}.csv"
    )
    unknown = skeleton.join(common.select("common_feature_index"), on="common_feature_index", how="anti")
    if unknown.height:
        raise DataError(
            f"{base / f'sample_skeleton_{part}.csv'}, line {unknown['line'][0]}: common_feature_index "
            f"{unknown['common_feature_index'][0]!r} is not in common_features_{part}.csv"
        )
    if common["common_feature_index"].is_duplicated().any():
        dup = common.filter(common["common_feature_index"].is_duplicated())
        raise DataError(f"{base / f'common_features_{part}.csv'}, line {dup['line'][0]}: duplicate common_feature_index")
    users = common.select("common_feature_index", pl.col("common_feature_index").alias("key")).join(
        user_side, on="key", how="left"
    ).drop("key")
    frame = (
        skeleton.select("line", "common_feature_index", pl.col("click").cast(pl.Int8), pl.col("conversion").cast(pl.Int8))
        .join(item_side.rename({"key": "line"}), on="line", how="left")
        .join(users, on="common_feature_index", how="left", suffix="_user")
        .sort("line")
    )
    columns = []
    for f in SPARSE:  # a field is either item-side or user-side; the item side wins if both
        both = [c for c in (f"id_{f}", f"id_{f}_user") if c in frame.columns]
        columns.append(pl.coalesce(*both, pl.lit("0")).alias(f) if both else pl.lit("0").alias(f))
    for f in DENSE:
        both = [c for c in (f"value_{f}", f"value_{f}_user") if c in frame.columns]
        value = pl.coalesce(*both, pl.lit(0.0)) if both else pl.lit(0.0)
        columns.append(value.cast(pl.Float32).alias(f"D{f}"))
    return frame.select(*columns, "click", "conversion", pl.lit(part).alias("part"))


def _read_lines(path: Path, columns: tuple[str, ...], max_rows: int | None) -> pl.DataFrame:
    """Comma-separated lines of a raw file (the feature list has no commas), with line numbers."""
    if not path.is_file():
        raise DataError(f"Ali-CCP file not found: {path}")
    try:
        lines = pl.read_csv(
            path, has_header=False, separator="\x1e", quote_char=None, new_columns=["text"],
            schema_overrides=[pl.String], n_rows=max_rows,
        )  # fmt: skip
    except pl.exceptions.NoDataError:
        raise DataError(f"{path} is empty") from None
    lines = lines.with_row_index("line", offset=1).filter(pl.col("text").str.strip_chars() != "")
    if lines.height == 0:
        raise DataError(f"{path} is empty")
    split = lines.select("line", pl.col("text").str.strip_chars_end("\r").str.split(","))
    bad = split.filter(pl.col("text").list.len() != len(columns))
    if bad.height:
        raise DataError(
            f"{path}, line {bad['line'][0]}: expected {len(columns)} comma-separated fields, found {bad['text'][0].len()}"
        )
    return split.select("line", *(pl.col("text").list.get(i).alias(c) for i, c in enumerate(columns)))


def _features(lists: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Wide table ``key, id_<field>, value_<field>`` from ``key, feature_list`` (last one wins)."""
    long = (
        lists.with_columns(pl.col("feature_list").str.split("\x01"))
        .explode("feature_list")
        .filter(pl.col("feature_list") != "")
        .with_columns(
            pl.col("feature_list").str.split_exact("\x02", 1).struct.rename_fields(["field", "rest"]).alias("parts")
        )
        .unnest("parts")
        .with_columns(pl.col("rest").str.split_exact("\x03", 1).struct.rename_fields(["id", "value"]).alias("parts"))
        .unnest("parts")
    )
    bad = long.filter(pl.col("rest").is_null() | pl.col("value").is_null())
    if bad.height:
        raise DataError(f"{path}: malformed feature {bad['feature_list'][0]!r} (expected field\\x02id\\x03value)")
    value = pl.col("value").cast(pl.Float32, strict=False)
    bad = long.filter(value.is_null())
    if bad.height:
        raise DataError(f"{path}: feature {bad['feature_list'][0]!r} has a non-numeric value")
    kept = long.filter(pl.col("field").is_in(SPARSE)).with_columns(value)
    last = kept.group_by("key", "field", maintain_order=True).agg(pl.col("id").last(), pl.col("value").last())
    if last.height == 0:
        return lists.select("key")
    wide = last.pivot(on="field", index="key", values=["id", "value"], separator="_")  # id_<f>, value_<f>
    return lists.select("key").join(wide, on="key", how="left")
