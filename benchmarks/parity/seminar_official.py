"""Amazon Beauty (S3-Rec release) in the data format of the official SEMINAR code
(``paper-submission-coder/SEMINAR``, commit 4341da2, built on RUCAIBox/CIKM2020-S3Rec), for
running its SEMINAR (PSU pretraining, then TWIN-style GSU/ESU fine-tuning) as a reference.

RESULTS_PLACEHOLDER
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

SOURCE = Path(os.environ.get("RECFORGE_DATA", "../shared/data")) / "amazon-sequential-s3rec"
SHA256 = {  # as listed in the data folder's SOURCE.md
    "Beauty.txt": "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
    "Beauty_item2attributes.json": "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4",
}
QUERY_TOKENS = 5  # the code pads/cuts every query to 5 keyword ids (``--query_max_token_num``)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sequences(path: Path) -> list[tuple[str, list[int]]]:
    """``user item_1 … item_n`` lines, in file order (the code indexes users by line number)."""
    rows = []
    for line in path.read_text().splitlines():
        user, *items = line.split()
        rows.append((user, [int(item) for item in items]))
    return rows


def item_queries(item2attributes: dict[str, list[int]], num_items: int, mode: str) -> dict[int, str]:
    """Each item's pseudo-query as the code's comma-separated keyword ids (module docstring).

    ``attributes``: the item's first 5 attribute ids (they start at 1, so 0 stays the pad id); an
    item without attributes gets one extra id, like the code's ``<empty>`` keyword for an item
    without a description. ``empty``: every query is the pad id 0 (a pure recommendation history).
    """
    empty_id = max((a for values in item2attributes.values() for a in values), default=0) + 1
    queries = {}
    for item in range(1, num_items + 1):
        if mode == "empty":
            queries[item] = "0"
            continue
        attributes = item2attributes.get(str(item), [])[:QUERY_TOKENS]
        queries[item] = ",".join(str(a) for a in attributes) if attributes else str(empty_id)
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="the extracted official code (holds data/)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the amazon-sequential-s3rec folder")
    parser.add_argument("--name", default="Beauty")
    parser.add_argument("--queries", choices=["attributes", "empty"], default="attributes")
    args = parser.parse_args()

    data = args.official / "data"
    data.mkdir(parents=True, exist_ok=True)
    checks = {}
    for file in (f"{args.name}.txt", f"{args.name}_item2attributes.json"):
        digest = sha256(args.source / file)
        checks[file] = digest
        if file in SHA256 and digest != SHA256[file]:
            raise SystemExit(f"{file}: sha256 {digest} differs from the release's {SHA256[file]}")
        shutil.copyfile(args.source / file, data / file)  # read unchanged by the code

    sequences = read_sequences(data / f"{args.name}.txt")
    item2attributes = json.loads((data / f"{args.name}_item2attributes.json").read_text())
    num_items = max(max(items) for _, items in sequences)
    queries = item_queries(item2attributes, num_items, args.queries)
    with (data / f"{args.name}_queries.txt").open("w") as out:  # one query per history position
        for user, items in sequences:
            out.write(user + " " + " ".join(queries[item] for item in items) + "\n")
    # the official sampler (data/generate_test.py) reads the item -> query map as one JSON line
    (data / f"{args.name}_id2dummy_query.json").write_text(json.dumps({str(i): q for i, q in queries.items()}))

    lengths = sorted(len(items) for _, items in sequences)
    summary = {
        "users": len(sequences), "items": num_items, "interactions": sum(lengths),
        "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "queries": args.queries, "sha256": checks,
        "next": f"cd {data} && python -c \"from generate_test import sample_test_data; sample_test_data('{args.name}')\"",
    }  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
