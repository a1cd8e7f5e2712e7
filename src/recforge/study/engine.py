"""The study engine: expand the grid, run every missing cell once, keep the records, write pages.

Every cell (data set, variant, seed, sweep point) resolves to one experiment config; its run folder
is ``<runs>/<protocol>/<fingerprint>`` (see :mod:`recforge.study.runs`). A cell finished in its
folder or kept in the records file is never run again (delete its record to run it anew), a folder
a live process holds is skipped, so several ``recforge study`` processes (or ``--jobs N`` worker
processes) share one study. After the runs, the records of every finished cell
of the grid are written to the spec's records file (long format, with each run's environment
stamp and wall time), and the pages are rendered from that file alone, so ``--report-only``
rewrites them on a checkout without the run folders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recforge.config import ConfigError, ExperimentConfig, apply_overrides, problems, read_mapping, resolve
from recforge.errors import RecforgeError
from recforge.files import write_atomic
from recforge.protocols import Cell, get_protocol
from recforge.study import runs
from recforge.study.spec import StudySpec, load_spec


@dataclasses.dataclass
class PlannedRun:
    dataset: str
    variant: str
    seed: int
    group: dict[str, str]
    config: dict[str, Any]  # the resolved experiment config
    extra: dict[str, Any]
    fingerprint: str


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def plan(spec: StudySpec, folder: Path) -> list[PlannedRun]:
    """Every cell of the grid, in run order: seed by seed, so that an early stop leaves whole tables."""
    try:
        protocol = get_protocol(spec.protocol)
        params = protocol.Params.model_validate(spec.params)
    except ValidationError as err:
        raise ConfigError(f"{spec.name}: params: {problems(err)}") from None
    except RecforgeError as err:
        raise ConfigError(f"{spec.name}: {err}") from None
    # (label, the data set it copies, its data section, its group, its overrides)
    datasets: list[tuple[str, str, dict[str, Any], dict[str, str], list[str]]] = []
    for dataset in spec.datasets or []:
        data = {"data": dataset.data} if dataset.data else {}
        datasets.append((dataset.label, dataset.label, data, {}, []))
        if spec.sweep is not None and spec.sweep.dataset == dataset.label:
            for value in spec.sweep.values:
                point = f"{dataset.label} ({spec.sweep.group}={value})"
                datasets.append((point, dataset.label, data, {spec.sweep.group: str(value)}, [f"{spec.sweep.key}={json.dumps(value)}"]))
    if not datasets:
        datasets = [("", "", {}, {}, [])]
    planned = []
    for seed in spec.seeds:
        for label, base_label, data, group, sweep_set in datasets:
            for variant in spec.variants:
                if variant.datasets is not None and base_label not in variant.datasets:
                    continue
                raw: dict[str, Any] = copy.deepcopy(spec.defaults)
                if variant.config:
                    variant_config = read_mapping(folder / variant.config, [], f"no such config file (variant {variant.label!r})",
                                                  "a config is a mapping of sections (name, data, model, train)")  # fmt: skip
                    raw = _merge(raw, variant_config)
                raw = _merge(raw, data)
                raw = _merge(raw, {k: v for k, v in (("data", variant.data), ("model", variant.model), ("train", variant.train)) if v})
                raw["name"] = f"{spec.name}-{runs.slug(label or 'data')}-{runs.slug(variant.label)}-seed{seed}"
                try:
                    apply_overrides(raw, [*variant.set, *spec.set, *sweep_set, *(f"{key}={seed}" for key in spec.seed_keys)])
                    config = ExperimentConfig.model_validate(raw)
                    model_config, train_config = resolve(config)
                    extra = protocol.VariantParams.model_validate(variant.params).model_dump(mode="json")
                except ValidationError as err:
                    raise ConfigError(f"{spec.name}: variant {variant.label!r}, data set {label!r}: {problems(err)}") from None
                except RecforgeError as err:
                    raise ConfigError(f"{spec.name}: variant {variant.label!r}, data set {label!r}: {err}") from None
                model, train = dataclasses.asdict(model_config), dataclasses.asdict(train_config)
                shape = {
                    "protocol": [spec.protocol, params.model_dump(mode="json")],
                    "data": config.data.model_dump(mode="json", exclude={"store"}),
                    "model": [config.model.name, model],
                    "train": {k: v for k, v in train.items() if k != "quiet"},
                    "variant": extra,
                    "seed": seed,
                }
                resolved = config.model_dump(mode="json")
                planned.append(PlannedRun(label, variant.label, seed, group, resolved, extra, runs.fingerprint(shape)))
    return planned


def run_cell(spec: StudySpec, item: PlannedRun, folder: Path, store_root: Path) -> bool:
    """Run one cell unless it is finished or held; True when this process ran it."""
    if runs.finished(folder) is not None or not runs.claim(folder):
        return False
    try:
        protocol_class = get_protocol(spec.protocol)
        protocol = protocol_class(protocol_class.Params.model_validate(spec.params))
        cell = Cell(item.dataset, item.variant, item.seed, ExperimentConfig.model_validate(item.config), item.group,
                    item.extra, store_root)  # fmt: skip
        write_atomic(folder / "cell.json", json.dumps(dataclasses.asdict(item), indent=1))
        started = time.perf_counter()
        records = protocol.run(cell, folder)
        result = {
            "dataset": item.dataset, "variant": item.variant, "seed": item.seed, "group": item.group,
            "fingerprint": item.fingerprint, "seconds": time.perf_counter() - started,
            "environment": runs.environment(), "records": records,
        }  # fmt: skip
        write_atomic(folder / runs.RECORD_FILE, json.dumps(result, indent=1))
    finally:
        runs.release(folder)
    return True


def _worker(spec_json: str, item: dict[str, Any], folder: str, store_root: str) -> bool:
    spec = StudySpec.model_validate_json(spec_json)
    return run_cell(spec, PlannedRun(**item), Path(folder), Path(store_root))


def run_study(
    path: str | Path,
    runs_root: Path = Path("runs/studies"),
    store_root: Path = Path("runs/stores"),
    report_only: bool = False,
    jobs: int = 1,
    seeds: list[int] | None = None,
    datasets: list[str] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the missing cells of the spec at ``path`` (unless ``report_only``), then write its
    records file and pages. ``seeds`` / ``datasets`` restrict what is run, not what is shown."""
    from recforge.study.render import write_pages

    path = Path(path)
    spec = load_spec(path)
    grid = plan(spec, path.parent)
    for seed in seeds or []:
        if seed not in spec.seeds:
            raise ConfigError(f"{path}: seed {seed} is not one of the study's seeds {spec.seeds}")
    known = sorted({item.dataset for item in grid})
    for label in datasets or []:
        if label not in known:
            raise ConfigError(f"{path}: no data set labelled {label!r}; known: {known}")
    recorded = set()  # cells whose records are kept (run here or elsewhere): finished
    if spec.records_path.exists():
        recorded = {r["fingerprint"] for r in json.loads(spec.records_path.read_text())["runs"]}
    todo = [] if report_only else [
        item for item in grid
        if item.fingerprint not in recorded and (not seeds or item.seed in seeds) and (not datasets or item.dataset in datasets)
    ]  # fmt: skip
    folder_of = {item.fingerprint: runs_root / spec.protocol / item.fingerprint for item in grid}
    if jobs <= 1:
        for item in todo:
            if run_cell(spec, item, folder_of[item.fingerprint], store_root):
                log(f"[{spec.name}] {item.dataset or '-'} / {item.variant} / seed {item.seed}: done")
                write_pages(spec, path, collect(spec, grid, folder_of))
    elif todo:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_worker, spec.model_dump_json(), dataclasses.asdict(item), str(folder_of[item.fingerprint]), str(store_root)): item
                for item in todo
            }
            for future in as_completed(futures):
                item = futures[future]
                if future.result():
                    log(f"[{spec.name}] {item.dataset or '-'} / {item.variant} / seed {item.seed}: done")
    found = collect(spec, grid, folder_of)
    done = {r["fingerprint"] for r in found["runs"]}
    held = sorted({item.fingerprint for item in todo if item.fingerprint not in done})
    if held:  # claimed by another live process (or failed there): this study's pages lack them until it ends
        log(f"[{spec.name}] {len(held)} run(s) held by other processes: run the study again once they finish")
    if not found["runs"]:
        if report_only:
            raise ConfigError(f"{path}: no finished run of study {spec.name!r} (records {spec.records_path}); nothing to report")
        return found
    write_pages(spec, path, found)
    return found


def collect(spec: StudySpec, grid: list[PlannedRun], folder_of: dict[str, Path]) -> dict[str, Any]:
    """Every finished cell of the grid: from its run folder, else from the records file; the
    records file is rewritten with exactly these (cells no longer in the grid are dropped)."""
    kept: dict[str, dict[str, Any]] = {}
    if spec.records_path.exists():
        kept = {r["fingerprint"]: r for r in json.loads(spec.records_path.read_text())["runs"]}
    found = []
    for item in grid:
        result = runs.finished(folder_of[item.fingerprint]) or kept.get(item.fingerprint)
        if result is not None:
            # labels follow the spec (a renamed variant keeps its runs)
            found.append(result | {"dataset": item.dataset, "variant": item.variant, "seed": item.seed, "group": item.group})
    document = {"study": spec.name, "runs": found}
    write_atomic(spec.records_path, json.dumps(document, indent=1) + "\n")
    return document
