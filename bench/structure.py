"""Structure counts of the raykd package, read from its source (nothing is imported or run).

    python bench/structure.py            # a table
    python bench/structure.py --json     # the same as JSON

- functions over 60 lines (with their names),
- the modules that spell a run-folder file name as a string literal ("summary.json", "best", ...),
- package import cycles (raykd.<package> -> raykd.<package>, at package level, every import,
  lazy ones inside functions too),
- ``"cascade"`` string literals in ``raykd/tune`` (a method's special case leaking into the search).

The run-time counts (model builds and latency measurements per trial) are asserted by
``tests/tune/test_trial_counts.py``.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "raykd"
RUN_FILES = {"summary.json", "metrics.json", "best", "checkpoint", "timing.json", "trial.json",
             "trial_timing.json", "cascade.json", "config.yaml", "history.jsonl"}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT.parent)): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def long_functions(trees: dict[str, ast.Module], limit: int = 60) -> list[str]:
    out = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path}:{node.name} ({n})")
    return out


def _strings(tree: ast.Module):
    """File-like literals anywhere, and bare names (``"best"``) where they join a path (``dir / "best"``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            yield node.value
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            yield node.right.value


def run_file_spellers(trees: dict[str, ast.Module]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path, tree in trees.items():
        names = sorted({s for s in _strings(tree) if s in RUN_FILES})
        if names:
            out[path] = names
    return out


def _package(path: str) -> str:
    parts = Path(path).with_suffix("").parts  # raykd/tune/trial -> raykd.tune
    return ".".join(parts[:2]) if len(parts) > 2 else ".".join(parts)


def package_imports(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        src = _package(path)
        here = Path(path).with_suffix("").parts
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(here[: len(here) - node.level])
                    names = [".".join(base + ([node.module] if node.module else []))]
                else:
                    names = [node.module or ""]
            for name in names:
                if name.startswith("raykd."):
                    parts = name.split(".")
                    dst = ".".join(parts[:2])
                    if (ROOT.parent / Path(*parts[:2])).is_dir() or (ROOT.parent / Path(*parts[:2])).with_suffix(".py").is_file():
                        if dst != src:
                            graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def cascade_checks(trees: dict[str, ast.Module]) -> list[str]:
    return [f"{p}:{n.lineno}" for p, t in trees.items() if p.startswith("raykd/tune/")
            for n in ast.walk(t) if isinstance(n, ast.Constant) and n.value == "cascade"]


def measure() -> dict:
    trees = _modules()
    spellers = run_file_spellers(trees)
    return {
        "functions_over_60_lines": long_functions(trees),
        "modules_spelling_run_files": spellers,
        "package_import_cycles": cycles(package_imports(trees)),
        "cascade_strings_in_tune": cascade_checks(trees),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    args = ap.parse_args()
    m = measure()
    if args.json:
        print(json.dumps(m, indent=2))
        return
    print(f"functions over 60 lines:        {len(m['functions_over_60_lines'])}")
    for f in m["functions_over_60_lines"]:
        print(f"    {f}")
    print(f"modules spelling run-file names: {len(m['modules_spelling_run_files'])}")
    for p, names in m["modules_spelling_run_files"].items():
        print(f"    {p}: {', '.join(names)}")
    print(f"package import cycles:          {len(m['package_import_cycles'])}")
    for c in m["package_import_cycles"]:
        print(f"    {' <-> '.join(c)}")
    print(f"\"cascade\" strings in tune:      {len(m['cascade_strings_in_tune'])}")


if __name__ == "__main__":
    main()
