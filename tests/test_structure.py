"""The repository's shape: checks on its files, read from disk (nothing here imports raykd or starts Ray).

- No import cycle between raykd modules, nor between raykd packages; an import inside a function
  counts (only ``if TYPE_CHECKING:`` imports, which never run, do not).
- No function of raykd is longer than 60 lines, and an import inside a function says why it is
  there (``# lazy: ...``: a heavy or optional dependency kept off the import path).
- Run-folder file names are spelled in ``raykd/artifact/rundir.py`` only; the search never names
  a method (``"cascade"``) to special-case it.
- The documentation site (``mkdocs.yml``, ``docs/``) builds in strict mode: a broken internal link
  or anchor, or a page left out of the nav, fails the build.
- ``README.md`` stays a short front door whose relative links all resolve.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
# a markdown link's target: ](target) or ](target "title"); images included
_LINK = re.compile(r"\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")


def test_docs_build_strict(tmp_path):
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict",
           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner, not a build warning
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    targets = [m.group(1) or m.group(2) for m in _LINK.finditer(text)]
    assert targets, "README.md links nowhere (it should link into docs/)"
    broken = []
    for target in targets:
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            broken.append(target)
    assert not broken, f"README.md links to files that do not exist: {broken}"


# -- the import graph ----------------------------------------------------------------------------

PACKAGE = ROOT / "raykd"
MAX_FUNCTION_LINES = 60
RUN_FILES = {"summary.json", "metrics.json", "best", "checkpoint", "timing.json", "trial.json",
             "trial_timing.json", "cascade.json", "config.yaml", "history.jsonl"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.Module, here: str, known: set[str]) -> set[str]:
    """The raykd modules ``here`` imports, at module level or inside functions (not under ``if
    TYPE_CHECKING``); ``from pkg import name`` counts as ``pkg.name`` where that is a module."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".")[: len(here.split(".")) - node.level]
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != here}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _module_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(tree, name, set(modules)) for name, tree in modules.items()}


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])  # raykd.tune.trial -> raykd.tune; raykd.config stays


def test_no_import_cycle_between_raykd_modules():
    assert _cycles(_module_graph()) == [], "an import cycle (imports inside functions count)"


def test_no_import_cycle_between_raykd_packages():
    graph: dict[str, set[str]] = {}
    for src, deps in _module_graph().items():
        graph.setdefault(_package_of(src), set()).update(
            _package_of(d) for d in deps if _package_of(d) != _package_of(src))
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_imports_in_functions_and_skips_type_checking_ones():
    known = {"raykd.a", "raykd.b", "raykd.c"}
    a = ast.parse("from raykd.b import x\nif TYPE_CHECKING:\n    from raykd.c import y\n")
    b = ast.parse("def f():\n    import raykd.a\n")
    c = ast.parse("from raykd import a\n")
    graph = {name: _imports(tree, name, known) for name, tree in zip(sorted(known), (a, b, c))}
    assert graph == {"raykd.a": {"raykd.b"}, "raykd.b": {"raykd.a"}, "raykd.c": {"raykd.a"}}
    assert _cycles(graph) == [["raykd.a", "raykd.b"]]


# -- code shape ----------------------------------------------------------------------------------


def test_no_function_is_longer_than_60_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def _path_strings(tree: ast.Module):
    """File-like literals, and bare names where they join a path (``run_dir / "best"``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            yield node.value
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              and isinstance(node.right, ast.Constant)):
            yield node.right.value


def test_run_folder_file_names_are_spelled_in_rundir_only():
    spellers = {name: sorted(RUN_FILES.intersection(_path_strings(tree)))
                for name, tree in _modules().items()}
    assert {name for name, found in spellers.items() if found} <= {"raykd.artifact.rundir"}


def test_the_search_never_special_cases_a_method_by_name():
    found = [f"{name}:{node.lineno}" for name, tree in _modules().items() if name.startswith("raykd.tune.")
             for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value == "cascade"]
    assert found == []


def _import_blocks(fn: ast.AST):
    """The import statements inside ``fn``, grouped into runs of consecutive statements."""
    block: list[ast.stmt] = []
    for node in ast.walk(fn):
        for body in (getattr(node, f, None) for f in ("body", "orelse", "finalbody", "handlers")):
            if not isinstance(body, list):
                continue
            for stmt in body:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    block.append(stmt)
                elif block:
                    yield block
                    block = []
            if block:
                yield block
                block = []


def test_an_import_inside_a_function_says_why_it_is_lazy():
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for block in _import_blocks(fn):
                text = lines[block[0].lineno - 1:block[-1].end_lineno]
                if not any("# lazy" in line for line in text):
                    silent.append(f"{path.relative_to(ROOT)}:{block[0].lineno}: {text[0].strip()}")
    assert silent == [], "imports inside functions without a '# lazy: why' comment"
