"""The bad-input matrix: every mistake a user can make, as they would make it, and the one line they see.

A :class:`Case` writes the user's files into an empty working folder, runs one ``recforge``
command there in a subprocess, and expects exit code 2, exactly one line ``error: <message>`` on
stderr, and every file the user had still there, unchanged. ``tests/test_bad_input.py`` runs the
cases; ``python -m tests.bad_input`` writes them to ``docs/reliability.md`` (a test keeps the page
equal to them). Cases live in one module per layer: ``config``, ``data``, ``runs``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LAYERS = {
    "config": "Configs, overrides and settings",
    "data": "Data files and schemas",
    "runs": "Run folders, checkpoints and bundles",
}
PAGE = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


@dataclass(frozen=True)
class Case:
    layer: str  # a key of LAYERS
    mistake: str  # what the user did, in their words
    files: Callable[[Path], None]  # writes the user's files into the working folder
    argv: tuple[str, ...]  # the recforge command, run in that folder
    message: str  # the line the user sees, exactly, after "error: "
    env: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.layer}: {self.mistake}"


def cases() -> list[Case]:
    found = [case for layer in LAYERS for case in importlib.import_module(f"{__name__}.{layer}").CASES]
    ids = [case.id for case in found]
    assert len(set(ids)) == len(ids), "two cases describe the same mistake"
    return found


def _code(text: str) -> str:
    """Inline code that may itself hold backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render() -> str:
    lines = [
        "# Reliability: every mistake, one clear line",
        "",
        "Each row is a mistake made as a user would make it, on small files of their own, and the one line",
        "`recforge` answers (on stderr, exit code 2). Nothing the user had is changed or lost by any of them.",
        "`RECFORGE_DEBUG=1` shows the full traceback instead.",
        "",
        "Written by `python -m tests.bad_input` from the cases that `tests/test_bad_input.py` runs; do not edit",
        "by hand.",
    ]
    for layer, title in LAYERS.items():
        lines += ["", f"## {title}", "", "| mistake | command | what the user sees |", "| --- | --- | --- |"]
        for case in (c for c in cases() if c.layer == layer):
            command = " ".join(["recforge", *case.argv]).replace("|", "\\|")
            message = f"error: {case.message}".replace("|", "\\|")
            lines.append(f"| {case.mistake} | {_code(command)} | {_code(message)} |")
    return "\n".join(lines) + "\n"
