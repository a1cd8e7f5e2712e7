"""Tables, plots and pages from a study's records.

Records are long-format: each finished run contributes ``{split, metric, value, group}`` entries,
labelled with its data set, variant and seed. A table (:class:`~recforge.study.spec.TableSpec`) is
a pivot of them: cells are the mean ± sample std over seeds (one seed: the mean alone);
comparisons are paired by seed against a reference row (mean ± std of the differences and the
count of seeds ahead), or relative changes of the means. Each page gets one marked block
(``<!-- study:NAME -->`` ... ``<!-- /study:NAME -->``) with the command that reproduces it and the
environment the runs measured; text around the block is kept.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from recforge.files import write_atomic
from recforge.study.spec import Comparison, StudySpec, TableSpec, load_spec
from recforge.errors import ConfigError


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std, NaNs skipped; std is NaN for fewer than two values."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    array = array[~np.isnan(array)]
    if len(array) == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def cell(values: list[float], digits: int = 4, signed: bool = False) -> str:
    """``mean ± std``; the mean alone for one value; ``n/a`` for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    head = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return head if math.isnan(std) else f"{head} ± {std:.{digits}f}"


def flatten(spec: StudySpec, found: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per record: dataset, variant, its ``variant_group``, seed, split, metric, value and
    the record's group names."""
    variant_group = {v.label: v.group for v in spec.variants}
    rows = []
    for run in found["runs"]:
        base = {"dataset": run["dataset"], "variant": run["variant"], "variant_group": variant_group[run["variant"]],
                "seed": run["seed"], **run["group"]}  # fmt: skip
        for entry in run["records"]:
            rows.append({**base, **entry["group"], "split": entry["split"], "metric": entry["metric"], "value": entry["value"]})
        if run["seconds"] is not None:  # None: a run recorded without its wall time
            rows.append({**base, "split": "run", "metric": "minutes", "value": run["seconds"] / 60})
    return rows


def _keep(row: dict[str, Any], where: dict[str, list[str]]) -> bool:
    return all(str(row.get(key, "")) in allowed for key, allowed in where.items())


def _ordered(values) -> list[str]:
    return list(dict.fromkeys(values))


def _column(table: TableSpec, row: dict[str, Any]) -> str:
    return " ".join(str(row[key]) for key in table.across)


class Pivot:
    """The records of one table (or block), indexed by (row, column, metric, split) -> seed -> value;
    ``row_key=None`` puts every record in one row (the first seen value per seed is kept)."""

    def __init__(self, table: TableSpec, rows: list[dict[str, Any]], row_key: str | None) -> None:
        self.values: dict[tuple, dict[int, float]] = {}
        for row in rows:
            key = (str(row.get(row_key, "")) if row_key else "", _column(table, row), row["metric"], row["split"])
            self.values.setdefault(key, {}).setdefault(row["seed"], row["value"])

    def seeds(self, row: str, column: str, metric: str, split: str) -> dict[int, float]:
        return self.values.get((row, column, metric, split), {})


Means = dict[str, dict[str, tuple[float, float]]]  # row -> column -> (mean, std) of a table's first metric


def render_table(spec: StudySpec, table: TableSpec, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Means]]:
    """Markdown of one table; with the mean and std of its first metric per block (block -> Means) for the plot."""
    rows = [r for r in rows if all(key in r for key in table.across)]
    kept = [r for r in rows if _keep(r, table.where)]
    blocks = _ordered(str(r.get(table.blocks, "")) for r in kept) if table.blocks else [""]
    parts, means = [], {}
    for block in blocks:
        in_block = [r for r in rows if not table.blocks or str(r.get(table.blocks, "")) == block]
        # a reference row is looked up in the same block, unless blocks split the variants themselves
        references = kept if table.blocks in ("variant", "variant_group") else [r for r in in_block if _keep(r, table.where)]
        text, block_means = _block(spec, table, [r for r in in_block if _keep(r, table.where)], in_block, references)
        if table.blocks:
            parts.append(f"#### {block}\n\n{text}")
        else:
            parts.append(text)
        means[block] = block_means
    return "\n\n".join(parts), means


