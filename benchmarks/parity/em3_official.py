"""Amazon Musical Instruments 5-core in the data format of the official EM3 code
(``em3e2e-anonymous/em3``, built on MMRec), for running its FREEDOM and EM3 as a reference.

MMRec reads, per data set ``<name>``, the folder ``data/<name>/`` with

- ``<name>.inter``: tab-separated ``userID itemID rating timestamp x_label``, ids 0-based and
  contiguous, ``x_label`` 0 = train, 1 = valid, 2 = test;
- ``text_feat.npy`` [items, 384] and ``image_feat.npy`` [items, d] float32, row = itemID;

and ``src/configs/dataset/<name>.yaml`` naming those files. The split follows MMRec's own
preprocessing (``preprocessing/1splitting.ipynb``): each user's interactions in a random order
(the notebook shuffles the rows, then sorts by user; ``--order time`` orders them by review time
instead); a user with fewer than 10 gets the last one as test and the one before as valid,
otherwise the last ``int(0.2 n)`` are split half valid, half test (valid first). Evaluation in
the code is full ranking of every valid/test user's held-out items with the user's train items
excluded, Recall/NDCG@{5,10,20,50} averaged over users.

Item text = the item's train-split reviews (``reviewText``) in time order, joined by " | ", as
all-MiniLM-L6-v2 sentence vectors (:class:`recforge.text.encoder.SentenceEncoder`; an item
without a train review gets the vector of the empty text). The data has no images, and the
official EM3 needs an image file (its FQ-Former fuses an image and a text token), so two folders
are written:

- ``musical_text``: ``text_feat.npy`` only (FREEDOM text-only, as the brief asks);
- ``musical``: ``text_feat.npy`` plus ``image_feat.npy`` = sentence vectors of the items' train
  review summaries (a second text modality in the image slot; FREEDOM then mixes the two kNN
  graphs 0.1 / 0.9 as it does image / text).

They are separate folders because the code caches its kNN graph as
``data/<name>/mm_adj_freedomdsp_10_1.pt`` whatever the features.

Commands (the official code is run unmodified from a scratch copy, in its own venv)::

    git --git-dir=<mirror of em3e2e-anonymous/em3> archive 011e2cf | tar -x -C /tmp/em3_official
    python3 -m venv /tmp/em3venv
    /tmp/em3venv/bin/pip install torch==2.13.0 "numpy<1.24" "pandas<2" "scipy<1.12" pyyaml lmdb pillow matplotlib
    RECFORGE_DATA=../shared/data python benchmarks/parity/em3_official.py --official /tmp/em3_official   # recforge's venv
    cd /tmp/em3_official/src
    export PYTHONPATH=../stubs OMP_NUM_THREADS=2
    /tmp/em3venv/bin/python main.py -m FREEDOM -d musical_text
    /tmp/em3venv/bin/python main.py -m FREEDOM -d musical
    /tmp/em3venv/bin/python main.py -m EM3 -d musical

Each run does the code's own grid (``src/configs/model/<MODEL>.yaml``) and logs to
``src/log/<MODEL>-<name>-<time>.log``; its "BEST" block picks the grid point by TEST Recall@20
(``utils/quick_start.py``), so report the per-point "best valid" lines as well.
``numpy<1.24`` because ``utils/metrics.py`` uses ``np.float``, ``scipy<1.12`` because the models call
``dok_matrix._update``; ``../stubs`` holds an empty
``torchvision`` (imported by ``utils/data_utils.py`` for raw images, never used with
pre-extracted features; the PyPI torchvision wheels do not load with the local CPU torch).
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

SOURCE = Path(os.environ.get("RECFORGE_DATA", "../shared/data")) / "amazon-musical-instruments-5core" / "Musical_Instruments.zip"
MEMBER = "Musical_Instruments.json"
DATASET_YAML = """USER_ID_FIELD: userID
ITEM_ID_FIELD: itemID
TIME_FIELD: timestamp
filter_out_cod_start_users: True
inter_file_name: '{name}.inter'
vision_feature_file: 'image_feat.npy'
text_feature_file: 'text_feat.npy'
field_separator: "\\t"
"""
STUBS = {
    "torchvision/__init__.py": '"""Stand-in: the official code imports torchvision for raw images only."""\n',
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": "def pad(*args, **kwargs):\n    raise NotImplementedError\n\n\nresize = pad\n",
}


def reviews(path: Path) -> pl.DataFrame:
    """One row per review: user, item, rating, timestamp, summary, text, in file order (``line``)."""
    with zipfile.ZipFile(path) as archive:
        frame = pl.read_ndjson(archive.read(MEMBER))
    return frame.select(
        pl.int_range(pl.len()).alias("line"),
        pl.col("reviewerID").alias("user"),
        pl.col("asin").alias("item"),
        pl.col("overall").cast(pl.Float64).alias("rating"),
        pl.col("unixReviewTime").cast(pl.Int64).alias("timestamp"),
        pl.col("summary").fill_null(""),
        pl.col("reviewText").fill_null("").alias("text"),
    )


def mmrec_split(frame: pl.DataFrame, order: str, seed: int) -> pl.DataFrame:
    """``userID``, ``itemID`` (0-based, by sorted raw id) and ``x_label`` by MMRec's rule (module docstring)."""
    rng = np.random.default_rng(seed)
    frame = frame.with_columns(
        pl.col("user").rank("dense").cast(pl.Int64).sub(1).alias("userID"),
        pl.col("item").rank("dense").cast(pl.Int64).sub(1).alias("itemID"),
        pl.Series("_key", rng.permutation(frame.height)) if order == "random" else pl.col("timestamp").alias("_key"),
    ).sort("userID", "_key", "line")
    n = frame.group_by("userID").len().rename({"len": "n"})
    frame = frame.join(n, on="userID").with_columns(pl.int_range(pl.len()).over("userID").alias("position"))
    held = pl.when(pl.col("n") < 10).then(2).otherwise((pl.col("n") * 0.2).floor().cast(pl.Int64))  # valid + test
    valid = pl.when(pl.col("n") < 10).then(1).otherwise(held // 2)
    start = pl.col("n") - held
    label = pl.when(pl.col("position") < start).then(0).when(pl.col("position") < start + valid).then(1).otherwise(2)
    return frame.with_columns(label.alias("x_label")).drop("_key", "n", "position")


def item_texts(frame: pl.DataFrame, column: str, num_items: int) -> list[str]:
    """Each item's train-split ``column`` values in time order, joined by " | " ("" without any)."""
    joined = (
        frame.filter((pl.col("x_label") == 0) & (pl.col(column) != ""))
        .sort("timestamp", "line")
        .group_by("itemID")
        .agg(pl.col(column).str.join(" | "))
    )
    texts = [""] * num_items
    for item, text in joined.iter_rows():
        texts[item] = text
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="the extracted official code (holds src/)")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--order", choices=["random", "time"], default="random", help="each user's order before the split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from recforge.text.encoder import SentenceEncoder

    frame = mmrec_split(reviews(args.source), args.order, args.seed)
    num_items = int(frame["itemID"].max()) + 1
    encoder = SentenceEncoder.load()
    text = encoder.encode(item_texts(frame, "text", num_items), progress=True, allow_empty=True)  # [I, 384]
    summary = encoder.encode(item_texts(frame, "summary", num_items), progress=True, allow_empty=True)  # [I, 384]
    inter = frame.select("userID", "itemID", "rating", "timestamp", "x_label")
    for name, features in (("musical_text", {"text_feat.npy": text}), ("musical", {"text_feat.npy": text, "image_feat.npy": summary})):
        folder = args.official / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("mm_adj_*.pt"):  # the code's kNN cache of earlier features
            stale.unlink()
        inter.write_csv(folder / f"{name}.inter", separator="\t")
        for file, values in features.items():
            np.save(folder / file, values.astype(np.float32))
        (args.official / "src" / "configs" / "dataset" / f"{name}.yaml").write_text(DATASET_YAML.format(name=name))
    for file, content in STUBS.items():
        (args.official / "stubs" / file).parent.mkdir(parents=True, exist_ok=True)
        (args.official / "stubs" / file).write_text(content)
    counts = inter.group_by("x_label").len().sort("x_label")
    summary_info = {
        "users": int(inter["userID"].n_unique()), "items": num_items, "interactions": inter.height,
        "split": dict(zip(counts["x_label"].to_list(), counts["len"].to_list())), "order": args.order, "seed": args.seed,
        "items_without_train_text": int(sum(1 for t in item_texts(frame, "text", num_items) if not t)),
    }  # fmt: skip
    (args.official / "data" / "musical_split.json").write_text(json.dumps(summary_info, indent=2))
    print(json.dumps(summary_info))


if __name__ == "__main__":
    main()
