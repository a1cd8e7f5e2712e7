"""Experiment configs: loading, overrides, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch

from recforge.config import ConfigError, load_config, train_config
from recforge.errors import ModelConfigError
from recforge.train.distributed import check_device
from recforge.train.trainer import TrainConfig

CONFIGS = Path(__file__).parents[1] / "configs"

BASE = """
name: tiny
data:
  source: synthetic
  options: {n_rows: 1000}
model:
  name: deepfm
train:
  epochs: 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=0.01", "model.params.hidden=[64, 32]", "data.split.seed=7"])
    assert cfg.train["lr"] == 0.01 and cfg.model.params["hidden"] == [64, 32] and cfg.data.split.seed == 7


def test_unknown_section_key_names_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: data.shuffle: Extra inputs are not permitted"):
        load_config(write(tmp_path, BASE + "  \n"), ["data.shuffle=true"])


def test_unknown_train_key(tmp_path):
    with pytest.raises(ConfigError, match=r"/exp.yaml: train.learning_rate: not a trainer setting; known: epochs, batch_size, lr, "):
        load_config(write(tmp_path, BASE), ["train.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"/exp.yaml: train.epoch: not a trainer setting \(did you mean 'epochs'\?\)$"):
        load_config(write(tmp_path, BASE), ["train.epoch=2"])


def test_train_settings_are_checked_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match=r"/exp.yaml: train.epochs: Input should be a valid integer, .* \(got 'abc'\)$"):
        load_config(write(tmp_path, BASE), ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"/exp.yaml: train.mode: Input should be 'max' or 'min' \(got 'maximum'\)$"):
        load_config(write(tmp_path, BASE), ["train.mode=maximum"])
    with pytest.raises(ConfigError, match=r"/exp.yaml: train.batch_size: Input should be greater than or equal to 1 \(got 0\)$"):
        load_config(write(tmp_path, BASE), ["train.batch_size=0"])


def test_train_settings_are_checked_in_code():
    assert TrainConfig(lr=1).lr == 1.0 and TrainConfig(clip_norm=None, patience=None).patience is None
    with pytest.raises(pydantic.ValidationError, match="epochs"):
        TrainConfig(epochs="abc")
    with pytest.raises(ConfigError, match=r"^train.lr: Input should be greater than 0 \(got 0\)$"):
        train_config({"lr": 0})


def test_model_params_are_checked_at_load_time(tmp_path):
    with pytest.raises(ModelConfigError, match="/exp.yaml: model.params.embedding_dim: must be >= 1, got -1$"):
        load_config(write(tmp_path, BASE), ["model.params.embedding_dim=-1"])
    with pytest.raises(ModelConfigError, match=r"/exp.yaml: model.name: unknown model 'deepfn' \(did you mean 'deepfm'\?\)"):
        load_config(write(tmp_path, BASE), ["model.name=deepfn"])


def test_devices_torch_cannot_use_are_refused(monkeypatch):
    assert check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"^'banana' is not a torch device; use 'cpu', 'cuda' or 'cuda:N'$"):
        check_device("banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^train.device: 'cuda' was asked for but torch sees no CUDA device here; use 'cpu'$"):
        train_config({"device": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match=r"'cuda:1' was asked for but torch sees 1 CUDA device\(s\), cuda:0 to cuda:0"):
        check_device("cuda:1")


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set 'train.lr': not of the form key=value"):
        load_config(write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(ConfigError, match=r"^--set 'train.lr=\[1': the value is not valid YAML"):
        load_config(write(tmp_path, BASE), ["train.lr=[1"])
    with pytest.raises(ConfigError, match=r"^--set 'train.epochs.x=1': 'epochs' is not a section$"):
        load_config(write(tmp_path, BASE), ["train.epochs.x=1"])


def test_override_fills_an_empty_section(tmp_path):
    assert load_config(write(tmp_path, BASE.replace("train:\n  epochs: 1\n", "train:\n")), ["train.epochs=2"]).train == {"epochs": 2}


def test_unreadable_configs_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="^nope.yaml: no such config file$"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a YAML file$"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"exp.yaml: line 4: not valid YAML: mapping values are not allowed here$"):
        load_config(write(tmp_path, "name: tiny\nmodel:\n  name: lr\n   params: {}\n"))
    with pytest.raises(ConfigError, match=r"exp.yaml: a config is a mapping of sections \(name, data, model, train\), not a list$"):
        load_config(write(tmp_path, "- name: tiny\n"))


def test_store_path_follows_data_section(tmp_path):
    a = load_config(write(tmp_path, BASE))
    b = load_config(write(tmp_path, BASE), ["data.options.n_rows=2000"])
    assert a.data.store_path() != b.data.store_path()
    assert a.data.store_path() == load_config(write(tmp_path, BASE)).data.store_path()


def _is_study(path: Path) -> bool:
    import yaml

    return "variants" in (yaml.safe_load(path.read_text()) or {})


def _load_shipped(path: Path) -> list[str]:
    """Validate a shipped config (an experiment, or a study expanded to every run); the model names it uses."""
    from recforge.study import load_spec, plan

    if _is_study(path):
        return [run.config["model"]["name"] for run in plan(load_spec(path), path.parent)]
    return [load_config(path).model.name]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_configs_are_valid(path):
    from recforge.models import registered

    names = _load_shipped(path)
    assert names and set(names) <= set(registered()), names