def _block(
    spec: StudySpec, table: TableSpec, rows: list[dict[str, Any]], unfiltered: list[dict[str, Any]],
    references: list[dict[str, Any]],
) -> tuple[str, Means]:  # fmt: skip
    pivot = Pivot(table, rows, table.rows)
    reference_pivot = Pivot(table, references, table.rows)
    if table.rows == "variant":
        order = [v.label for v in spec.variants if table.variants is None or v.label in table.variants]
        present = {r["variant"] for r in rows}
        row_labels = [label for label in order if label in present]
    else:
        row_labels = _ordered(str(r.get(table.rows, "")) for r in rows if table.rows in r)
        if table.row_titles:
            row_labels = [k for k in table.row_titles if k in row_labels] + [k for k in row_labels if k not in table.row_titles]
    columns = _ordered(_column(table, r) for r in rows)
    headers, keys = [], []
    for metric in table.metrics:
        for column in columns:
            headers.append(f"{column} {metric.heading}".strip())
            keys.append((column, metric))
    for comparison in table.compare:
        reference = comparison.reference or spec.reference
        for column in columns:
            headers.append(f"{column} {_comparison_title(comparison, reference)}".strip())
            keys.append((column, comparison))
    first = "model" if table.rows == "variant" else table.rows
    lines = [
        "| " + " | ".join([first, *(["seeds"] if table.seeds_column else []), *headers]) + " |",
        "| --- | " + " | ".join(["---:"] * (len(headers) + table.seeds_column)) + " |",
    ]
    means: dict[str, dict[str, tuple[float, float]]] = {}
    only_compared = not table.metrics and table.compare
    for label in row_labels:
        if only_compared and all((c.reference or spec.reference) == label for c in table.compare):
            continue  # the reference's change against itself
        cells = []
        seed_count = 0
        for column, item in keys:
            if isinstance(item, Comparison):
                cells.append(_compare(spec, pivot, reference_pivot, table, item, label, column))
                continue
            found = pivot.seeds(label, column, item.metric, item.split or table.split)
            seed_count = max(seed_count, len(found))
            cells.append(cell(list(found.values()), item.digits) if found else "—")
            if item is table.metrics[0] and found:
                means.setdefault(table.row_titles.get(label, label), {})[column or item.heading] = mean_std(list(found.values()))
        title = table.row_titles.get(label, label)
        lines.append("| " + " | ".join([title, *([str(seed_count)] if table.seeds_column else []), *cells]) + " |")
    for extra in table.extra_rows:
        if extra.study is None:
            found = [r for r in unfiltered if _keep(r, {**table.where, **extra.where})]
        else:
            found = [r for r in _study_rows(extra.study) if _keep(r, extra.where)]
        extra_pivot = Pivot(table, found, None)
        cells = []
        for column, item in keys:
            metric = extra.metric or extra.prefix + extra.metrics.get(item.metric, item.metric)
            values = [] if isinstance(item, Comparison) else list(extra_pivot.seeds("", column, metric, item.split or table.split).values())
            cells.append(cell(values if len(set(values)) > 1 else values[:1], item.digits) if values else "—")  # one value when all seeds agree
        if any(c != "—" for c in cells):
            lines.append("| " + " | ".join([extra.title, *([""] if table.seeds_column else []), *cells]) + " |")
    return "\n".join(lines), means


def _study_rows(spec_path: str) -> list[dict[str, Any]]:
    """The flattened records of another study (by its spec's path)."""
    other = load_spec(spec_path)
    if not other.records_path.exists():
        raise ConfigError(f"{spec_path}: study {other.name!r} has no records ({other.records_path}) to take a row from")
    return flatten(other, json.loads(other.records_path.read_text()))


def _comparison_title(comparison: Comparison, reference: str | None) -> str:
    if comparison.title:
        return comparison.title
    kind = {"delta": "Δ", "relative": "change of", "relaimpr": "RelaImpr"}[comparison.kind]
    return f"{kind} {comparison.metric} vs {reference}"


def _compare(
    spec: StudySpec, pivot: Pivot, references: Pivot, table: TableSpec, comparison: Comparison, label: str, column: str
) -> str:
    reference = comparison.reference or spec.reference
    if reference is None:
        raise ConfigError(f"{spec.name}: table {table.title!r} compares against a reference; set `reference`")
    mine = pivot.seeds(label, column, comparison.metric, table.split)
    theirs = references.seeds(reference, column, comparison.metric, table.split)
    if not mine or not theirs:
        return "—"
    if comparison.kind == "delta":
        paired = [mine[s] - theirs[s] for s in mine if s in theirs]
        if not paired:
            return "—"
        ahead = sum(d > 0 for d in paired)
        return f"{cell(paired, 4, signed=True)} ({ahead}/{len(paired)})" if label != reference else cell(paired, 4, signed=True)
    mean, ref = mean_std(list(mine.values()))[0], mean_std(list(theirs.values()))[0]
    change = mean / ref - 1 if comparison.kind == "relative" else (mean - 0.5) / (ref - 0.5) - 1
    return f"{100 * change:+.2f}%"


