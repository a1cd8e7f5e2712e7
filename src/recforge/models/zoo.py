"""The model zoo: every registered model with its family, capabilities, protocol, paper and results page."""

from __future__ import annotations

from recforge.models.base import protocol_of, registered
from recforge.models.capabilities import capabilities


def zoo_rows() -> list[dict]:
    rows = []
    for name, cls in registered().items():
        family = cls.__module__.split(".")[-2]  # recforge.models.<family>.<module>
        rows.append({
            "name": name, "family": family, "capabilities": capabilities(cls),
            "protocol": protocol_of(cls) or "standard", "paper": cls.paper, "results": cls.results_page,
        })  # fmt: skip
    return rows


def zoo_markdown() -> str:
    """The README's model-zoo table (``recforge models --markdown``)."""
    lines = ["| model | family | capabilities | protocol | paper | results |", "| --- | --- | --- | --- | --- | --- |"]
    for row in zoo_rows():
        results = f"[{row['results'].rsplit('/', 1)[-1]}]({row['results']})" if row["results"] else "—"
        lines.append(f"| `{row['name']}` | {row['family']} | {', '.join(row['capabilities'])} | {row['protocol']} | {row['paper'] or '—'} | {results} |")
    return "\n".join(lines)
