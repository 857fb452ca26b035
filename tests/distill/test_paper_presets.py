"""The papers' run settings: every row of the per-paper tables in ``raykd/distill/METHODS.md`` holds
in the shipped configs and search spaces, so the doc and the files cannot drift apart.

A row names a dotted ``RunConfig`` key (or ``global_batch``: per-worker ``train.batch_size`` times
``scaling.num_workers``), the files it applies to and raykd's value. A search-space entry is its
``base:`` with the entry's ``set:``; a key the space searches must have the value inside its range
(and a searched method parameter must have it as its paper setting, the method's first trial).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from raykd.config import RunConfig, from_dict, load_config, set_dotted
from raykd.distill.paper import paper_params
from raykd.tune.space_file import load_space

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "raykd" / "distill" / "METHODS.md"
HEADER = "| item | paper value (section) | key | in | raykd value | reason where raykd deviates |"
PAPERS = ("SkinDistilViT", "SSD-KD", "HierAttn", "Fusion teacher to tiny CNN")
PAPER_CONFIGS = ("vit_teacher", "skindistilvit", "resnet50_teacher", "ssdkd_resnet50_mobilenetv2",
                 "hierattn_s", "fused_teacher", "fused_teacher_tiny_cnn")
PAPER_SPACES = ("skindistilvit", "ssdkd", "hierattn", "fusion")
NUM_WORKERS = 4  # every paper run: the per-worker batch is the paper's batch / 4


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    paper: str
    item: str
    key: str | None  # None: not a run key ("–")
    targets: tuple[str, ...]
    value: Any
    line: int

    def __str__(self) -> str:
        return f"METHODS.md line {self.line} ({self.paper}: {self.item})"


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def parse_rows(text: str) -> list[Row]:
    """Every row of every table with :data:`HEADER`, under the ``###`` heading it sits in."""
    rows, paper, in_table = [], None, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("### "):
            paper, in_table = line[4:].strip(), False
        elif line.strip() == HEADER:
            in_table = True
        elif in_table and not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 6, f"METHODS.md line {n}: a row needs 6 cells, got {len(cells)}"
            item, _, key_cell, in_cell, value_cell, _ = cells
            key = None if key_cell == "–" else _ticked(key_cell)[0]
            value = None
            if key is not None:
                ticked = _ticked(value_cell)
                assert len(ticked) == 1, f"METHODS.md line {n}: the raykd value must be one `value`"
                value = yaml.safe_load(ticked[0])
            rows.append(Row(paper, item, key, tuple(_ticked(in_cell)) if key else (), value, n))
    return rows


ROWS = parse_rows(DOC.read_text(encoding="utf-8"))
CHECKED = [r for r in ROWS if r.key is not None]