def plot_table(spec: StudySpec, table: TableSpec, blocks: dict[str, Means], path: Path) -> None:
    """One panel per block: lines across the columns (one per row) when the table has ``across``,
    bars otherwise; the error bars are the sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, means) for name, means in blocks.items() if means]
    width_in = max(6.0, 1.2 * max(len(_ordered(c for v in m.values() for c in v)) for _, m in panels) + 3)
    fig, axes = plt.subplots(1, len(panels), figsize=(min(width_in * len(panels), 24), 4.4), squeeze=False)
    for ax, (name, means) in zip(axes[0], panels):
        labels = list(means)
        columns = _ordered(c for values in means.values() for c in values)
        if table.across and len(columns) > 1:
            for label in labels:
                found = [means[label].get(c, (np.nan, np.nan)) for c in columns]
                ax.errorbar(range(len(columns)), [m for m, _ in found], yerr=[0.0 if math.isnan(s) else s for _, s in found],
                            marker="o", capsize=3, label=label)  # fmt: skip
            ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right", fontsize=8)
        else:
            width = 0.8 / max(len(columns), 1)
            for k, column in enumerate(columns):
                found = [means[label].get(column, (np.nan, np.nan)) for label in labels]
                ax.bar(np.arange(len(labels)) + k * width, [m for m, _ in found], width, label=column,
                       yerr=[0.0 if math.isnan(s) else s for _, s in found], capsize=3)  # fmt: skip
            ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=25, ha="right", fontsize=8)
            low = min(m - (0 if math.isnan(s) else s) for v in means.values() for m, s in v.values())
            high = max(m + (0 if math.isnan(s) else s) for v in means.values() for m, s in v.values())
            ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
        ax.set_title(name or table.title, fontsize=9)
        ax.grid(alpha=0.3)
        if table.across and (len(labels) > 1 or len(columns) > 1):
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    axes[0][0].set_ylabel(f"{table.split} {table.metrics[0].heading} (mean ± std over seeds)")
    if len(panels) > 1:
        fig.suptitle(table.title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def environment_line(found: dict[str, Any]) -> str:
    stamps = Counter(
        "unrecorded (runs made before stamps were kept)" if run.get("environment") is None else
        "{cpu}, {cores} cores, {threads} torch thread(s), torch {torch}, Python {python}, {device}".format(**run["environment"])
        for run in found["runs"]
    )  # fmt: skip
    return "; ".join(f"{stamp} ({count} run{'s' if count > 1 else ''})" for stamp, count in stamps.items())


def block(spec: StudySpec, spec_path: Path, found: dict[str, Any], page: Path, titled: bool) -> str:
    """The study's marked block of ``page``; ``titled``: the page's own title already says it."""
    rows = flatten(spec, found)
    command = spec.command or f"recforge study {spec_path.as_posix()}"
    seeds = sorted({run["seed"] for run in found["runs"]})
    lines = [f"<!-- study:{spec.name} -->"]
    if spec.title and not titled:
        lines += [f"### {spec.title}", ""]
    if spec.notes:
        lines += [spec.notes.strip(), ""]
    lines += [
        f"Reproduce: `{command}` (records: `{spec.records_path.as_posix()}`). Seeds {', '.join(map(str, seeds))}; "
        f"cells are mean ± sample std over seeds (one seed: the mean); {len(found['runs'])} runs.",
        "",
        f"Measured on: {environment_line(found)}.",
        "",
    ]
    plots = 0
    for table in spec.tables:
        text, means = render_table(spec, table, rows)
        lines += [f"**{table.title}**", "", text, ""]
        if table.plot and any(means.values()):
            image = Path(spec.pages[0]).with_name(f"{spec.name}{f'_{plots}' if plots else ''}.png")  # beside the first page
            plots += 1
            if page == Path(spec.pages[0]):
                plot_table(spec, table, means, image)
            lines += [f"![{table.title}]({os.path.relpath(image, page.parent)})", ""]
    lines.append(f"<!-- /study:{spec.name} -->")
    return "\n".join(lines)


def write_pages(spec: StudySpec, spec_path: Path, found: dict[str, Any]) -> None:
    """Replace the study's block in each page (appended when a page has none)."""
    for page_name in spec.pages:
        page = Path(page_name)
        current = page.read_text() if page.exists() else f"# {spec.title or spec.name}\n"
        text = block(spec, spec_path, found, page, titled=current.startswith(f"# {spec.title}\n"))
        pattern = re.compile(rf"<!-- study:{re.escape(spec.name)} -->.*?<!-- /study:{re.escape(spec.name)} -->", re.S)
        updated = pattern.sub(lambda _: text, current) if pattern.search(current) else current.rstrip() + "\n\n" + text + "\n"
        write_atomic(page, updated)
