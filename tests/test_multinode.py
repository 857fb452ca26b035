"""A real 2-node Ray cluster on this machine (``ray start --head`` plus a second raylet joined with
``ray start --address``): a search whose data and output folder one node cannot see fails before
any trial starts, naming the node and the paths.

The second raylet runs in its own mount namespace with an empty tmpfs over the dataset folder and
over the output folder, so it really cannot read the one nor share the other (a node's local disk
would be writable but not shared: the check looks for a file the driver wrote). Root and
``unshare`` are needed; skipped otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raykd.data.synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
PORT = 6419


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _kill_cluster(tag: str) -> None:
    """Stop this test's Ray processes only (``ray stop`` would stop every cluster on the machine)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if tag in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def two_nodes(tmp_path):
    if not _can_unshare():
        pytest.skip("needs root and unshare -m to hide the data from the second node")
    data = tmp_path / "data"
    make_synthetic(data, num_images=60, image_size=32, seed=0)
    temp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    tag = f"127.0.0.1:{PORT}"
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={PORT}", "--num-cpus=1", '--resources={"node_a": 1, "trial_slot": 4}',
            "--include-dashboard=false", f"--ray-client-server-port={PORT + 1}",
            f"--dashboard-agent-listen-port={PORT + 2}", f"--temp-dir={temp}", "--disable-usage-stats"]
    out = tmp_path / "out"
    out.mkdir()
    join = (f"mount -t tmpfs none {data} && mount -t tmpfs none {out} && exec {RAY} start --address={tag} --node-ip-address=127.0.0.1 --num-cpus=1 "
            f"""--resources='{{"node_b": 1}}' --dashboard-agent-listen-port={PORT + 3} --disable-usage-stats""")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": ""}
    try:
        for cmd in (head, ["unshare", "-m", "bash", "-c", join]):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            assert res.returncode == 0, res.stderr[-2000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both raylets registered
            alive = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{tag}', logging_level='ERROR'); "
                                  "print(sum(n['Alive'] for n in ray.nodes()))"], capture_output=True, text=True, env=env)
            if alive.stdout.strip().endswith("2"):
                break
            time.sleep(1)
        else:
            pytest.fail("the second node did not join")
        yield tag, data, out, env
    finally:
        _kill_cluster(tag)
        _kill_cluster(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_a_search_whose_data_a_node_cannot_read_fails_before_any_trial_naming_node_and_path(two_nodes):
    address, data, out, env = two_nodes
    res = subprocess.run(
        [sys.executable, "-m", "raykd.tune", "--space", str(ROOT / "search_spaces" / "smoke.yaml"),
         "--address", address, "--set", f"output_dir={out}", "--set", f"base.data.path={data}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    print(res.stderr[-3000:])
    assert res.returncode == 2
    assert "storage is not reachable from every node" in res.stderr
    assert f"cannot read base.data.path={data} (no manifest.json there)" in res.stderr
    assert f"does not see the driver's files in output_dir={out}/tune-smoke (not storage shared" in res.stderr
    assert res.stderr.count("cannot read base.data.path") == 1  # the head node reads it and shares the output
    assert not (out / "tune-smoke" / "runs").exists() and not (out / "tune-smoke" / "teachers").exists()
