"""A Serve replica SIGKILLed under load: Serve replaces it, and only requests that were in flight
on it may fail.

Two replicas of a tiny ONNX model (each accepting at most ``MAX_ONGOING`` requests at once) answer
a steady stream of real HTTP POSTs from 6 client threads. One replica's process is SIGKILLed; every
request is recorded with its status. Requests that could have been on the killed replica when it
died are at most its ``MAX_ONGOING`` in-flight ones, so at most that many may fail; every other
request must be answered 200, and the deployment must be back at two replicas (a new process)
after the kill.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from raykd.artifact.format import load_artifact
from raykd.export.onnx import export_onnx
from raykd.serve.__main__ import run_serve
from raykd.serve.app import ServeArgs
from tests.export.helpers import encoded_image, make_artifact

MAX_ONGOING = 2
THREADS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_cluster, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("killed")
    art = make_artifact(root / "cnn_run" / "best", "raykd_test_tiny_cnn", {}, image_size=32, version="cnn-1")
    model, meta = load_artifact(art)
    onnx = export_onnx(model, meta, art / "model.onnx")
    port = _free_port()
    args = ServeArgs(models=[f"cnn={onnx}"], num_replicas=2, num_cpus=0.25, max_ongoing_requests=MAX_ONGOING,
                     max_batch_size=1)
    run_serve(args, host="127.0.0.1", port=port, blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _replica_pids(url: str, tries: int = 60) -> set[int]:
    """The pids answering ``/healthz`` (the router spreads requests over the replicas)."""
    pids = set()
    for _ in range(tries):
        pids.add(requests.get(f"{url}/healthz", timeout=10).json()["pid"])
    return pids


def test_a_replica_killed_under_load_is_replaced_and_only_its_in_flight_requests_may_fail(url, capsys):
    before = _replica_pids(url)
    assert len(before) == 2, before
    body = encoded_image(3, ".jpg", (64, 64))
    results: list[tuple[float, int]] = []  # (time sent, status; 0 = no HTTP answer)
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                status = requests.post(f"{url}/predict", data=body, headers={"Content-Type": "image/jpeg"},
                                       timeout=30).status_code
            except requests.RequestException:
                status = 0
            with lock:
                results.append((t, status))

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(THREADS):
            pool.submit(client)
        time.sleep(3.0)  # steady load on both replicas
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # replaced: two processes answer again, the killed one not among them
            after = _replica_pids(url, tries=20)
            if len(after) == 2 and victim not in after:
                break
            assert time.monotonic() < deadline, f"the killed replica was not replaced within 60 s: {after}"
            time.sleep(0.5)
        replaced_s = time.monotonic() - killed_at
        time.sleep(2.0)  # load on the replaced deployment
        stop.set()
    failed = [s for _, s in results if s != 200]
    with capsys.disabled():
        print(f"\nreplica kill under load: {len(results)} requests, {len(failed)} not 200 ({sorted(set(failed))}); replica {victim} killed, "
              f"replaced in {replaced_s:.1f} s by {sorted(after - before)}")
    assert len(after) == 2 and victim not in after
    assert len(failed) <= MAX_ONGOING, f"{len(failed)} failures > {MAX_ONGOING} requests in flight on the replica"
    assert all(s == 200 for t, s in results if t < killed_at - 1.0)  # before the kill: all answered
    assert sum(1 for t, _ in results if t > killed_at) > 20  # the load really went on through the kill
