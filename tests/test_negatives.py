"""Training negatives for data of positives only: each row followed by items its user never had."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.data.candidates import ItemSwap
from recforge.data.prepare import prepare
from recforge.data.sources import RawDataset, amazon_sequential
from recforge.data.splits import SplitConfig
from recforge.errors import ConfigError
from recforge.evaluate.evaluators import CandidateRanking
from recforge.models import build_model
from recforge.train.trainer import Trainer, TrainConfig, seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")

N_USERS, N_ITEMS, CLUSTERS, LENGTH = 240, 100, 5, 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Sequences in the S3-Rec format: user u rates LENGTH items of cluster u % 5 (item % 5)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("seq")
    lines = []
    for user in range(1, N_USERS + 1):
        items = rng.choice(np.arange(user % CLUSTERS, N_ITEMS, CLUSTERS) + 1, LENGTH, replace=False)
        lines.append(" ".join(map(str, [user, *items])))
    path = folder / "Planted.txt"
    path.write_text("\n".join(lines) + "\n")
    raw = RawDataset(frame=amazon_sequential.read_sequences(path), schema=amazon_sequential.schema(history_len=10), origin=str(path))
    return prepare(raw, folder / "store", SplitConfig(kind="leave_one_out"))


def test_each_row_is_followed_by_unseen_items_with_label_zero(store):
    swap = ItemSwap(store)
    batch = store.split("train").take(np.arange(50))
    out = swap.with_negatives(np.random.default_rng(0), batch, 3)
    assert len(out) == 200
    item = store.schema.categorical_index("item_id")
    assert torch.equal(out.categorical[::4], batch.categorical)  # the rows themselves first
    assert torch.equal(out.labels["click"], torch.tensor([1.0, 0, 0, 0]).repeat(50))
    users = out.categorical[:, store.schema.categorical_index("user_id")].numpy().astype(np.int64)
    keys = users * swap.num_items + out.categorical[:, item].numpy()
    negative = np.arange(200) % 4 != 0
    assert not np.isin(keys[negative], swap.seen_keys).any()  # never an item the user had in train
    assert torch.equal(out.sequences["hist_item_id"][1::4], batch.sequences["hist_item_id"])  # the same history


def fit(store, tmp_path, negatives: int) -> dict[str, float]:
    seed_everything(0)
    model = build_model("din", store.schema, {"embedding_dim": 8, "hidden": [16], "attention_hidden": [16]})
    config = TrainConfig(epochs=4, batch_size=64, lr=1e-2, negatives=negatives, patience=None, monitor="valid_ndcg@10", quiet=True)
    evaluator = CandidateRanking(store, negatives=20, valid_rows=None)
    return Trainer(model, store, config, tmp_path / str(negatives), evaluator).fit()


def test_negatives_teach_a_ranker_what_positives_alone_cannot(store, tmp_path):
    plain, sampled = fit(store, tmp_path, 0), fit(store, tmp_path, 2)
    # 21 candidates: the held-out item of the user's cluster and 20 unseen items, about 2 of them
    # from that cluster too (9 of its 89 unseen items): the top 5 holds the cluster's items
    assert sampled["test_hr@5"] > 0.9 > 0.5 > plain["test_hr@5"], (sampled["test_hr@5"], plain["test_hr@5"])
    assert sampled["test_popular_hr@5"] < 0.3


def test_negatives_are_drawn_again_the_same_for_the_same_seed(store, tmp_path):
    a, b = fit(store, tmp_path / "a", 1), fit(store, tmp_path / "b", 1)
    assert a == b


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"negative_item": "hist_item_id"}, "^train.negative_item: 'hist_item_id' is not a categorical feature of the data; negatives replace the item of a row$"),
        ({"negative_features": ["colour"]}, "^train.negative_features: 'colour' is not a categorical or list feature of the data$"),
    ],
)
def test_mistakes_name_the_setting(store, tmp_path, settings, error):
    model = build_model("din", store.schema, {"embedding_dim": 8})
    with pytest.raises(ConfigError, match=error):
        Trainer(model, store, TrainConfig(negatives=1, quiet=True, **settings), tmp_path)
