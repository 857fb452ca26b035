"""Serving fails closed: without ``RAYKD_API_KEY`` it starts on a loopback bind only, unless
unauthenticated serving is allowed on purpose. No Ray cluster and no Serve instance here.

- The rule itself (:func:`raykd.serve.guard.check_bind`), for loopback IPv4/IPv6/``localhost``,
  ``0.0.0.0``, ``::`` and LAN addresses, with and without a key and with the override.
- ``python -m raykd.serve --host 0.0.0.0`` without a key exits 2 with the fixes, before Ray starts.
- :func:`raykd.serve.app.build_app` (``serve run`` / ``serve deploy``) applies the same rule to the
  Serve HTTP host it reads, and refuses when it cannot read one.
- Every shipped Serve config (``deploy/*.yaml``, and any in ``cluster/``) binds loopback, or takes
  the key from a Kubernetes Secret, or is built by ``build_app`` without the override from a cluster
  whose nodes the file says must carry the key; no file holds a literal key.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raykd.serve.__main__ import args_to_serve_args, parse_args
from raykd.serve.guard import API_KEY_ENV, UnauthenticatedBind, check_bind, is_loopback
from raykd.serve.options import ServeArgs

ROOT = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef"
LOOPBACK = ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
EXPOSED = ["0.0.0.0", "::", "192.168.1.10", "10.0.0.5", "fe80::1", "example.com", "", None]
FIXES = [API_KEY_ENV, "openssl rand -hex 32", "127.0.0.1", "--allow-unauthenticated"]


# -- the rule -------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_hosts_are_loopback(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", EXPOSED)
def test_all_interfaces_lan_addresses_names_and_an_unknown_host_are_not(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("host", LOOPBACK + EXPOSED)
@pytest.mark.parametrize("allow", [False, True])
def test_with_a_key_every_bind_serves_silently(host, allow):
    assert check_bind(host, KEY, allow) is None


@pytest.mark.parametrize("host", LOOPBACK)
def test_without_a_key_a_loopback_bind_serves_with_a_warning(host):
    warning = check_bind(host, None)
    assert API_KEY_ENV in warning and "this machine only" in warning and "without authentication" in warning


@pytest.mark.parametrize("host", EXPOSED)
def test_without_a_key_a_bind_others_can_reach_is_refused_naming_the_fixes(host):
    with pytest.raises(UnauthenticatedBind) as info:
        check_bind(host, None)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message  # one paragraph
    for fix in FIXES:
        assert fix in message, fix
    assert (host or "could not be read") in message
    with pytest.raises(UnauthenticatedBind):
        check_bind(host, "", False)  # a blank key is no key


@pytest.mark.parametrize("host", EXPOSED)
def test_the_override_serves_openly_with_a_warning(host):
    warning = check_bind(host, None, True)
    assert API_KEY_ENV in warning and "other machines" in warning


def test_the_fixes_are_spelled_the_way_the_caller_writes_them():
    with pytest.raises(UnauthenticatedBind, match=r"\(bind here\).*pass do-it to serve openly"):
        check_bind("0.0.0.0", None, bind_fix="bind here", override_fix="do-it")


def test_the_flag_is_generated_from_serve_args_and_off_by_default():
    assert args_to_serve_args(parse_args(["--family", "f.json"])).allow_unauthenticated is False
    ns = parse_args(["--family", "f.json", "--allow-unauthenticated"])
    assert args_to_serve_args(ns).allow_unauthenticated is True
    assert ServeArgs(family="f", allow_unauthenticated="true").allow_unauthenticated  # serve run's strings


# -- raykd serve ----------------------------------------------------------------------------------

def _serve(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "raykd.serve", *args], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=timeout)
    return res, time.monotonic() - start


@pytest.mark.parametrize("extra", [[], ["--direct-port", "8001"]])
def test_raykd_serve_on_all_interfaces_without_a_key_exits_2_before_ray_starts(extra):
    res, took = _serve("--host", "0.0.0.0", "--model", "X", *extra, timeout=60)
    assert res.returncode == 2, res.stderr
    assert took < 20, f"took {took:.1f} s: the refusal must come before Ray starts"
    assert res.stderr.startswith("error: refusing to serve without authentication on 0.0.0.0"), res.stderr
    for fix in FIXES:
        assert fix in res.stderr, fix
    assert "Traceback" not in res.stderr and "Started a local Ray instance" not in res.stderr


def test_raykd_serve_on_loopback_without_a_key_passes_the_check_with_a_warning():
    # It then stops at the missing model file, still before Ray starts.
    res, _ = _serve("--host", "127.0.0.1", "--model", "does-not-exist.onnx", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "this machine only" in res.stderr and "refusing" not in res.stderr
    assert "does-not-exist.onnx" in res.stderr


# -- build_app (serve run / serve deploy) ---------------------------------------------------------

@pytest.fixture
def app_module(monkeypatch):
    from raykd.serve import app

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return app


def _build(app, monkeypatch, host: str | None, **args):
    monkeypatch.setattr(app, "serve_http_host", lambda: host)
    return app.build_app(ServeArgs(models=[str(ROOT / "does-not-exist.onnx")], **args))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", None])
def test_build_app_refuses_a_host_others_can_reach_or_an_unknown_one_without_a_key(app_module, monkeypatch,
                                                                                    host):
    with pytest.raises(UnauthenticatedBind, match="allow_unauthenticated: true") as info:
        _build(app_module, monkeypatch, host)
    assert API_KEY_ENV in str(info.value) and "http_options: {host: 127.0.0.1}" in str(info.value)


@pytest.mark.parametrize(("host", "key", "allow"), [("127.0.0.1", None, False), ("0.0.0.0", KEY, False),
                                                    (None, KEY, False), ("0.0.0.0", None, True)])
def test_build_app_goes_on_to_the_family_when_the_rule_allows(app_module, monkeypatch, host, key, allow):
    if key:
        monkeypatch.setenv(API_KEY_ENV, key)
    with pytest.raises(FileNotFoundError, match="does-not-exist.onnx"):  # past the check: the models
        _build(app_module, monkeypatch, host, allow_unauthenticated=allow)


def test_the_serve_host_is_unknown_without_a_ray_connection():
    import ray

    from raykd.raycompat import serve_http_host

    if ray.is_initialized():
        pytest.skip("another test of this session connected to Ray")
    assert serve_http_host() is None
    assert not ray.is_initialized()  # it never starts or joins a cluster


# -- the shipped Serve configs --------------------------------------------------------------------

def _yaml_files() -> list[Path]:
    return sorted([*ROOT.glob("deploy/*.yaml"), *ROOT.glob("cluster/*.yaml")])


def _serve_configs(doc) -> list[dict]:
    """The Serve configs in a parsed file: the file itself, or a RayService's ``serveConfigV2``."""
    if not isinstance(doc, dict):
        return []
    if "applications" in doc:
        return [doc]
    config = (doc.get("spec") or {}).get("serveConfigV2")
    return [yaml.safe_load(config)] if isinstance(config, str) else []


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def _containers(doc) -> list[dict]:
    return [c for n in _walk(doc) if isinstance(n, dict) and isinstance(n.get("containers"), list)
            for c in n["containers"]]


