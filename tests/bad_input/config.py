"""Mistakes in configs, overrides and settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.bad_input import Case
from tests.bad_input.files import CONFIG, user_files

TRAIN = ("train", "mine.yaml")


def config_text(text: str) -> Callable[[Path], None]:
    """The user's files with mine.yaml holding ``text``."""

    def write(folder: Path) -> None:
        user_files(folder)
        (folder / "mine.yaml").write_text(text)

    return write


def deepfm(folder: Path) -> None:
    user_files(folder, model="deepfm")


UNCLOSED = CONFIG.format(path="log.csv", model="lr").replace("schema.json}", "schema.json")
LISTED = "- name: mine\n- data: {source: file, options: {path: log.csv, schema: schema.json}}\n- model: {name: lr}\n"

CASES = [
    Case("config", "an unknown model name", lambda f: user_files(f, model="deepfn"), TRAIN,
         "mine.yaml: model.name: unknown model 'deepfn' (did you mean 'deepfm'?); `recforge models` lists them"),
    Case("config", "a word for the number of epochs", user_files, (*TRAIN, "--set", "train.epochs=abc"),
         "mine.yaml: train.epochs: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    Case("config", "a word for the learning rate", user_files, (*TRAIN, "--set", "train.lr=abc"),
         "mine.yaml: train.lr: Input should be a valid number, unable to parse string as a number (got 'abc')"),
    Case("config", "a word for the hidden layer sizes", deepfm, (*TRAIN, "--set", "model.params.hidden=abc"),
         "mine.yaml: model.params.hidden: Input should be a valid list (got 'abc')"),
    Case("config", "a negative embedding size", deepfm, (*TRAIN, "--set", "model.params.embedding_dim=-1"),
         "mine.yaml: model.params.embedding_dim: must be >= 1, got -1"),
    Case("config", "a misspelt trainer setting", user_files, (*TRAIN, "--set", "train.epoch=3"),
         "mine.yaml: train.epoch: not a trainer setting (did you mean 'epochs'?)"),
    Case("config", "a misspelt model parameter", deepfm, (*TRAIN, "--set", "model.params.hiden=[64]"),
         "mine.yaml: model.params.hiden: not a parameter of deepfm (did you mean 'hidden'?)"),
    Case("config", "an early-stopping mode that does not exist", user_files, (*TRAIN, "--set", "train.mode=maximum"),
         "mine.yaml: train.mode: Input should be 'max' or 'min' (got 'maximum')"),
    Case("config", "a CUDA device on a machine without one", user_files, (*TRAIN, "--set", "train.device=cuda"),
         "mine.yaml: train.device: 'cuda' was asked for but torch sees no CUDA device here; use 'cpu'",
         env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("config", "a device that does not exist", user_files, (*TRAIN, "--set", "train.device=banana"),
         "mine.yaml: train.device: 'banana' is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"),
    Case("config", "an override without a value", user_files, (*TRAIN, "--set", "train.lr"),
         "--set 'train.lr': not of the form key=value (e.g. --set train.lr=0.001)"),
    Case("config", "a config that is not valid YAML", config_text(UNCLOSED), TRAIN,
         "mine.yaml: line 5: not valid YAML: expected ',' or '}', but got ':' (while parsing a flow mapping from line 4)"),
    Case("config", "a config file that does not exist", user_files, ("train", "mnie.yaml"),
         "mnie.yaml: no such config file"),
    Case("config", "a config written as a list", config_text(LISTED), TRAIN,
         "mine.yaml: a config is a mapping of sections (name, data, model, train), not a list"),
]  # fmt: skip
