"""The study engine: grid, fingerprints, claiming, resume, records, tables and pages."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recforge.config import ConfigError
from recforge.protocols import Cell, Protocol, record, register_protocol
from recforge.protocols.standard import Standard
from recforge.study import load_spec, plan, run_study
from recforge.study import runs
from recforge.study.render import cell, render_table
from recforge.study.spec import StudySpec

TRAIN = {"epochs": 1, "batch_size": 256, "lr": 0.01, "monitor": "valid_click_auc", "num_threads": 1, "quiet": True,
         "checkpoint_every_steps": 0}  # fmt: skip
DATA = {"source": "synthetic", "options": {"n_rows": 3000, "n_users": 100, "n_items": 60, "history_len": 0}}


def spec_text(**changes) -> dict:
    spec = {
        "name": "tiny",
        "title": "Tiny study",
        "protocol": "standard",
        "seeds": [0, 1],
        "seed_keys": ["train.seed", "data.split.seed"],
        "defaults": {"data": DATA, "train": TRAIN},
        "variants": [
            {"label": "LR", "model": {"name": "lr"}},
            {"label": "FM", "model": {"name": "fm", "params": {"embedding_dim": 4}}},
        ],
        "reference": "LR",
        "tables": [
            {
                "title": "CTR",
                "metrics": [{"metric": "click_auc", "title": "AUC"}, "click_logloss"],
                "compare": [{"metric": "click_auc"}],
            }
        ],
        "pages": ["page.md"],
        "records": "records.json",
    }
    spec.update(changes)
    return spec


def write_spec(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_text(**changes), sort_keys=False))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECFORGE_QUIET", "1")
    return tmp_path


# --- the grid -----------------------------------------------------------------------------------
def test_grid_expands_datasets_variants_seeds_and_sweep(workdir):
    spec = StudySpec.model_validate(
        spec_text(
            defaults={"train": TRAIN},
            datasets=[{"label": "A", "data": DATA}, {"label": "B", "data": {**DATA, "options": {**DATA["options"], "n_rows": 2000}}}],
            variants=[{"label": "LR", "model": {"name": "lr"}}, {"label": "FM", "model": {"name": "fm"}, "datasets": ["A"]}],
            sweep={"dataset": "B", "key": "data.options.n_items", "values": [30, 60]},
        )
    )
    grid = plan(spec, workdir)
    cells = [(g.seed, g.dataset, g.variant) for g in grid]
    assert cells[:5] == [(0, "A", "LR"), (0, "A", "FM"), (0, "B", "LR"), (0, "B (n_items=30)", "LR"), (0, "B (n_items=60)", "LR")]
    assert len(grid) == 2 * 5  # FM runs on A only
    by_cell = {(g.seed, g.dataset, g.variant): g for g in grid}
    assert by_cell[(0, "B (n_items=30)", "LR")].config["data"]["options"]["n_items"] == 30
    assert by_cell[(0, "B (n_items=30)", "LR")].group == {"n_items": "30"}
    # the sweep point equal to its data set is the same run
    assert by_cell[(0, "B (n_items=60)", "LR")].fingerprint == by_cell[(0, "B", "LR")].fingerprint
    assert by_cell[(1, "A", "LR")].config["train"]["seed"] == 1 and by_cell[(1, "A", "LR")].config["data"]["split"]["seed"] == 1
    assert len({g.fingerprint for g in grid}) == 2 * 4


def test_fingerprint_follows_what_shapes_the_run_not_labels(workdir):
    base = plan(StudySpec.model_validate(spec_text()), workdir)[0].fingerprint
    relabelled = plan(StudySpec.model_validate(spec_text(variants=[{"label": "logistic", "model": {"name": "lr"}}], reference=None, name="other")), workdir)[0]
    assert relabelled.fingerprint == base
    changed = spec_text(defaults={"data": DATA, "train": {**TRAIN, "lr": 0.02}})
    assert plan(StudySpec.model_validate(changed), workdir)[0].fingerprint != base
    # a model default written out explicitly is the same run
    explicit = spec_text(variants=[{"label": "LR", "model": {"name": "lr", "params": {"embedding_dim": 16}}}])
    assert plan(StudySpec.model_validate(explicit), workdir)[0].fingerprint == base


def test_spec_mistakes_are_one_line_errors(workdir):
    with pytest.raises(ConfigError, match=r"spec.yaml: reference 'DNN' is not a variant \(\['LR', 'FM'\]\)"):
        load_spec(write_spec(workdir, reference="DNN"))
    with pytest.raises(ConfigError, match=r"spec.yaml: variants.0.modle: Extra inputs are not permitted"):
        load_spec(write_spec(workdir, variants=[{"label": "LR", "modle": {"name": "lr"}}], reference=None))
    bad = write_spec(workdir, variants=[{"label": "LR", "model": {"name": "lr", "params": {"embedding_dim": -1}}}])
    with pytest.raises(ConfigError, match=r"variant 'LR'.*model.params.embedding_dim: must be >= 1"):
        plan(load_spec(bad), workdir)
    with pytest.raises(ConfigError, match="unknown protocol 'nope'"):
        plan(load_spec(write_spec(workdir, protocol="nope")), workdir)


# --- claiming -----------------------------------------------------------------------------------
def _claim_at_once(folder: str, start, results) -> None:
    start.wait()
    results.put(runs.claim(Path(folder)))


def test_two_processes_claiming_at_once_one_wins(tmp_path):
    context = multiprocessing.get_context("spawn")
    for trial in range(5):
        folder = tmp_path / f"run{trial}"
        start, results = context.Event(), context.Queue()
        workers = [context.Process(target=_claim_at_once, args=(str(folder), start, results)) for _ in range(2)]
        for worker in workers:
            worker.start()
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in workers)
        for worker in workers:
            worker.join()
        assert outcomes == [False, True]


def test_a_dead_claimers_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runs.CLAIM_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    assert runs.claim(folder)
    assert not runs.claim(folder)  # now this live process holds it
    runs.release(folder)
    assert runs.claim(folder)
    runs.release(folder)
    (folder / runs.CLAIM_FILE).write_text("")  # a claimer that died before writing its pid
    assert not runs.claim(folder)  # may still be writing it
    os.utime(folder / runs.CLAIM_FILE, (0, 0))
    assert runs.claim(folder)


# --- running, resuming, reporting --------------------------------------------------------------
_FAIL_ON = "RECFORGE_TEST_FAIL_VARIANT"


@register_protocol
class FailingStandard(Standard):
    """The standard protocol, except that it dies on the variant named by an environment variable."""

    name = "test_failing_standard"

    def run(self, cell: Cell, out: Path) -> list[dict]:
        if os.environ.get(_FAIL_ON) == f"{cell.variant}/{cell.seed}":
            raise RuntimeError("killed")
        return super().run(cell, out)


def records_of(path: Path) -> dict:
    document = json.loads(path.read_text())
    return {(r["variant"], r["seed"]): r["records"] for r in document["runs"]}


def test_interrupted_study_resumes_and_equals_an_unbroken_one(workdir, monkeypatch):
    unbroken = write_spec(workdir / "a", protocol="test_failing_standard", pages=["a/page.md"], records="a/records.json")
    run_study(unbroken, workdir / "runs_a", workdir / "stores", log=lambda _: None)

    broken = write_spec(workdir / "b", protocol="test_failing_standard", pages=["b/page.md"], records="b/records.json")
    monkeypatch.setenv(_FAIL_ON, "FM/1")
    with pytest.raises(RuntimeError, match="killed"):
        run_study(broken, workdir / "runs_b", workdir / "stores", log=lambda _: None)
    assert not list((workdir / "runs_b").rglob(runs.CLAIM_FILE))  # the failed run released its claim
    monkeypatch.delenv(_FAIL_ON)
    lines: list[str] = []
    run_study(broken, workdir / "runs_b", workdir / "stores", log=lines.append)
    assert lines == ["[tiny] - / FM / seed 1: done"]  # only the missing run
    assert records_of(workdir / "b/records.json") == records_of(workdir / "a/records.json")


def test_report_only_rewrites_pages_from_records_alone(workdir):
    path = write_spec(workdir)
    (workdir / "page.md").write_text("# Tiny study\n\nHand-written intro.\n\n<!-- study:tiny -->\nold\n<!-- /study:tiny -->\n\nOutro.\n")
    run_study(path, workdir / "runs", workdir / "stores", log=lambda _: None)
    page = (workdir / "page.md").read_text()
    assert page.startswith("# Tiny study\n\nHand-written intro.\n\n<!-- study:tiny -->") and page.endswith("<!-- /study:tiny -->\n\nOutro.\n")
    assert "old" not in page and page.count("<!-- study:tiny -->") == 1
    assert "Reproduce: `recforge study" in page and "torch thread(s)" in page
    shutil.rmtree(workdir / "runs")
    (workdir / "page.md").write_text(page.replace("Outro.", "Outro, edited."))
    run_study(path, workdir / "runs", workdir / "stores", report_only=True, log=lambda _: None)
    assert (workdir / "page.md").read_text() == page.replace("Outro.", "Outro, edited.")
    lines: list[str] = []
    run_study(path, workdir / "runs", workdir / "stores", log=lines.append)  # the records say every cell is done
    assert lines == [] and not (workdir / "runs").exists()


def test_report_only_without_records_is_a_clear_error(workdir):
    with pytest.raises(ConfigError, match=r"no finished run of study 'tiny' \(records records.json\); nothing to report"):
        run_study(write_spec(workdir), workdir / "runs", workdir / "stores", report_only=True)


def test_jobs_run_in_parallel_processes_with_the_same_records(workdir):
    one = write_spec(workdir / "one", pages=["one/page.md"], records="one/records.json")
    two = write_spec(workdir / "two", pages=["two/page.md"], records="two/records.json")
    run_study(one, workdir / "runs1", workdir / "stores", log=lambda _: None)
    run_study(two, workdir / "runs2", workdir / "stores", jobs=2, log=lambda _: None)
    assert records_of(workdir / "one/records.json") == records_of(workdir / "two/records.json")
    stamps = [r["environment"] for r in json.loads((workdir / "two/records.json").read_text())["runs"]]
    assert all(s["threads"] == 1 and s["cores"] == os.cpu_count() and s["device"] == "cpu" for s in stamps)


# --- tables -------------------------------------------------------------------------------------
def test_one_seed_prints_the_mean_alone():
    assert cell([0.5]) == "0.5000"
    assert cell([0.5, 0.7]) == "0.6000 ± 0.1414"
    assert cell([]) == "n/a"
    assert cell([0.01], signed=True) == "+0.0100"


@register_protocol
class Planted(Protocol):
    """Records planted by the test: variant value + seed, per domain."""

    name = "test_planted"
    VALUES = {"A": 0.60, "B": 0.70}

    def run(self, cell: Cell, out: Path) -> list[dict]:
        base = self.VALUES[cell.variant] + 0.01 * cell.seed
        return [record("test", "auc", base + k * 0.1, domain=d) for k, d in enumerate(("x", "y"))]


def test_table_pivots_records_with_paired_deltas_and_wins(workdir):
    spec = spec_text(
        protocol="test_planted", seeds=[0, 1, 2], defaults={"data": DATA},
        variants=[{"label": "A", "model": {"name": "lr"}}, {"label": "B", "model": {"name": "lr"}, "set": ["model.params.embedding_dim=8"]}],
        reference="A",
        tables=[{"title": "t", "across": "domain", "metrics": [{"metric": "auc", "title": "AUC"}],
                 "compare": [{"metric": "auc"}, {"metric": "auc", "kind": "relative", "title": "rel"}]}],
    )  # fmt: skip
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    found = run_study(path, workdir / "runs", workdir / "stores", log=lambda _: None)
    from recforge.study.render import flatten

    parsed = load_spec(path)
    text, means = render_table(parsed, parsed.tables[0], flatten(parsed, found))
    lines = text.splitlines()
    assert lines[0] == "| model | seeds | x AUC | y AUC | x Δ auc vs A | y Δ auc vs A | x rel | y rel |"
    assert lines[2] == "| A | 3 | 0.6100 ± 0.0100 | 0.7100 ± 0.0100 | +0.0000 ± 0.0000 | +0.0000 ± 0.0000 | +0.00% | +0.00% |"
    assert lines[3] == "| B | 3 | 0.7100 ± 0.0100 | 0.8100 ± 0.0100 | +0.1000 ± 0.0000 (3/3) | +0.1000 ± 0.0000 (3/3) | +16.39% | +14.08% |"
    means = means[""]  # one block
    assert {row: {c: m for c, (m, _) in columns.items()} for row, columns in means.items()} == {
        "A": {"x": pytest.approx(0.61), "y": pytest.approx(0.71)}, "B": {"x": pytest.approx(0.71), "y": pytest.approx(0.81)}}  # fmt: skip
    assert means["B"]["x"][1] == pytest.approx(0.01)



def test_a_row_from_another_studys_records_with_its_metric_names(workdir):
    other = spec_text(name="other", protocol="test_planted", seeds=[0, 1, 2], defaults={"data": DATA},
                      variants=[{"label": "A", "model": {"name": "lr"}}], reference="A", records="other.json", pages=["other.md"])  # fmt: skip
    (workdir / "other.yaml").write_text(yaml.safe_dump(other))
    run_study(workdir / "other.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    extra = {"title": "A elsewhere (domain y)", "study": "other.yaml", "where": {"variant": "A", "domain": "y"},
             "metrics": {"auc": "auc"}}  # fmt: skip
    mine = spec_text(protocol="test_planted", seeds=[0], defaults={"data": DATA}, variants=[{"label": "B", "model": {"name": "lr"}, "set": ["model.params.embedding_dim=8"]}],
                     reference="B", tables=[{"title": "t", "where": {"domain": "x"}, "metrics": [{"metric": "auc"}], "extra_rows": [extra]}])  # fmt: skip
    (workdir / "spec.yaml").write_text(yaml.safe_dump(mine))
    found = run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    from recforge.study.render import flatten

    parsed = load_spec(workdir / "spec.yaml")
    lines = render_table(parsed, parsed.tables[0], flatten(parsed, found))[0].splitlines()
    assert lines[2] == "| B | 1 | 0.7000 |"
    assert lines[3] == "| A elsewhere (domain y) |  | 0.7100 ± 0.0100 |"  # the other study's auc in domain y, 3 seeds
    renamed = {**extra, "metrics": {"auc": "no_such_metric"}}
    parsed.tables[0].extra_rows[0] = type(parsed.tables[0].extra_rows[0]).model_validate(renamed)
    assert len(render_table(parsed, parsed.tables[0], flatten(parsed, found))[0].splitlines()) == 3  # no values: no row
    (workdir / "other.json").unlink()
    with pytest.raises(ConfigError, match=r"other.yaml: study 'other' has no records \(other.json\)"):
        render_table(parsed, parsed.tables[0], flatten(parsed, found))

def _prepare_at_once(root: str, start, results) -> None:
    from recforge.config import DataConfig
    from recforge.experiment import prepare_store

    start.wait()
    store = prepare_store(DataConfig.model_validate(DATA), Path(root))
    results.put((str(store.path), len(store.split("train"))))


def test_processes_preparing_one_store_at_once_share_it(tmp_path):
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_prepare_at_once, args=(str(tmp_path), start, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
    assert all(w.exitcode == 0 for w in workers)
    assert len(set(outcomes)) == 1  # one store, the same rows for every process
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(outcomes[0][0]).name]  # no temp folder or lock left


def test_a_block_of_ablations_compares_against_the_reference_in_another_block(workdir):
    spec = spec_text(
        protocol="test_planted", seeds=[0, 1], defaults={"data": DATA}, reference="A",
        variants=[{"label": "A", "model": {"name": "lr"}},
                  {"label": "B", "model": {"name": "lr"}, "set": ["model.params.embedding_dim=8"], "group": "ablations"}],
        tables=[{"title": "t", "blocks": "variant_group", "where": {"domain": "x"}, "metrics": ["auc"], "compare": [{"metric": "auc"}]}],
    )  # fmt: skip
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_study(path, workdir / "runs", workdir / "stores", log=lambda _: None)
    page = (workdir / "page.md").read_text()
    assert "#### main" in page and "#### ablations" in page
    assert "| B | 2 | 0.7050 ± 0.0071 | +0.1000 ± 0.0000 (2/2) |" in page


def test_a_run_held_by_a_live_process_is_skipped_and_reported(workdir):
    path = write_spec(workdir)
    first = plan(load_spec(path), workdir)[0]
    assert runs.claim(workdir / "runs" / "standard" / first.fingerprint)  # this live process holds it
    lines: list[str] = []
    run_study(path, workdir / "runs", workdir / "stores", log=lines.append)
    assert lines[-1] == "[tiny] 1 run(s) held by other processes: run the study again once they finish"
    assert len(records_of(workdir / "records.json")) == 3
