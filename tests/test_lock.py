"""The lock files in ``requirements/`` pin every package of the install, with hashes, and match pyproject.

- Each lock parses (``packaging``): one ``name==version`` per entry, no duplicate, every entry with
  at least one ``--hash=sha256:`` of 64 hex digits.
- Every direct dependency of pyproject.toml is in ``lock.txt`` and ``lock-test.txt`` at exactly its
  pinned version, the test extra in ``lock-test.txt`` too; ``lock-cpu.txt`` has them all but torch
  and torchvision (the CPU image takes those from PyTorch's CPU index).
- ``lock.txt`` and ``lock-cpu.txt`` are ``lock-test.txt``'s entries (the images run what CI tests);
  ``lock-cpu.txt`` leaves out exactly torch, torchvision, the CUDA-only packages of
  ``cpu-overrides.txt`` and what only they need; those are the Linux-only requirements of the
  installed torch when it is PyPI's build.
- ``.ci/run`` runs the hash-checked install, then the README's test command verbatim; the
  Dockerfile installs its locks with ``--require-hashes`` and the project with ``--no-deps``.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
LOCKS = ["lock-test.txt", "lock.txt", "lock-cpu.txt"]
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})$")
README_TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest')


def parse_lock(path: Path) -> dict[str, tuple[str, frozenset[str], frozenset[str]]]:
    """{canonical name: (version, sha256 hashes, names in its ``# via`` annotation)}."""
    entries: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {}
    logical: list[str] = []
    vias: dict[str, set[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            # "    # via x" or "    # via" followed by "    #   x" lines, under the current entry
            words = stripped.lstrip("#").split()
            if current and raw.startswith("    #") and words and not words[0].startswith("-"):
                names = words[1:] if words[0] == "via" else words
                vias[current].update(canonicalize_name(n) for n in names if not n.startswith(("-", "(")) and "/" not in n)
            continue
        if not stripped:
            continue
        logical.append(stripped.removesuffix("\\").strip())
        if stripped.endswith("\\"):
            continue
        line = " ".join(logical)
        logical = []
        spec, _, options = line.partition(" --")
        options = f"--{options}".split() if options else []
        req = Requirement(spec)
        assert not req.marker and not req.extras and not req.url, f"{path.name}: {line[:80]}"
        (pin,) = req.specifier
        assert pin.operator == "==", f"{path.name}: {req.name} is not pinned with =="
        hashes = set()
        for option in options:
            match = HASH.fullmatch(option)
            assert match, f"{path.name}: {req.name}: unexpected option {option!r}"
            hashes.add(match.group(1))
        name = canonicalize_name(req.name)
        assert name not in entries, f"{path.name}: {req.name} twice"
        assert hashes, f"{path.name}: {req.name} has no sha256 hash"
        entries[name] = (pin.version, frozenset(hashes), frozenset())
        current = name
        vias[name] = set()
    assert not logical, f"{path.name} ends inside a continued line"
    return {name: (version, hashes, frozenset(vias[name])) for name, (version, hashes, _) in entries.items()}


def pyproject_pins(extra: str | None = None) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    pins = {}
    for dep in deps:
        req = Requirement(dep)
        (pin,) = req.specifier
        assert pin.operator == "==", dep
        pins[canonicalize_name(req.name)] = pin.version
    return pins


@pytest.mark.parametrize("name", LOCKS)
def test_lock_parses_with_one_pinned_and_hashed_entry_per_package(name):
    entries = parse_lock(REQ / name)
    assert len(entries) > 100
    assert all(hashes for _, hashes, _ in entries.values())


def test_parse_lock_refuses_an_entry_without_a_hash(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("six==1.17.0 \\\n    --hash=sha256:" + "0" * 64 + "\nidna==3.20\n")
    with pytest.raises(AssertionError, match="idna has no sha256 hash"):
        parse_lock(bad)
    bad.write_text("six>=1.17.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(AssertionError, match="not pinned"):
        parse_lock(bad)


@pytest.mark.parametrize("name, extra", [("lock-test.txt", None), ("lock-test.txt", "test"),
                                         ("lock.txt", None), ("lock-cpu.txt", None)])
def test_every_direct_dependency_is_locked_at_its_pinned_version(name, extra):
    entries = parse_lock(REQ / name)
    pins = pyproject_pins(extra)
    if name == "lock-cpu.txt":
        pins = {n: v for n, v in pins.items() if n not in ("torch", "torchvision")}
        assert "torch" not in entries and "torchvision" not in entries
    wrong = {n: (v, entries.get(n, ("missing",))[0]) for n, v in pins.items()
             if n not in entries or entries[n][0] != v}
    assert not wrong, f"{name}: pyproject pin vs lock: {wrong}"


@pytest.mark.parametrize("name", ["lock.txt", "lock-cpu.txt"])
def test_image_locks_are_the_ci_locks_entries(name):
    ci = parse_lock(REQ / "lock-test.txt")
    differ = [n for n, (v, h, _) in parse_lock(REQ / name).items() if n not in ci or ci[n][:2] != (v, h)]
    assert not differ, f"{name} differs from lock-test.txt in {differ}"


def _cpu_overrides() -> set[str]:
    lines = (REQ / "cpu-overrides.txt").read_text().splitlines()
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip() and not line.startswith("#")}


def test_cpu_lock_leaves_out_exactly_torch_and_its_cuda_only_packages():
    full, cpu = parse_lock(REQ / "lock.txt"), parse_lock(REQ / "lock-cpu.txt")
    cuda_only = _cpu_overrides()
    while True:  # and what only they need (torch's other requirements stay: its CPU build has them)
        more = {n for n, (_, _, via) in full.items() if n not in cuda_only and via and via <= cuda_only}
        if not more:
            break
        cuda_only |= more
    assert set(full) - set(cpu) == {"torch", "torchvision", *cuda_only}
    assert not [n for n in cpu if n.startswith(("nvidia-", "cuda-")) or n == "triton"]


def test_cpu_overrides_are_the_linux_only_requirements_of_pypis_torch():
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed")
    linux_only = {canonicalize_name(Requirement(r).name) for r in requires if 'platform_system == "Linux"' in r}
    if not linux_only:
        pytest.skip("the installed torch is not PyPI's Linux build")
    assert _cpu_overrides() == linux_only


def test_torch_cpu_file_when_present_pins_pyprojects_torch():
    path = REQ / "torch-cpu.txt"
    if not path.exists():
        pytest.skip("written by requirements/update.sh where PyTorch's CPU index can be reached")
    entries = parse_lock(path)
    pins = {n: v for n, v in pyproject_pins().items() if n in ("torch", "torchvision")}
    assert {n: v.split("+")[0] for n, (v, _, _) in entries.items()} == pins


def test_ci_installs_the_lock_with_hashes_then_runs_the_readme_command():
    run = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert README_TEST_COMMAND in readme
    commands = [line for line in re.sub(r"\\\n\s*", "", run).splitlines() if line and not line.startswith("#")]
    assert commands[-1] == README_TEST_COMMAND
    (locked,) = [c for c in commands if "requirements/lock-test.txt" in c]
    assert commands.index(locked) < len(commands) - 1
    assert all(flag in locked.split() for flag in ("--require-hashes", "--no-deps"))


def test_dockerfile_installs_its_locks_with_hashes_and_the_project_without_dependencies():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "cluster/Dockerfile").read_text())
    for lock in ("requirements/lock.txt", "requirements/lock-cpu.txt"):
        assert lock in text and (ROOT / lock).is_file()
    assert '--require-hashes --only-binary :all: -r "${lock}"' in text
    (project,) = [line for line in text.splitlines() if "-e ." in line]
    assert "--no-deps" in project.split()
