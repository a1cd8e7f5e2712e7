"""The README's model-zoo table is the registry's, as `recforge models --markdown` writes it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from recforge.models import registered
from recforge.models.zoo import zoo_markdown, zoo_rows

REPO = Path(__file__).resolve().parents[1]


def test_readme_zoo_matches_the_registry():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- zoo -->\n(.*?)\n<!-- /zoo -->", readme, re.S)
    assert block is not None, "README.md has no <!-- zoo --> block"
    assert block.group(1) == zoo_markdown(), "README's model zoo is stale: paste `recforge models --markdown`"
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", block.group(1), re.M)
    assert listed == sorted(registered())


def test_every_results_page_of_the_zoo_exists():
    for row in zoo_rows():
        assert not row["results"] or (REPO / row["results"]).is_file(), row


def test_models_markdown_command_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "recforge.cli", "models", "--markdown"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == zoo_markdown()