def _key_from_secret(container: dict) -> bool:
    return any(e.get("name") == API_KEY_ENV and "secretKeyRef" in (e.get("valueFrom") or {})
               for e in container.get("env", []))


def _serve_config_files() -> list[Path]:
    return [p for p in _yaml_files() if any(_serve_configs(d) for d in yaml.safe_load_all(p.read_text()))]


def test_the_shipped_serve_configs_are_found():
    rels = {p.relative_to(ROOT).as_posix() for p in _serve_config_files()}
    assert rels >= {"deploy/serve_config.yaml", "deploy/serve_config_cpu.yaml",
                    "deploy/kuberay-rayservice.yaml"}


@pytest.mark.parametrize("path", _serve_config_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_serve_app_binds_loopback_or_gets_the_key_from_a_secret(path, app_module, monkeypatch):
    text = path.read_text()
    for doc in yaml.safe_load_all(text):
        containers = _containers(doc)
        for config in _serve_configs(doc):
            host = (config.get("http_options") or {}).get("host")
            for app in config["applications"]:
                if is_loopback(host):
                    continue
                if containers:  # Kubernetes: every pod (replicas and the build task) has the Secret's key
                    assert all(_key_from_secret(c) for c in containers), (path, app["name"])
                    continue
                # A cluster's own config: raykd's build_app, without the override, refuses to build
                # without the key, and the file says every node must carry it.
                assert app["import_path"] == "raykd.serve.app:build_app", (path, app["name"])
                assert not app["args"].get("allow_unauthenticated"), (path, app["name"])
                header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
                assert re.search(rf"{API_KEY_ENV} must be set on every node", header), path
                monkeypatch.setattr(app_module, "serve_http_host", lambda host=host: host)
                with pytest.raises(UnauthenticatedBind):
                    app_module.build_app(ServeArgs.model_validate(app["args"]))


SHIPPED = sorted(p for p in [*ROOT.glob("deploy/*"), *ROOT.glob("cluster/*")] if p.is_file())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_shipped_file_holds_a_literal_api_key(path):
    text = path.read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assigned = [line for line in code if re.search(rf"{API_KEY_ENV}\s*[:=]\s*[\"']?[^\s\"'$]", line)]
    assert not assigned, (path, assigned)
    if path.suffix != ".yaml":
        return
    for doc in yaml.safe_load_all(text):
        nodes = list(_walk(doc)) + [n for c in _serve_configs(doc) for n in _walk(c)]
        for node in nodes:
            if isinstance(node, dict):
                assert API_KEY_ENV not in node, (path, "a key under env_vars or a mapping")
                if node.get("name") == API_KEY_ENV:
                    assert "value" not in node and "valueFrom" in node, (path, node)
