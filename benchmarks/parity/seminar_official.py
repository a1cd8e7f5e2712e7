"""Amazon Beauty (S3-Rec release) in the data format of the official SEMINAR code
(``paper-submission-coder/SEMINAR``, commit 4341da2, built on RUCAIBox/CIKM2020-S3Rec), for
running its SEMINAR (PSU pretraining, then TWIN-style GSU/ESU fine-tuning) as a reference.

Data format. ``run_seminar_model.py`` (lines 171-190) reads, from ``--data_dir`` (default
``./data/``), for ``--data_name <name>``:

- ``<name>.txt``: ``user item_1 ... item_n`` per line in time order (the S3-Rec files as they are);
  users are indexed by line, ``item_size = max item + 2`` with 0 = pad and ``max item + 1`` = EOS;
- ``<name>_queries.txt``: same lines, one query per history position, each query a
  comma-separated list of keyword ids, padded or cut to 5 (``utils.py:205-261``);
- ``<name>_sample.txt``: ``user neg_1 ... neg_99``; ``<name>_sample_queries.txt``: their queries
  (optional; both are made by the code's own ``data/generate_test.py``);
- ``<name>_item2attributes.json``: read only so that its key "1" can be printed; SEMINAR never uses
  attributes (``utils.py:334-340`` fixes the attribute vocabulary at 150,000);
- ``<name>_id2{image,title}_emb.pth`` (CLIP, 512-d) only with ``--multi_modal_emb_enable true``.

The paper's Amazon pipeline (``data/data_process.py:630-784``) takes the first 5 words of an item's
description as its pseudo-query (a ``<empty>`` keyword where there is none). The S3-Rec Beauty
copy has no text, so this script writes each item's first 5 attribute ids (category and brand ids,
1..637) as its pseudo-query (``--queries attributes``; ``--queries empty`` writes the pad id 0
everywhere). It also writes ``<name>_id2dummy_query.json``, the item -> query map that
``generate_test.py`` needs. It copies ``Beauty.txt`` and the attribute file unchanged after checking
their sha256. There are no images or text, so the runs use ``--multi_modal_emb_enable false``, and
the alignment loss is 0 (``long_seq_models/seminar.py:268-269``).

Protocol. Leave-one-out by position, one example per user (``datasets.py:263-300``). PSU pretraining
feeds ``items[:-4] + [EOS]`` and predicts ``items[-4]``. Fine-tuning feeds ``items[:-3]`` and predicts
``items[-3]``: only the last position is trained (``trainers.py:366-373``), so an epoch is 22,363
rows. Validation predicts ``items[-2]`` and test ``items[-1]``. The training negative is 1 item drawn
uniformly from the items the user never touched (``utils.py:31-35``). It is paired with a random
query of the same user (``datasets.py:306-312``). The loss is BCE on the positive and that negative
(``trainers.py:101-116``).

Evaluation ranks the held-out item against 99 negatives (``trainers.py:441-470``). The negatives are
drawn by ``generate_test.py:9-69`` with ``sample_type='random'``: uniformly, without replacement,
over all items that appear in the data, excluding the user's items, numpy seed 12345. Validation and
test use the same list. In the default ``--test_set_mode recommendation`` the queries of all 100
candidates are zeroed (``datasets.py:349-357``). The history keeps its queries. Metrics are HIT and
NDCG at 1, 5, 10 and 50, plus MRR over the 100 candidates (``trainers.py:56-74``,
``utils.py:342-352``).

Defaults in ``run_seminar_model.py:96-149``: hidden 64, 4 heads, lr 1e-3, Adam (0.9, 0.999), no
weight decay, batch 256, seed 42, ``max_seq_length`` 50, ``retrieve_topK`` 200, epochs 200 with
early stopping of patience 10, ``pretrain_epochs`` 5, query vocabulary 200,000. The Amazon script
(``run_train_seminar_amazon.sh:35-36``) overrides these with max_seq_length 100, top-K 50, 1 PSU
epoch, then 1 fine-tuning epoch, alignment weight 0.1, ``freeze_psu_projection true``, and a
3,000,000-keyword vocabulary. Here the vocabulary stays at the default 200,000, because Beauty uses
keyword ids only up to 12,102 (the EOS id is also used as a keyword). The pretraining run writes
``output/Pretrain-<model_name>-seminar-<name>-10.pt`` (lines 217-219, 263-269). ``--run_mode train``
loads it with a strict ``load_state_dict`` (lines 288-292, ``trainers.py:96-99``). It falls back to
training from scratch if the file is missing.

Commands (commit 4341da2ff3e36591e489f423894c73124d8d694c; the official code runs from scratch
copies in its own venv)::

    git --git-dir=<mirror of paper-submission-coder/SEMINAR> archive 4341da2 | tar -x -C /tmp/seminar_official
    python3 -m venv /tmp/seminarvenv
    /tmp/seminarvenv/bin/pip install torch==2.13.0 numpy==2.4.6 scipy==1.17.1 tqdm==4.70.1
    cp -r /tmp/seminar_official /tmp/seminar_run
    RECFORGE_DATA=../shared/data python benchmarks/parity/seminar_official.py --official /tmp/seminar_run   # recforge's venv
    cd /tmp/seminar_run/data && /tmp/seminarvenv/bin/python -c "from generate_test import sample_test_data; sample_test_data('Beauty')"
    cp -r /tmp/seminar_run /tmp/seminar_run_fixed          # then apply the relevance fix below to this copy
    cd /tmp/seminar_run                                    # (or /tmp/seminar_run_fixed)
    export OMP_NUM_THREADS=1
    A="--soft_search_type mhta --data_name Beauty --model_type seminar --model_name beauty_seminar_p1_t1 --multi_modal_emb_enable false --fusion_weight_query 0.5 --max_seq_length 100 --retrieve_topK 50"
    /tmp/seminarvenv/bin/python run_seminar_model.py --run_mode pretrain --pretrain_epochs 1 --loss_multimodal_align_weight 0.1 $A
    /tmp/seminarvenv/bin/python run_seminar_model.py --run_mode train --epochs 1 --freeze_psu_emb false --freeze_psu_projection true --freeze_multi_modal_projection false $A

Both copies need one run-time patch. In ``run_seminar_model.py:234``, wrap the validation dataset's
``user_seq`` argument in the file's own ``filter_dataset_to_max_size(..., 32)``, so that only the
first 32 users are validated. The reason is memory: ``trainer.valid`` runs outside ``torch.no_grad``
(line 311), and every candidate builds an autograd graph. One batch of 256 users with 100 candidates
went past 24 GB, and the kernel killed it. Validation only feeds early stopping, and with 1 epoch it
cannot change the tested model (line 318 saves the final model anyway). The test runs under
``no_grad`` and covers all 22,363 users.

The fix (copy ``_fixed`` only) changes one line, ``long_seq_models/seminar.py:252``. That line returns
the mean over positions of the ratio of the positive's exp-similarity to the summed exp-similarity
of the 5 negatives. The fix replaces it with the mean over positions of minus the log of the
positive's exp-similarity divided by (positive plus summed negatives), i.e. InfoNCE. Empty and pad
queries are not masked (the minimal change).

Measured on CPU, 1 thread, torch 2.13.0, with the numbers taken from the last dict in
``train.log``. The PSU stage took about 1.5 minutes. The fine-tuning stage took about 10 minutes,
about 1 of them training and the rest the 100-candidate test. The training budget was the scripts'
own 1 PSU epoch plus 1 fine-tuning epoch, each 22,363 rows (88 steps of 256); nothing was cut short:

    run            HIT@1  HIT@5  HIT@10 HIT@50 NDCG@5 NDCG@10 NDCG@50 MRR
    as released    0.0609 0.1831 0.2796 0.6699 0.1224 0.1534  0.2373  0.1367
    relevance fix  0.0660 0.1905 0.2820 0.6725 0.1284 0.1578  0.2417  0.1415

NDCG@1 equals HIT@1. With the same seed, the released run reproduced bit for bit: its fine-tuning
loss was 0.6179 both times. During PSU training, the released relevance term (pos/neg) fell from
1.27 to 0.15, i.e. positives were pushed away from their queries; the InfoNCE term fell from 2.04 to
1.67 (log 6 = 1.79). Other defects found:

- ``wQ_list``, ``wK_list`` and ``wV_list`` (``long_seq_models/base_model.py:53-55``) are plain Python
  lists. They are never registered, trained or saved, so the GSU and ESU projections stay at their
  seeded random init.
- GSU top-K scores pad positions too, and only zeroes them after gathering (``base_model.py:709-719``).
  With L = 100 and a median Beauty length of 6, most of the 50 retrieved slots are pads, and the ESU
  attends to them without a mask.
- ``init_weights`` overwrites the pad rows, so the pad item and pad keyword are fixed non-zero
  vectors. Queries are a plain mean over 5 slots, pads included (``modules.py:186-194``).
- Early stopping watches NDCG@50 (``scores[-1:]``, line 313), not HIT@10/NDCG@10. Line 318 then
  saves the last model over the best one before the test.
- The fine-tuning loop swallows every exception (``trainers.py:355-392``).
- ``generate_test.py:61`` checks ints against a list of strings, so its de-duplication does nothing.
  8 Beauty users get a repeated negative.
- The PQ codebooks (``seminar.py:53``) are frozen ``randn`` and unused by ``mhta``.
- The released Amazon log was made by an older version of the code: it has no freeze flags,
  alignment weight 1.0 and ``cuda_condition=False``.
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