# --------------------------------------------------------------------------------------------------
# The runs a row names
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One run a row can name: its config and what a search draws in it."""

    name: str
    cfg: RunConfig
    searched: dict  # dotted RunConfig key -> Dist
    searched_params: dict  # method parameter -> Dist


@functools.cache
def _space(path: str):
    return load_space(ROOT / path)


@functools.cache
def _config_run(path: str) -> Run:
    return Run(path, load_config(RunConfig, ROOT / path, []), {}, {})


def _space_run(path: str, kind: str, name: str) -> Run:
    space = _space(path)
    raw = copy.deepcopy(space.base)
    searched: dict = {}
    searched_params: dict = {}
    if kind == "teachers":
        t = space.teachers[name]
        settings, student, method, params = dict(t.overrides), t.model or {}, t.method, dict(t.params)
    elif kind == "methods":
        m = space.methods[name]
        settings = dict(m.overrides)
        for key, dist in {**space.shared, **m.search}.items():
            if dist.fixed:
                settings[key] = dist.args[0]
            else:
                searched[key] = dist
        student = space.students[m.students[0]].model if m.students else {}
        method = m.method
        params = {k: d.args[0] for k, d in m.params.items() if d.fixed}
        searched_params = {k: d for k, d in m.params.items() if not d.fixed}
    else:
        settings, student, method, params = {}, space.students[name].model, "baseline", {}
    for key, value in settings.items():
        set_dotted(raw, key, value)
    raw.update(student=dict(student), teacher=None)
    raw.setdefault("distill", {}).update(method=method, params=params)
    raw.setdefault("train", {})["select_metric"] = space.search.metric
    return Run(f"{path}#{kind}.{name}", from_dict(RunConfig, raw, where=f"{path}#{kind}.{name}"), searched,
               searched_params)


def expand(target: str) -> list[Run]:
    """``configs/x.yaml`` or ``search_spaces/x.yaml#<teachers|methods|students>.<name | * | {a,b}>``."""
    path, _, entry = target.partition("#")
    assert (ROOT / path).is_file(), f"{target}: no file {path}"
    if not entry:
        return [_config_run(path)]
    kind, _, sel = entry.partition(".")
    space = _space(path)
    names = {"teachers": space.teachers, "methods": space.methods, "students": space.students}[kind]
    if sel == "*":
        chosen = list(names)
    elif sel.startswith("{") and sel.endswith("}"):
        chosen = [s.strip() for s in sel[1:-1].split(",")]
    else:
        chosen = [sel]
    unknown = [c for c in chosen if c not in names]
    assert not unknown, f"{target}: no {kind} {unknown} in {path} (has {', '.join(names)})"
    return [_space_run(path, kind, c) for c in chosen]


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            expected = float(expected)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            return False
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(_same(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=0.0)
    return actual == expected


def problem(run: Run, key: str, expected: Any) -> str | None:
    """None when ``run`` gives ``key`` the value ``expected``, else what it gives instead."""
    cfg = run.cfg
    if key == "global_batch":
        for part in ("train.batch_size", "scaling.num_workers"):
            if part in run.searched:
                return f"{part} is searched; the global batch must be fixed"
        actual = cfg.train.batch_size * cfg.scaling.num_workers
        return None if _same(actual, expected) else (
            f"global batch {actual} = {cfg.train.batch_size} per worker x {cfg.scaling.num_workers} workers")
    if key.startswith("distill.params."):
        knob = key.removeprefix("distill.params.")
        paper = paper_params(cfg.distill.method)
        if knob not in paper:
            return f"method {cfg.distill.method} has no parameter {knob}"
        if knob in run.searched_params:
            dist = run.searched_params[knob]
            if not dist.contains(expected):
                return f"{knob} is searched over {dist.describe()}, which does not hold it"
            if not _same(paper[knob], expected):
                return f"{knob} is searched and its paper setting (the first trial) is {paper[knob]!r}"
            return None
        actual = getattr(cfg.distill.params, knob)
    elif key in run.searched:
        dist = run.searched[key]
        return None if dist.contains(float(expected) if isinstance(expected, str) else expected) else (
            f"{key} is searched over {dist.describe()}, which does not hold it")
    else:
        actual = _lookup(cfg, key)
    return None if _same(actual, expected) else f"{key} = {actual!r}"


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_methods_md_has_one_settings_table_per_paper():
    assert {r.paper for r in ROWS} == set(PAPERS)
    for paper in PAPERS:
        assert sum(r.paper == paper for r in CHECKED) >= 10, f"{paper}: too few checked rows"


@pytest.mark.parametrize("row", CHECKED, ids=lambda r: f"{r.paper}:{r.item}".replace(" ", "_"))
def test_each_row_of_the_papers_tables_holds_in_the_files_it_names(row):
    assert row.targets, f"{row}: names no file"
    for target in row.targets:
        for run in expand(target):
            why = problem(run, row.key, row.value)
            assert why is None, f"{row}: {run.name}: expected {row.value!r}, got: {why}"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_is_tabled_with_its_global_batch(name):
    path = f"configs/{name}.yaml"
    assert any(path in r.targets for r in CHECKED), f"{path} is in no row of METHODS.md's paper tables"
    batch_rows = [r for r in CHECKED if r.key == "global_batch" and path in r.targets]
    assert len(batch_rows) == 1, f"{path}: needs exactly one global_batch row, has {len(batch_rows)}"


@pytest.mark.parametrize("name", PAPER_SPACES)
def test_every_entry_of_a_paper_space_is_tabled_with_its_global_batch(name):
    path = f"search_spaces/{name}.yaml"
    space = _space(path)
    covered = [run.name for r in CHECKED if r.key == "global_batch" for t in r.targets
               if t.startswith(path + "#") for run in expand(t)]
    expected = [f"{path}#teachers.{t}" for t in space.teachers]
    expected += [f"{path}#methods.{m}" for m in space.methods]
    assert sorted(covered) == sorted(expected), f"{path}: each teacher and method needs one global_batch row"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_keep_the_global_batch_with_four_workers(name):
    cfg = load_config(RunConfig, ROOT / "configs" / f"{name}.yaml", [])
    assert cfg.scaling.num_workers == NUM_WORKERS
    text = (ROOT / "configs" / f"{name}.yaml").read_text().lower()
    batch = cfg.train.batch_size * cfg.scaling.num_workers
    said = f"global batch {batch} = {cfg.train.batch_size} per worker x {NUM_WORKERS} workers"
    assert said in text, f"{name}.yaml: say in a comment how the per-worker batch gives the global batch"


def test_the_table_parser_reads_keys_targets_and_values():
    text = "\n".join([
        "### Paper", "", HEADER, "|---|---|---|---|---|---|",
        "| lr | 0.1 (§1) | `optim.lr` | `configs/a.yaml`, `search_spaces/b.yaml#methods.{kd,rkd}` "
        "| `1.0e-3` | – |",
        "| splits | 80/20 (§2) | – | – | – | at ingest |", "", "after the table",
    ])
    lr, splits = parse_rows(text)
    assert (lr.paper, lr.key) == ("Paper", "optim.lr")
    assert lr.targets == ("configs/a.yaml", "search_spaces/b.yaml#methods.{kd,rkd}")
    assert _same(1e-3, lr.value) and lr.line == 5
    assert splits.key is None and splits.targets == ()


def test_a_searched_method_parameter_must_start_from_the_paper_value():
    run = _space_run("search_spaces/fusion.yaml", "methods", "kd-search")
    # kd's registered paper setting is SSD-KD's T 5, not the fusion paper's T 1
    assert problem(run, "distill.params.temperature", 1.0) is not None
    paper_run = _space_run("search_spaces/fusion.yaml", "methods", "kd")
    assert problem(paper_run, "distill.params.temperature", 1.0) is None
