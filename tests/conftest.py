"""Shared test helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture
def real_data() -> Callable[[str], Path]:
    """``real_data(folder)`` -> ``$RECFORGE_DATA/<folder>``; skips the test when it is absent."""

    def find(folder: str) -> Path:
        root = os.environ.get("RECFORGE_DATA")
        if not root:
            pytest.skip("RECFORGE_DATA is not set")
        path = Path(root) / folder
        if not path.is_dir():
            pytest.skip(f"{path} is missing")
        return path

    return find


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors: more threads cost more than they give (and contend on CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
