"""Mistakes in configs, overrides and settings."""

from __future__ import annotations

from tests.bad_input import Case
from tests.bad_input.files import user_files

CASES = [
    Case("config", "an unknown model name", lambda f: user_files(f, model="deepfn"), ("train", "mine.yaml"),
         "mine.yaml: model.name: unknown model 'deepfn'; known: ..."),  # fmt: skip
]
