"""The Serve app under overload on loopback (real Ray Serve, real HTTP): memory stays bounded, excess
requests get 503 with ``Retry-After``, normal traffic keeps being answered, nothing hangs.

- **Memory.** One replica of a tiny ONNX model with the default limits (a pixel budget of
  150 megapixels, 450 MB at 3 bytes a pixel). ``BIG_CLIENTS`` threads post 24.9-MP PNGs (grey
  zeros: 24 KB on the wire, 75 MB once decoded) for ``LOAD_S`` seconds, each waiting the
  ``Retry-After`` it is given; another thread posts a 224-px JPEG every ``NORMAL_EVERY_S``. The
  replica's RSS is sampled every 5 ms from its pid (``GET /healthz``). Stated bound: peak RSS <=
  idle RSS + 3 bytes x ``max_pixels_in_flight`` + ``SLACK_MB`` (Python objects, bodies, allocator).
- **Answers.** Every big request is answered 200 or 503 with ``Retry-After``. Every normal request
  is answered 200: a 224-px image reserves 0.1 MP and three big ones (the most that fit, 3 x 49.8
  MP) leave 0.6 MP, so the budget never refuses it; the 64 big clients and the one normal client
  never exceed the replica's 64 slots plus the proxy's queue of 64, so Serve never refuses it
  either. Any other status fails the test.
- **Queue and deadline.** A second app with one slot, a queue of one and a 2 s timeout: a client
  that trickles its body holds the slot and gets a JSON 408 at its deadline (although it asked the
  proxy for no timeout at all), a second waits in the proxy's queue, a third is refused by Serve
  at once with 503 and ``Retry-After``.

The counts and the peak RSS are printed (``pytest -s``) and are in every assertion message.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from raykd.artifact.format import load_artifact
from raykd.export.onnx import export_onnx
from raykd.serve.__main__ import run_serve
from raykd.serve.app import ServeArgs, bind_app
from raykd.serve.options import default
from tests.export.helpers import encoded_image, make_artifact
from tests.serve.test_app import png_bomb
from tests.serve.test_replica_kill import _free_port

BIG_SIDE = 4990  # 4990 x 4990 = 24.9 MP, just under the default 25 MP limit
BIG_CLIENTS = 64
LOAD_S = 8.0
NORMAL_EVERY_S = 0.1
SLACK_MB = 200
TIGHT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    art = make_artifact(root / "cnn_run" / "best", "raykd_test_tiny_cnn", {}, image_size=32, version="cnn-1")
    model, meta = load_artifact(art)
    return export_onnx(model, meta, art / "model.onnx")


@pytest.fixture(scope="module")
def served(ray_cluster, onnx):
    """The default-limits app at ``/`` and the tightly limited one at ``/tight``, on one port."""
    from ray import serve

    port = _free_port()
    run_serve(ServeArgs(models=[f"cnn={onnx}"], num_cpus=0.5), host="127.0.0.1", port=port, blocking=False)
    tight = ServeArgs(models=[f"cnn={onnx}"], num_cpus=0.25, max_ongoing_requests=1, max_queued_requests=1,
                      request_timeout_s=TIGHT_TIMEOUT_S, max_batch_size=1)
    serve.run(bind_app(tight), name="tight", route_prefix="/tight", blocking=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "port": port}
    finally:
        serve.shutdown()


def post(url: str, data: bytes, ctype: str) -> requests.Response:
    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, timeout=120)


class RssSampler(threading.Thread):
    """Samples one process's resident set size every ``every_s`` until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int, every_s: float = 0.005) -> None:
        import psutil  # vendored by Ray (ray/thirdparty_files), importable once ray is imported

        super().__init__(daemon=True)
        self.process, self.every_s = psutil.Process(pid), every_s
        self.peak = self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1
            time.sleep(self.every_s)


def _big_client(url: str, png: bytes, until: float, out: list) -> None:
    """Post the big PNG until ``until``, waiting the Retry-After of each 503."""
    while time.monotonic() < until:
        r = post(url, png, "image/png")
        out.append((r.status_code, r.headers.get("retry-after"), r.headers.get("content-type", "")))
        if r.status_code == 503 and r.headers.get("retry-after"):
            time.sleep(float(r.headers["retry-after"]))


def _normal_client(url: str, jpg: bytes, until: float, out: list) -> None:
    """Post a small JPEG every NORMAL_EVERY_S (the next right away when one took longer)."""
    while time.monotonic() < until:
        t0 = time.monotonic()
        r = post(url, jpg, "image/jpeg")
        out.append((r.status_code, time.monotonic() - t0))
        time.sleep(max(0.0, NORMAL_EVERY_S - (time.monotonic() - t0)))


def _idle_rss(pid: int) -> int:
    import psutil  # vendored by Ray

    process = psutil.Process(pid)
    samples = []
    for _ in range(20):
        samples.append(process.memory_info().rss)
        time.sleep(0.01)
    return max(samples)


