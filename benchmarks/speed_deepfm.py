"""DeepFM on MovieLens-1M CTR (rating >= 4), one epoch: recforge against plain PyTorch and peers.

Every implementation gets the same rows: the raw table of ``recforge.data.sources.movielens``
split by ``recforge.data.splits.assign_splits`` (random 80/10/10, seed 42). Each one runs end to
end in a fresh subprocess (``--only NAME``), timed from process start to test metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from _common import Row, parse_args, write_results

from recforge.data.sources import RawDataset, movielens
from recforge.data.splits import SplitConfig, assign_splits
from recforge.evaluate.metrics import auc, logloss

NAMES = ["recforge", "plain-pytorch", "fuxictr", "torch-rechub", "deepctr-torch"]
QUICK_NAMES = ["recforge", "plain-pytorch"]
CATEGORICAL = ["user_id", "item_id", "gender", "age", "occupation", "zip", "year"]
SPLIT = SplitConfig(kind="random", ratios=(0.8, 0.1, 0.1), seed=42)
QUICK_ROWS = 20_000
EMBEDDING_DIM, HIDDEN, DROPOUT = 16, [256, 128], 0.1
BATCH_SIZE, PREDICT_BATCH, LR = 4096, 65536, 1e-3
ROUNDS = 2
RESULT_TAG = "RESULT "


# --- data shared by every implementation ------------------------------------------------------
def load_raw(quick: bool) -> RawDataset:
    raw = movielens.load("1m", history_len=0)
    if quick:
        raw = RawDataset(frame=raw.frame.head(QUICK_ROWS), schema=raw.schema, origin=raw.origin)
    return raw


def encoded_splits(raw: RawDataset) -> dict[str, dict[str, np.ndarray]]:
    """Per split: every categorical column as int64 codes 1.. (0 = padding), genres as [N, 6]
    codes left-aligned and 0-padded, and the click label. Codes are dense ranks over all rows."""
    frame = raw.frame
    codes = assign_splits(frame, raw.schema, SPLIT)
    cats = frame.select(pl.col(c).cast(pl.String).rank("dense").cast(pl.Int64).alias(c) for c in CATEGORICAL)
    genres = frame["genres"]
    names = sorted(set(genres.explode().to_list()))
    values = genres.explode().replace_strict(names, list(range(1, len(names) + 1)), return_dtype=pl.Int64)
    lengths = genres.list.len().to_numpy().astype(np.int64)
    padded = np.zeros((frame.height, movielens.GENRES_MAX_LEN), dtype=np.int64)
    rows = np.repeat(np.arange(frame.height), lengths)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padded[rows, cols] = values.to_numpy()
    click = frame["click"].to_numpy().astype(np.float32)
    out = {}
    for code, name in enumerate(("train", "valid", "test")):
        mask = codes == code
        part = {c: cats[c].to_numpy()[mask] for c in CATEGORICAL}
        part["genres"] = padded[mask]
        part["click"] = click[mask]
        out[name] = part
    return out


def vocab_sizes(data: dict[str, dict[str, np.ndarray]]) -> dict[str, int]:
    return {c: int(max(p[c].max() for p in data.values())) + 1 for c in [*CATEGORICAL, "genres"]}


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"test_auc": auc(labels, probs), "test_logloss": logloss(labels, probs)}


# --- recforge: the library's normal path ------------------------------------------------------
def run_recforge(quick: bool) -> Row:
    """The library's normal path: ``prepare`` into a store, ``build_model`` and ``Trainer.fit`` for
    one epoch (per-step seeding, progress accounting, validation and a checkpoint included); the
    train throughput is the one the trainer logs for the epoch."""
    from recforge.data.prepare import prepare
    from recforge.models import build_model
    from recforge.train.trainer import TrainConfig, Trainer, seed_everything

    raw = load_raw(quick)
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare(raw, Path(tmp) / "store", SPLIT)
        seed_everything(0)
        model = build_model("deepfm", store.schema, {"embedding_dim": EMBEDDING_DIM, "hidden": HIDDEN, "dropout": DROPOUT})
        config = TrainConfig(epochs=1, batch_size=BATCH_SIZE, lr=LR, log_every=1 << 30, eval_batch_size=PREDICT_BATCH, quiet=True)
        trainer = Trainer(model, store, config, Path(tmp) / "run")
        trainer.fit()
        log = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        (epoch,) = [r for r in log if r["event"] == "train"]

        test = store.split("test")
        model.eval()
        start = time.perf_counter()
        with torch.inference_mode():
            probs = torch.cat([model.predict(model(b))["click"] for b in test.batches(PREDICT_BATCH)]).numpy()
        predict_s = time.perf_counter() - start
        labels = test.column("click")
    return {"train_samples_per_s": epoch["samples_per_s"], "predict_samples_per_s": len(probs) / predict_s, **scores(labels, probs)}


# --- plain PyTorch: a self-contained DeepFM over preloaded tensors ----------------------------
class PlainDeepFM(torch.nn.Module):
    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        cat_sizes = [sizes[c] for c in CATEGORICAL]
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(cat_sizes)[:-1]]))
        self.embedding = torch.nn.Embedding(sum(cat_sizes), EMBEDDING_DIM)
        self.weight = torch.nn.Embedding(sum(cat_sizes), 1)
        self.genre_embedding = torch.nn.Embedding(sizes["genres"], EMBEDDING_DIM, padding_idx=0)
        self.genre_weight = torch.nn.Embedding(sizes["genres"], 1, padding_idx=0)
        for table in (self.embedding, self.genre_embedding):
            torch.nn.init.normal_(table.weight, std=1e-2)
        for table in (self.weight, self.genre_weight):
            torch.nn.init.zeros_(table.weight)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        dims, layers = [(len(CATEGORICAL) + 1) * EMBEDDING_DIM, *HIDDEN], []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Dropout(DROPOUT)]
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(dims[-1], 1))

    def forward(self, cat: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        ids = cat + self.offsets
        count = (genres != 0).sum(1, keepdim=True).clamp(min=1)
        genre_e = self.genre_embedding(genres).sum(1) / count  # [B, D]
        e = torch.cat([self.embedding(ids), genre_e.unsqueeze(1)], 1)  # [B, F, D]
        first = self.weight(ids).sum((1, 2)) + (self.genre_weight(genres).sum(1) / count).squeeze(-1)
        fm = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1)
        return self.bias + first + fm + self.mlp(e.flatten(1)).squeeze(-1)


def run_plain(quick: bool) -> Row:
    data = encoded_splits(load_raw(quick))
    sizes = vocab_sizes(data)

    def tensors(part):
        return torch.from_numpy(np.stack([part[c] for c in CATEGORICAL], 1)), torch.from_numpy(part["genres"]), torch.from_numpy(part["click"])

    cat, genres, label = tensors(data["train"])
    torch.manual_seed(0)
    model = PlainDeepFM(sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(label))
    for k in range(0, len(label), BATCH_SIZE):
        rows = order[k : k + BATCH_SIZE]
        loss = loss_fn(model(cat[rows], genres[rows]), label[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start

    cat, genres, label = tensors(data["test"])
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        probs = torch.cat([torch.sigmoid(model(cat[k : k + PREDICT_BATCH], genres[k : k + PREDICT_BATCH])) for k in range(0, len(label), PREDICT_BATCH)]).numpy()
    predict_s = time.perf_counter() - start
    counts = {split: len(part["click"]) for split, part in data.items()}
    return {"train_samples_per_s": len(data["train"]["click"]) / train_s, "predict_samples_per_s": len(probs) / predict_s, **scores(label.numpy(), probs), "_rows": counts}


# --- peers --------------------------------------------------------------------------------------
def run_deepctr(quick: bool) -> Row:
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DeepFM

    data = encoded_splits(load_raw(quick))
    sizes = vocab_sizes(data)
    columns = [SparseFeat(c, sizes[c], embedding_dim=EMBEDDING_DIM) for c in CATEGORICAL]
    columns.append(VarLenSparseFeat(SparseFeat("genres", sizes["genres"], embedding_dim=EMBEDDING_DIM), maxlen=movielens.GENRES_MAX_LEN, combiner="mean"))
    torch.manual_seed(0)
    model = DeepFM(columns, columns, dnn_hidden_units=tuple(HIDDEN), dnn_dropout=DROPOUT, l2_reg_embedding=0.0, l2_reg_linear=0.0, seed=0, device="cpu")
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")
    x = {c: data["train"][c] for c in [*CATEGORICAL, "genres"]}
    start = time.perf_counter()
    model.fit(x, data["train"]["click"], batch_size=BATCH_SIZE, epochs=1, verbose=0, shuffle=True)
    train_s = time.perf_counter() - start
    x = {c: data["test"][c] for c in [*CATEGORICAL, "genres"]}
    start = time.perf_counter()
    probs = model.predict(x, batch_size=PREDICT_BATCH).reshape(-1)
    predict_s = time.perf_counter() - start
    return {"train_samples_per_s": len(data["train"]["click"]) / train_s, "predict_samples_per_s": len(probs) / predict_s, **scores(data["test"]["click"], probs)}


def run_rechub(quick: bool) -> Row:
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import DeepFM
    from torch_rechub.trainers import CTRTrainer
    from torch_rechub.utils.data import DataGenerator

    data = encoded_splits(load_raw(quick))
    sizes = vocab_sizes(data)
    features = [SparseFeature(c, sizes[c], embed_dim=EMBEDDING_DIM) for c in CATEGORICAL]
    features.append(SequenceFeature("genres", sizes["genres"], embed_dim=EMBEDDING_DIM, pooling="mean"))
    torch.manual_seed(0)
    model = DeepFM(deep_features=features, fm_features=features, mlp_params={"dims": HIDDEN, "dropout": DROPOUT, "activation": "relu"})
    names = [*CATEGORICAL, "genres"]
    x = {split: {c: data[split][c] for c in names} for split in data}
    y = {split: data[split]["click"] for split in data}
    train_dl, _, test_dl = DataGenerator(x["train"], y["train"]).generate_dataloader(
        x_val=x["valid"], y_val=y["valid"], x_test=x["test"], y_test=y["test"], batch_size=BATCH_SIZE
    )
    trainer = CTRTrainer(model, optimizer_params={"lr": LR, "weight_decay": 0.0}, n_epoch=1, device="cpu", model_path=tempfile.mkdtemp())
    start = time.perf_counter()
    trainer.train_one_epoch(train_dl)
    train_s = time.perf_counter() - start
    test_dl = torch.utils.data.DataLoader(test_dl.dataset, batch_size=PREDICT_BATCH)
    start = time.perf_counter()
    probs = np.asarray(trainer.predict(model, test_dl), dtype=np.float64).reshape(-1)
    predict_s = time.perf_counter() - start
    return {"train_samples_per_s": len(y["train"]) / train_s, "predict_samples_per_s": len(probs) / predict_s, **scores(y["test"], probs)}


def run_fuxictr(quick: bool) -> Row:
    """FuxiCTR's own path: parquet files -> ``FeatureProcessor`` + ``build_dataset`` (Ray) -> parquet ->
    ``RankDataLoader(data_format="parquet")`` (Ray Data) -> a ``BaseModel`` trained by its
    ``train_step``. The PyPI wheel carries the framework and layers but not the model zoo, so the
    DeepFM is assembled here from the wheel's own layers the way its model zoo assembles it. (Raw
    parquet rather than CSV: the wheel's CSV reader calls ``polars.scan_csv(dtypes=...)``, an
    argument polars 2 removed.)"""
    import logging

    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor, build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    logging.disable(logging.WARNING)

    class FuxiDeepFM(BaseModel):
        def __init__(self, feature_map, **kwargs) -> None:
            super().__init__(feature_map, model_id="DeepFM", **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, EMBEDDING_DIM)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(), output_dim=1, hidden_units=HIDDEN,
                hidden_activations="ReLU", dropout_rates=DROPOUT,
            )  # fmt: skip
            self.compile("Adam", "binary_crossentropy", LR)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            x = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(x)  # [B, F, D]
            y = self.fm(x, feature_emb) + self.mlp(feature_emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y)}

    raw = load_raw(quick)
    codes = assign_splits(raw.frame, raw.schema, SPLIT)
    table = raw.frame.select(
        *[pl.col(c).cast(pl.String) for c in CATEGORICAL], pl.col("genres").list.join("^"), pl.col("click").cast(pl.Float32)
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for code, split in enumerate(("train", "valid", "test")):
            files[split] = f"{tmp}/{split}.parquet"
            table.filter(pl.Series(codes == code)).write_parquet(files[split])
        processor = FeatureProcessor(
            feature_cols=[
                {"name": CATEGORICAL, "active": True, "dtype": "str", "type": "categorical"},
                {"name": "genres", "active": True, "dtype": "str", "type": "sequence", "splitter": "^",
                 "max_len": movielens.GENRES_MAX_LEN, "feature_encoder": "layers.MaskedAveragePooling()"},
            ],
            label_col={"name": "click", "dtype": "float"}, dataset_id="ml1m", data_root=tmp,
        )  # fmt: skip
        train_data, valid_data, test_data = build_dataset(processor, files["train"], files["valid"], files["test"], data_format="parquet")
        feature_map = FeatureMap("ml1m", processor.data_dir)
        feature_map.load(processor.json_file, {"embedding_dim": EMBEDDING_DIM})
        torch.manual_seed(0)
        model = FuxiDeepFM(feature_map, gpu=-1, verbose=0, model_root=tmp, metrics=["AUC"])
        model._max_gradient_norm = 10.0  # BaseModel.fit's default; train_step clips to it
        train_gen = RankDataLoader(feature_map, stage="train", train_data=train_data, batch_size=BATCH_SIZE, shuffle=True, data_format="parquet")[0]
        model.train()
        samples, start = 0, time.perf_counter()
        for batch in train_gen:
            model.train_step(batch)
            samples += len(batch["click"])
        train_s = time.perf_counter() - start
        test_gen = RankDataLoader(feature_map, stage="test", test_data=test_data, batch_size=PREDICT_BATCH, data_format="parquet")
        start = time.perf_counter()
        probs = model.predict(test_gen)
        predict_s = time.perf_counter() - start
        labels = pl.read_parquet(test_data, columns=["click"])["click"].to_numpy()
    return {"train_samples_per_s": samples / train_s, "predict_samples_per_s": len(probs) / predict_s, **scores(labels, probs)}


RUNNERS = {"recforge": run_recforge, "plain-pytorch": run_plain, "fuxictr": run_fuxictr, "torch-rechub": run_rechub, "deepctr-torch": run_deepctr}


# --- driver ------------------------------------------------------------------------------------
def child(name: str, quick: bool) -> None:
    try:
        row = RUNNERS[name](quick)
    except Exception as error:  # noqa: BLE001 - reported as the row's error
        row = {"error": f"{type(error).__name__}: {error}"}
    print(RESULT_TAG + json.dumps(row), flush=True)


def run_child(name: str, args) -> Row:
    cmd = [sys.executable, __file__, "--only", name, "--threads", str(args.threads), "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    row = json.loads(lines[-1][len(RESULT_TAG) :])
    return row if "error" in row else {**row, "wall_s": wall}


def main() -> None:
    only = None
    if "--only" in sys.argv:
        i = sys.argv.index("--only")
        only = sys.argv[i + 1]
        del sys.argv[i : i + 2]
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    if only is not None:
        child(only, args.quick)
        return

    names = QUICK_NAMES if args.quick else NAMES
    rounds = 1 if args.quick else ROUNDS
    best: dict[str, Row] = {}
    for r in range(rounds):  # interleaved: each implementation in turn, best figure per round
        for name in names:
            if "error" in best.get(name, {}):
                continue
            row = run_child(name, args)
            print(f"round {r + 1} {name}: {row}", flush=True)
            if "error" in row or name not in best:
                best[name] = row
                continue
            old = best[name]
            for k in ("train_samples_per_s", "predict_samples_per_s"):
                old[k] = max(old[k], row[k])
            old["wall_s"] = min(old["wall_s"], row["wall_s"])
    figures = ["train_samples_per_s", "predict_samples_per_s", "test_auc", "test_logloss", "wall_s"]
    rows: list[Row] = []
    for name in names:
        row = best[name]
        if "error" in row:
            rows.append({"name": name, **{k: float("nan") for k in figures}, "error": row["error"]})
        else:
            rows.append({"name": name, **{k: row[k] for k in figures}, "error": ""})

    counts = best["plain-pytorch"].get("_rows")  # split sizes, as the plain-pytorch child saw them
    meta = {
        "data": f"movielens-1m{f', first {QUICK_ROWS} rows (--quick)' if args.quick else ''}, click = rating >= 4",
        "rows": counts,
        "split": SPLIT.model_dump(mode="json"),
        "features": CATEGORICAL + ["genres (list, mean-pooled)"],
        "model": {"embedding_dim": EMBEDDING_DIM, "hidden": HIDDEN, "dropout": DROPOUT, "batch_size": BATCH_SIZE, "lr": LR, "epochs": 1},
        "rounds": rounds,
        "timing": "each implementation runs in a fresh subprocess, round after round in turn; best of the rounds "
        "for samples/s (train: one epoch incl. batch making; predict: test split, batch 65536) and wall_s "
        "(subprocess start to test metrics, data loading included)",
        "recforge": "prepare() into a temporary store, store batches + build_model('deepfm') + Optimizers "
        "(AdamW lr 1e-3 on dense parameters, RowWiseAdagrad lr 0.05 on the sparse embedding table)",
        "plain-pytorch": "self-contained DeepFM, dense Adam, preloaded int64 tensors, shuffled index slicing",
        "peers": "fed the same rows, categorical codes = dense ranks over all rows, genres padded to 6 (mean pooled)",
    }
    write_results("speed_deepfm", rows, meta, args=args, reference="plain-pytorch", figure="train_samples_per_s")
    by = {row["name"]: row for row in rows}
    for row in rows:
        print(f"{row['name']:14s} train {row['train_samples_per_s']:10.0f}/s predict {row['predict_samples_per_s']:10.0f}/s "
              f"auc {row['test_auc']:.4f} logloss {row['test_logloss']:.4f} wall {row['wall_s']:.1f}s {row['error']}")
    rf = by["recforge"]

    def target(label: str, ok: bool | None, detail: str) -> None:
        print(f"target {label}: {detail} {'n/a' if ok is None else ('ok' if ok else 'MISSED')}")

    for peer, need in (("plain-pytorch", 1.0), ("fuxictr", 1.0), ("torch-rechub", 2.5)):
        if peer in by and not by[peer]["error"]:
            ratio = rf["train_samples_per_s"] / by[peer]["train_samples_per_s"]
            target(f"recforge train >= {need}x {peer}", ratio >= need, f"{ratio:.2f}x")
        elif peer in names:
            target(f"recforge train >= {need}x {peer}", None, "(peer failed)")
    # equal quality: speed must not be bought with accuracy (a higher AUC passes)
    diff = rf["test_auc"] - by["plain-pytorch"]["test_auc"]
    target("test AUC at most 0.002 below plain", diff >= -0.002, f"diff {diff:+.4f}")
    walls = {r["name"]: r["wall_s"] for r in rows if not r["error"]}
    target("lowest end-to-end wall time", min(walls, key=walls.get) == "recforge", f"{walls}")


if __name__ == "__main__":
    main()
