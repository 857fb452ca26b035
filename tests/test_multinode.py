"""A real 2-node Ray cluster on this machine (``ray start --head`` plus a second raylet joined with
``ray start --address``): a search whose data and output folder one node cannot see fails before
any trial starts, naming the node and the paths.

The second raylet runs in its own mount namespace with an empty tmpfs over the dataset folder and
over the output folder, so it really cannot read the one nor share the other (a node's local disk
would be writable but not shared: the check looks for a file the driver wrote). Root and
``unshare`` are needed; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raykd.data.synthetic import make_synthetic

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


def _start_two_nodes(tmp_path: Path, data: Path, out: Path, *, hide: bool, env_extra: dict | None = None,
                     join: bool = True, port: int = PORT):
    """Start the head (node_a) and a second raylet (node_b), 1 CPU each; with ``hide`` the second
    runs in its own mount namespace with empty tmpfs over ``data`` and ``out``. Returns the address,
    the environment to talk to it, the temp dir and a function that joins the second node (already
    called unless ``join`` is False); stop it all with :func:`_kill_cluster`."""
    PORT = port  # noqa: N806 - the ports below count from it
    temp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    tag = f"127.0.0.1:{PORT}"
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={PORT}", "--num-cpus=1",
            '--resources={"node_a": 1, "trial_slot": 4}',
            f"--ray-client-server-port={PORT + 1}", f"--dashboard-port={PORT + 4}",
            f"--dashboard-agent-listen-port={PORT + 2}", f"--temp-dir={temp}", "--disable-usage-stats"]
    if hide:
        head.insert(5, "--include-dashboard=false")
    second = (f"exec {RAY} start --address={tag} --node-ip-address=127.0.0.1 --num-cpus=1 "
              f"""--resources='{{"node_b": 1, "trial_slot": 4}}' --dashboard-agent-listen-port={PORT + 3} """
              "--disable-usage-stats")
    if hide:
        second = ["unshare", "-m", "bash", "-c", f"mount -t tmpfs none {data} && mount -t tmpfs none {out} && {second}"]
    else:
        second = ["bash", "-c", second]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": "",
           **(env_extra or {})}

    def run(cmd: list[str]) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 0, res.stderr[-2000:]

    def alive() -> int:
        res = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{tag}', logging_level='ERROR'); "
                              "print(sum(n['Alive'] for n in ray.nodes()))"], capture_output=True, text=True, env=env)
        return int(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else 0

    def join_second() -> None:
        run(second)
        deadline = time.monotonic() + 60
        while alive() < 2:  # both raylets registered
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)

    run(head)
    if join:
        join_second()
    return tag, env, temp, join_second


@pytest.fixture
def two_nodes(tmp_path):
    if not _can_unshare():
        pytest.skip("needs root and unshare -m to hide the data from the second node")
    data = tmp_path / "data"
    make_synthetic(data, num_images=60, image_size=32, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    temp = None
    try:
        tag, env, temp, _ = _start_two_nodes(tmp_path, data, out, hide=True)
        yield tag, data, out, env
    finally:
        _kill_cluster(f"127.0.0.1:{PORT}")
        if temp is not None:
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


def _raylet_pid(resource: str, *also: str) -> int:
    """The pid of the raylet started with ``resource`` (and the strings ``also``, e.g. its cluster's
    address; never killed by name: other clusters may run)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/raylet") and all(any(x.encode() in a for a in argv) for x in (resource, *also)):
            return int(pid)
    raise AssertionError(f"no raylet with {(resource, *also)}")