def _load(url: str, pid: int) -> dict:
    """The burst beside the steady traffic; what each client got and the replica's peak RSS."""
    png, jpg = png_bomb(BIG_SIDE, BIG_SIDE), encoded_image(3, ".jpg", (224, 224))
    assert len(png) < 100_000, len(png)  # a few tens of KB on the wire
    big, normal = [], []
    sampler = RssSampler(pid)
    sampler.start()
    until = time.monotonic() + LOAD_S
    with ThreadPoolExecutor(BIG_CLIENTS + 1) as pool:
        futures = [pool.submit(_normal_client, url, jpg, until, normal)]
        futures += [pool.submit(_big_client, url, png, until, big) for _ in range(BIG_CLIENTS)]
        for f in futures:
            f.result()
    sampler.stop.set()
    sampler.join()
    return {"big": big, "normal": normal, "peak": sampler.peak, "samples": sampler.samples}


def test_a_burst_of_25_megapixel_images_is_bounded_in_memory_and_normal_traffic_goes_on(served):
    url, budget = served["url"], default(ServeArgs, "max_pixels_in_flight")
    pid = requests.get(f"{url}/healthz", timeout=30).json()["pid"]
    for seed in range(3):  # warm: the model, the batch path, a worker thread
        assert post(url, encoded_image(seed, ".jpg", (224, 224)), "image/jpeg").status_code == 200
    idle = _idle_rss(pid)
    t0 = time.monotonic()
    got = _load(url, pid)
    took = time.monotonic() - t0
    big = Counter(status for status, _, _ in got["big"])
    normal = Counter(status for status, _ in got["normal"])
    slowest = max(latency for _, latency in got["normal"])
    bound = idle + 3 * budget + SLACK_MB * 2**20
    stats = requests.get(f"{url}/models", timeout=30).json()["pixel_budget"]
    report = (f"big requests {dict(big)} (200/503/other: {big[200]}/{big[503]}/"
              f"{sum(big.values()) - big[200] - big[503]}), normal requests {dict(normal)} (slowest "
              f"{slowest:.2f} s), replica RSS idle {idle / 2**20:.0f} MiB, peak {got['peak'] / 2**20:.0f} MiB "
              f"(bound {bound / 2**20:.0f} MiB; {got['samples']} samples in {took:.1f} s), budget {stats}")
    print(f"\n[overload] {report}")
    assert set(big) <= {200, 503}, report
    assert big[200] >= 1 and big[503] >= 1, report  # some decoded, the rest refused by the budget
    refused = [(retry, ctype) for status, retry, ctype in got["big"] if status == 503]
    assert all(retry == "1" and ctype.startswith("application/json") for retry, ctype in refused), report
    assert set(normal) == {200}, report
    assert got["peak"] <= bound, report
    assert got["peak"] - idle >= 75 * 2**20, report  # the sampler saw at least one decoded big image
    assert stats["peak"] <= stats["capacity"] == budget and stats["in_use"] == 0, report
    assert stats["refused"] == big[503], report
    assert requests.get(f"{url}/healthz", timeout=30).json()["pid"] == pid  # the same replica, never restarted


def _trickle(port: int, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A POST that announces a 100 KB PNG and sends only its first bytes (a client that stalls)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = {"Host": "127.0.0.1", "Content-Type": "image/png", "Content-Length": "100000", **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode() + b"\x89PNG\r\n\x1a\n")
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict, bytes, float]:
    """Status, headers, body of the response on ``sock``, and when it came (monotonic)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    sock.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, time.monotonic()


def test_a_stalled_upload_gets_408_at_the_deadline_and_a_full_queue_503_at_once(served):
    url, port = served["url"], served["port"]
    assert post(f"{url}/tight", encoded_image(1, ".jpg", (64, 64)), "image/jpeg").status_code == 200
    t0 = time.monotonic()
    # The first holds the replica's one slot; it asks the proxy for no timeout at all.
    first = _trickle(port, "/tight/predict", {"X-Request-Timeout-Seconds": "0"})
    time.sleep(0.3)
    second = _trickle(port, "/tight/predict")  # waits in the proxy's queue of one
    time.sleep(0.3)
    third = post(f"{url}/tight", encoded_image(2, ".jpg", (64, 64)), "image/jpeg")
    third_after = time.monotonic() - t0
    status1, _, body1, at1 = _answer(first)
    status2, _, body2, at2 = _answer(second)
    report = (f"third {third.status_code} after {third_after:.2f} s ({third.text!r}, Retry-After "
              f"{third.headers.get('retry-after')}); first {status1} after {at1 - t0:.2f} s {body1!r}; "
              f"second {status2} after {at2 - t0:.2f} s {body2!r}")
    print(f"\n[deadline] {report}")
    assert third.status_code == 503 and third.headers.get("retry-after") == "1", report
    assert third_after < TIGHT_TIMEOUT_S, report  # refused at once, not after the stalled ones
    assert status1 == 408 and status2 == 408, report
    for body in (body1, body2):
        error = json.loads(body)
        assert error["status"] == 408 and f"did not arrive within {TIGHT_TIMEOUT_S:g} s" in error["error"], report
    assert TIGHT_TIMEOUT_S - 0.2 <= at1 - t0 <= TIGHT_TIMEOUT_S + 3, report  # at the deadline, no hang
    assert post(f"{url}/tight", encoded_image(3, ".jpg", (64, 64)), "image/jpeg").status_code == 200
