"""Experiment configs: loading, overrides, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.config import ConfigError, load_config

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
    with pytest.raises(ConfigError, match=r"exp.yaml: train: unknown key\(s\) \['learning_rate'\]"):
        load_config(write(tmp_path, BASE), ["train.learning_rate=0.1"])


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(write(tmp_path, BASE), ["train.lr"])


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
