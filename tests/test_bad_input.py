"""Every case of the bad-input matrix, run as the user would meet it (see ``tests/bad_input``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.bad_input import PAGE, Case, cases, render
from tests.bad_input.files import recforge


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", cases(), ids=lambda case: case.id)
def test_mistake_is_one_clear_line_and_loses_nothing(case: Case, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    case.files(work)
    before = snapshot(work)
    done = recforge(work, *case.argv, env=case.env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"error: {case.message}"], done.stderr
    after = snapshot(work)
    assert {name: after.get(name) for name in before} == before, "a file the user had was changed or lost"


def test_reliability_page_lists_every_case():
    assert PAGE.read_text() == render(), "run `python -m tests.bad_input` to rewrite docs/reliability.md"


def test_debug_shows_the_traceback_of_the_same_mistake(tmp_path):
    case = next(c for c in cases() if c.mistake == "an unknown model name")
    case.files(tmp_path)
    done = recforge(tmp_path, *case.argv, env={"RECFORGE_DEBUG": "1"})
    assert done.returncode != 0
    assert "Traceback (most recent call last)" in done.stderr and "ModelConfigError" in done.stderr
