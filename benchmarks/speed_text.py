"""Sentences/s of recforge's offline sentence encoder against sentence-transformers' own ``encode``.

Both encode the same review texts (the women's clothing reviews under ``$RECFORGE_DATA``, else
generated sentences of mixed length) with the same all-MiniLM-L6-v2 weights, batch 64; the
vectors are checked equal within 1e-5 before anything is timed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch
from _common import Row, parse_args, timeit, write_results

from recforge.text import SentenceEncoder

REVIEWS = Path("womens-ecommerce-clothing-reviews") / "WomensClothingE-CommerceReviews.parquet.brotli"
BATCH = 64


def texts(count: int) -> tuple[list[str], str]:
    root = os.environ.get("RECFORGE_DATA")
    if root and (Path(root) / REVIEWS).is_file():
        frame = pl.read_parquet(Path(root) / REVIEWS).filter(pl.col("Review Text").str.len_chars() > 0)
        return frame["Review Text"].head(count).to_list(), f"the first {count} review texts of {REVIEWS.parent}"
    words = "the fabric fits well and the colour is lovely but the sleeves run long for me".split()
    rng = np.random.default_rng(0)
    made = [" ".join(rng.choice(words, int(rng.integers(3, 60)))) for _ in range(count)]
    return made, f"{count} generated sentences of 3 to 60 words"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    import sentence_transformers

    corpus, source = texts(64 if args.quick else 2048)
    encoder = SentenceEncoder.load()
    reference = sentence_transformers.SentenceTransformer(str(encoder.folder), device="cpu", local_files_only=True)
    ours = encoder.encode(corpus, batch_size=BATCH)
    theirs = reference.encode(corpus, batch_size=BATCH, convert_to_numpy=True)
    difference = float(np.abs(ours - theirs).max())
    assert difference < 1e-5, difference
    repeat = 1 if args.quick else 3
    rows: list[Row] = []
    for name, run in (
        ("sentence-transformers encode", lambda: reference.encode(corpus, batch_size=BATCH, convert_to_numpy=True)),
        ("recforge SentenceEncoder.encode", lambda: encoder.encode(corpus, batch_size=BATCH)),
    ):
        seconds = timeit(run, repeat)
        rows.append({"name": name, "sentences_per_s": len(corpus) / seconds, "seconds": seconds})
    meta = {"texts": source, "batch_size": BATCH, "max_abs_difference": difference, "sentence_transformers": sentence_transformers.__version__}
    write_results("speed_text", rows, meta, args=args, reference="sentence-transformers encode", figure="sentences_per_s")


if __name__ == "__main__":
    main()