def _node_names(address: str, env: dict) -> dict[str, str]:
    """Node id -> "node_a" / "node_b", from each node's custom resource (dead nodes included)."""
    script = (f"import json, ray; ray.init(address='{address}', logging_level='ERROR'); "
              "print(json.dumps({n['NodeID']: next(k for k in ('node_a', 'node_b') if k in n['Resources'] "
              "or not n['Alive'] and k == 'node_b') for n in ray.nodes()}))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shared_two_nodes(tmp_path_factory):
    """Two nodes that both see the data and the output (module-scoped: the search runs on it, then
    the kill test, which must stay last, takes node_b away)."""
    root = tmp_path_factory.mktemp("twonodes")
    data, out = root / "data", root / "out"
    make_synthetic(data, num_images=240, image_size=32, seed=0)
    out.mkdir()
    temp = None
    try:
        address, env, temp, join_second = _start_two_nodes(root, data, out, hide=False, join=False, env_extra={
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",  # a group that cannot be placed is retried sooner
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",  # a lost node is seen in ~3 s
        })
        yield address, data, out, env, join_second
    finally:
        _kill_cluster(f"127.0.0.1:{PORT}")
        if temp is not None:
            _kill_cluster(str(temp))
            shutil.rmtree(temp, ignore_errors=True)


def test_a_node_that_joins_mid_search_gets_trials(shared_two_nodes, capsys):
    """The search starts on the head alone (1 CPU: 2 trials of 0.5 CPU at once); node_b joins once
    the first trial runs, the search's concurrency follows the cluster and trials run on both."""
    address, data, out, env, join_second = shared_two_nodes
    t0 = time.monotonic()
    runs = out / "tune-smoke" / "runs"
    with (out / "search.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raykd.tune", "--space", str(ROOT / "search_spaces" / "smoke.yaml"),
             "--address", address, "--set", f"output_dir={out}", "--set", f"base.data.path={data}",
             # enough trials that some are still to start once node_b has joined (its start takes ~5-10 s)
             "--set", "base.train.epochs=2", "--set", "budget.num_samples=6"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while not any(runs.glob("*/trial.json")):
            assert proc.poll() is None, (out / "search.log").read_text()[-4000:]
            assert time.monotonic() - t0 < 400, "no trial started within 400 s"
            time.sleep(0.5)
        join_second()
        joined_s = time.monotonic() - t0
        rc = proc.wait(timeout=600)
    text = (out / "search.log").read_text()
    assert rc == 0, text[-4000:]
    names = _node_names(address, env)
    trials = [json.loads(p.read_text()) for p in sorted(runs.glob("*/trial.json"))]
    placed = [names[t["node"]] for t in trials]
    with capsys.disabled():
        print(f"\nsearch: node_b joined at {joined_s:.0f} s; {len(trials)} trials in "
              f"{time.monotonic() - t0:.0f} s, on {placed}")
        print("  " + "".join(line for line in text.splitlines(keepends=True) if "fits" in line).strip())
    assert len(trials) == 6 and set(placed) == {"node_a", "node_b"}
    assert "the cluster now fits 4 trials at once (was 2)" in text


def _kill_node_b_mid_run(argv: list[str], run: Path, env: dict, log_path: Path, *also: str) -> dict:
    """Run ``python -m raykd.train argv``; SIGKILL node_b's raylet once the run's first checkpoint is
    written; wait for the end. Returns the exit code, the log, the epochs and worker groups recorded
    and the epochs the run resumed from."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "raykd.train", *argv], stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)
        deadline = time.monotonic() + 300
        while not any(run.glob("checkpoint_*")):
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s\n" + log_path.read_text()[-4000:]
            time.sleep(0.5)
        killed_after = len(json.loads((run / "metrics.json").read_text()))
        t_kill = time.monotonic()
        os.kill(_raylet_pid("node_b", *also), signal.SIGKILL)
        rc = proc.wait(timeout=500)
    text = log_path.read_text()
    assert rc == 0, text[-6000:]
    resumed = sorted(set(re.findall(r"resuming \S+ from epoch \d+ \(best [^)]*\)", text)))
    return {"text": text, "killed_after": killed_after, "after_kill_s": time.monotonic() - t_kill,
            "history": json.loads((run / "metrics.json").read_text()),
            "workers": json.loads((run / "workers.json").read_text()), "resumed": resumed,
            "resumed_from": [int(r.split()[4]) for r in resumed]}


def _print_kill_story(title: str, out: dict, names: dict[str, str]) -> None:
    print(f"\n{title}:")
    for i, w in enumerate(out["workers"]):
        print(f"  worker group {i + 1}: {w['world_size']} worker(s), ranks on {[names[n] for n in w['nodes']]}")
        if i == 0:
            print(f"  SIGKILL node_b's raylet after epoch {out['killed_after']} was checkpointed")
    print(f"  {'; '.join(out['resumed'])}; the run ended {out['after_kill_s']:.0f} s after the kill")
    print(f"  epochs recorded: {[(r['epoch'], r['world_size']) for r in out['history']]} (epoch, workers)")


def test_a_lost_node_shrinks_the_ddp_run_which_finishes_from_its_checkpoint(shared_two_nodes, tmp_path, capsys):
    """Elastic (``scaling.min_workers``): 2 DDP workers, one per node; node_b's raylet is SIGKILLed
    after the first checkpoint. The run restarts elastically with 1 worker on node_a (its 0.25 spare
    CPU left to Ray Data), resumes from the checkpoint and records every epoch once."""
    address, data, out, env, _ = shared_two_nodes
    names = _node_names(address, env)
    epochs = 4
    cfg = tmp_path / "twonode.yaml"
    cfg.write_text(
        f"name: twonode\noutput_dir: {out}\ndata: {{path: {data}}}\n"
        "student: {name: raykd_tiny_cnn, image_size: 32}\ndistill: {method: baseline}\n"
        "optim: {name: adamw, lr: 3.0e-3}\n"
        "scaling: {num_workers: 2, min_workers: 1, cpus_per_worker: 0.75, placement: spread, executor: trainer}\n"
        f"train: {{epochs: {epochs}, batch_size: 16, recipe: light, max_failures: 3, resource_wait_s: 120}}\n")
    res = _kill_node_b_mid_run(["--config", str(cfg), "--address", address], out / "twonode", env,
                               tmp_path / "train.log", f":{PORT}")
    with capsys.disabled():  # the story of the run, in CI's output too
        _print_kill_story("2-node kill test, elastic", res, names)
    history, workers = res["history"], res["workers"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))  # continuous, each epoch once
    first, last = workers[0], workers[-1]
    assert sorted(names[n] for n in first["nodes"]) == ["node_a", "node_b"]  # one worker per node
    assert last["world_size"] == 1 and [names[n] for n in last["nodes"]] == ["node_a"]
    assert history[0]["world_size"] == 2 and history[-1]["world_size"] == 1
    assert res["resumed_from"] and min(res["resumed_from"]) >= res["killed_after"]  # at most the epoch in flight is lost
    summary = json.loads((out / "twonode" / "summary.json").read_text())
    assert summary["epochs"] == epochs and summary["test"]


def test_a_search_with_its_outputs_in_s3_runs_on_two_nodes_that_share_no_disk(s3, s3_dataset, tmp_path, capsys):
    """The data and the outputs live in an S3 bucket; each node works in its own mirror folder
    (node_b's is a private tmpfs at the same path): the teacher trained on one node reaches the
    distilling trials on the other through the bucket, and the driver's copy ends complete."""
    if not _can_unshare():
        pytest.skip("needs root and unshare -m to give the second node its own disk")
    from tests.conftest import s3_listing

    mirror, hidden = tmp_path / "mirror", tmp_path / "nothing"
    mirror.mkdir()
    hidden.mkdir()
    temp = None
    try:
        # its own ports: the module's shared cluster (PORT) is still up
        address, env, temp, _ = _start_two_nodes(tmp_path, hidden, mirror, hide=True, port=PORT + 10)
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "raykd.tune", "--space", str(ROOT / "search_spaces" / "smoke.yaml"),
             "--address", address, "--set", f"output_dir={s3('twonode')}", "--set", f"mirror_dir={mirror}",
             "--set", f"base.data.path={s3_dataset}", "--set", "base.train.epochs=1"],
            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        wall = time.monotonic() - t0
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        names = _node_names(address, env)
        node_b_disk = Path(f"/proc/{_raylet_pid('node_b', f':{PORT + 10}')}/root{mirror}")  # its mount namespace's view
        on_node_b = {p.relative_to(node_b_disk).as_posix() for p in node_b_disk.rglob("*") if p.is_file()}
    finally:
        _kill_cluster(address)
        if temp is not None:
            _kill_cluster(str(temp))
            shutil.rmtree(temp, ignore_errors=True)
    runs = mirror / "tune-smoke" / "runs"
    trials = [json.loads(p.read_text()) for p in sorted(runs.glob("*/trial.json"))]
    placed = {t["trial_id"]: names[t["node"]] for t in trials}
    stored = s3_listing(s3("twonode"))
    with capsys.disabled():
        print(f"\nS3 search on 2 nodes without a shared disk: {len(trials)} trials in {wall:.0f} s on "
              f"{sorted((t['method'], placed[t['trial_id']]) for t in trials)}; {len(stored)} files in the bucket, "
              f"{len(on_node_b)} on node_b's own disk")
    assert len(trials) == 4 and set(placed.values()) == {"node_a", "node_b"}
    # node_b's disk holds what it wrote and pulled, never the driver's own files
    assert "tune-smoke/leaderboard.json" not in on_node_b and "tune-smoke/leaderboard.json" in stored
    for t in trials:
        folder = f"tune-smoke/runs/{t['trial_id']}/summary.json"
        assert (folder in on_node_b) == (placed[t["trial_id"]] == "node_b")
        if t["method"] == "kd" and placed[t["trial_id"]] == "node_b":  # its teacher came through the bucket
            assert "tune-smoke/teachers/cnn/best/model.safetensors" in on_node_b
    for t in trials:  # every trial finished, wherever it ran, and its folder reached the bucket and the driver
        assert (runs / t["trial_id"] / "summary.json").is_file()
        assert f"tune-smoke/runs/{t['trial_id']}/best/model.safetensors" in stored
    assert "tune-smoke/leaderboard.json" in stored and "family.json" in stored
    assert "stored at: s3://raykd/twonode/tune-smoke" in res.stdout


def test_the_shipped_tiny_cpu_config_survives_a_lost_node(tmp_path, capsys):
    """``configs/tiny_cpu.yaml`` as shipped (2 workers x 0.5 CPU, packed, no ``min_workers``) on
    two 1-CPU nodes; node_b's raylet is SIGKILLed after the first checkpoint. Whether node_b held
    workers or only the Ray Data tasks, the group restarts with 1 worker on node_a, leaving Ray Data
    half its CPU, resumes from the checkpoint and records every epoch once."""
    epochs, port = 3, PORT + 20
    data, out = tmp_path / "data", tmp_path / "out"  # the run generates the data, as its synth: block says
    out.mkdir()
    temp = None
    try:
        address, env, temp, _ = _start_two_nodes(tmp_path, data, out, hide=False, port=port, env_extra={
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
        names = _node_names(address, env)
        argv = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--address", address,
                "--set", f"train.epochs={epochs}", "--set", f"data.path={data}", "--set", f"output_dir={out}"]
        res = _kill_node_b_mid_run(argv, out / "tiny-teacher", env, tmp_path / "train.log", f":{port}")
        names = {**names, **_node_names(address, env)}
    finally:
        _kill_cluster(f"127.0.0.1:{port}")
        if temp is not None:
            _kill_cluster(str(temp))
            shutil.rmtree(temp, ignore_errors=True)
    with capsys.disabled():
        _print_kill_story("2-node kill test, configs/tiny_cpu.yaml as shipped", res, names)
        print("  " + "\n  ".join(line for line in res["text"].splitlines()
                                   if "no train batch" in line or "restart 1 of" in line or "left out" in line)[:1500])
    history, workers = res["history"], res["workers"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))  # every epoch once
    assert workers[0]["world_size"] == 2 and history[0]["world_size"] == 2
    assert workers[-1]["world_size"] == 1 and [names[n] for n in workers[-1]["nodes"]] == ["node_a"]
    assert res["resumed_from"] and min(res["resumed_from"]) >= res["killed_after"] - 1  # at most one epoch lost
    assert json.loads((out / "tiny-teacher" / "summary.json").read_text())["epochs"] == epochs
