"""The Serve application on a real local Ray cluster, answering real HTTP requests.

One application is started for the whole module (about 5 s), bound to 127.0.0.1 on a free port, and
shut down at the end. It serves two models from a family file: a test ViT with an exported ONNX
file and a tiny CNN with torch weights only (the replica exports it for its CPU path). Its replica
has ``RAYKD_API_KEY`` set, so every request but ``GET /healthz`` sends the key, and it keeps the
default image limit (25 megapixels).
"""

from __future__ import annotations

import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from raykd.artifact.format import load_artifact
from raykd.data.transforms import decode_image
from raykd.export.onnx import export_onnx
from raykd.serve.__main__ import run_serve
from raykd.serve.app import ServeArgs
from raykd.serve.backend import OnnxPredictor, TorchPredictor
from raykd.serve.family import FamilyEntry, write_family
from raykd.serve.guard import API_KEY_ENV
from tests.export.helpers import LABELS, encoded_image, make_artifact
from tests.serve.test_intake import jpeg_header_only, png_header_only

MAX_BODY = 200_000
KEY = "test-key-0123456789"
AUTH = {"X-API-Key": KEY}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    vit = make_artifact(root / "vit_run" / "best", "test_vit", {"img_size": 64}, image_size=64,
                        version="vit-1")
    model, meta = load_artifact(vit)
    onnx = export_onnx(model, meta, vit / "model.onnx")
    cnn = make_artifact(root / "cnn_run" / "best", "raykd_test_tiny_cnn", {}, image_size=32,
                        version="cnn-1", seed=1)
    entries = [FamilyEntry("vit", "vit-1", str(vit), str(onnx), val_bma=0.7, latency_ms=2.0),
               FamilyEntry("cnn", "cnn-1", str(cnn), None, val_bma=0.6, latency_ms=0.5)]
    path = write_family(root / "family.json", entries, winner="vit")
    return {"file": path, "vit": vit, "onnx": onnx, "cnn": cnn}


@pytest.fixture(scope="module")
def url(ray_cluster, family, tmp_path_factory):
    from ray import serve

    port = _free_port()
    args = ServeArgs(family=str(family["file"]), max_body_bytes=MAX_BODY, num_cpus=0.5,
                     onnx_cache_dir=str(tmp_path_factory.mktemp("onnx_cache")))
    run_serve(args, host="127.0.0.1", port=port, blocking=False, env_vars={API_KEY_ENV: KEY})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(url: str, data: bytes, ctype: str = "image/jpeg", model: str | None = None,
         auth: dict | None = AUTH) -> requests.Response:
    params = {"model": model} if model else None
    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": ctype, **(auth or {})},
                         params=params, timeout=60)


def get(url: str, path: str, auth: dict | None = AUTH) -> requests.Response:
    return requests.get(f"{url}{path}", headers=auth, timeout=30)


def png_bomb(width: int, height: int) -> bytes:
    """A real, complete grayscale PNG of zeros: width x height pixels in a few tens of KB, written
    row by row so the test never holds the raw pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_health_and_model_listing(url, family):
    health = get(url, "/healthz", auth=None).json()
    assert health["status"] == "ok" and health["winner"] == "vit"
    listing = get(url, "/models").json()
    rows = {m["name"]: m for m in listing["models"]}
    assert listing["winner"] == "vit" and set(rows) == {"vit", "cnn"}
    assert rows["vit"]["size_bytes"] == family["onnx"].stat().st_size
    assert rows["cnn"]["params"] == 1308 and rows["vit"]["val_bma"] == 0.7
    assert all(m["measured_latency_ms"] > 0 and m["backend"] == "onnx" for m in rows.values())


def test_prediction_equals_the_predictors_output(url, family):
    """A CPU replica serves through ONNX Runtime; the answer equals torch and ONNX run locally."""
    data = encoded_image(7, ".jpg", (90, 70))
    body = post(url, data).json()
    image = decode_image(data)
    expected_onnx = OnnxPredictor(family["onnx"]).predict([image])[0]
    expected_torch = TorchPredictor.from_artifact(family["vit"], device="cpu").predict([image])[0]
    got = np.array([body["probabilities"][n] for n in LABELS])
    np.testing.assert_allclose(got, expected_onnx, atol=1e-6)
    np.testing.assert_allclose(got, expected_torch, atol=1e-5)
    assert body["model"] == "vit" and body["version"] == "vit-1" and body["backend"] == "onnx"
    assert body["top_class"] == LABELS[int(np.argmax(expected_onnx))]
    assert body["malignant_probability"] == pytest.approx(got[0] + got[2], abs=1e-6)  # MEL + BCC


def test_multipart_upload_and_model_choice(url, family):
    data = encoded_image(3, ".png")
    body = requests.post(f"{url}/predict", params={"model": "cnn"}, timeout=60, headers=AUTH,
                         files={"file": ("lesion.png", data, "image/png")}).json()
    assert body["model"] == "cnn"
    # cnn has no ONNX file: the replica exported one; its answers equal torch's.
    expected = TorchPredictor.from_artifact(family["cnn"], device="cpu").predict([decode_image(data)])[0]
    np.testing.assert_allclose([body["probabilities"][n] for n in LABELS], expected, atol=1e-5)
    raw = post(url, data, "image/png", model="cnn").json()
    assert raw["probabilities"] == pytest.approx(body["probabilities"], abs=1e-7)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(url, family):
    blobs = [encoded_image(100 + i, ".jpg") for i in range(16)]
    expected = OnnxPredictor(family["onnx"]).predict([decode_image(b) for b in blobs])
    before = get(url, "/models").json()["batching"]
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda b: post(url, b).json(), blobs))
    after = get(url, "/models").json()["batching"]
    got = np.array([[b["probabilities"][n] for n in LABELS] for b in bodies])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16  # at least one batch held several requests


def test_a_corrupt_image_in_a_batch_fails_alone(url, family):
    good = [encoded_image(200 + i, ".jpg") for i in range(4)]
    bad = [g[: len(g) // 2] for g in good]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(url, b), good + bad))
    assert [r.status_code for r in responses] == [200] * 4 + [400] * 4
    expected = OnnxPredictor(family["onnx"]).predict([decode_image(g) for g in good])
    got = np.array([[r.json()["probabilities"][n] for n in LABELS] for r in responses[:4]])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_requests_get_4xx_json_and_the_replica_stays_up(url):
    pid_before = get(url, "/healthz").json()["pid"]
    jpg = encoded_image(5, ".jpg")
    png = encoded_image(6, ".png")
    # A real 5001x5000 PNG (just over the default 25 MP limit) in a few tens of KB: a bomb.
    bomb = png_bomb(5001, 5000)
    assert len(bomb) < MAX_BODY
    cases = {
        "wrong content type": (post(url, b"hello", "text/plain"), 415),
        "form-encoded body": (post(url, jpg, "application/x-www-form-urlencoded"), 415),
        "empty body": (post(url, b""), 400),
        "not an image": (post(url, b"this is not an image at all", "application/octet-stream"), 400),
        "truncated JPEG": (post(url, jpg[: len(jpg) // 2]), 400),
        "truncated PNG": (post(url, png[: len(png) - 30], "image/png"), 400),
        "oversized body": (post(url, b"\xff\xd8\xff" + b"\0" * (MAX_BODY + 1)), 413),
        "decompression bomb": (post(url, bomb, "image/png"), 413),
        "declared giant PNG": (post(url, png_header_only(50_000, 50_000), "image/png"), 413),
        "multipart without a file": (requests.post(f"{url}/predict", data={"note": "x"}, headers=AUTH,
                                                   files={"other": ("", b"")}, timeout=30), 400),
        "unknown model": (post(url, jpg, model="resnet9000"), 404),
    }
    for name, (resp, code) in cases.items():
        assert resp.status_code == code, (name, resp.status_code, resp.text)
        assert resp.headers["content-type"].startswith("application/json"), name
        assert "error" in resp.json(), name
        assert "Error" not in resp.json()["error"] and "Traceback" not in resp.text, name
    health = get(url, "/healthz").json()
    assert health["status"] == "ok" and health["pid"] == pid_before
    assert post(url, jpg).status_code == 200


def test_every_route_but_healthz_needs_the_api_key(url):
    jpg = encoded_image(8, ".jpg")
    for wrong in (None, {"Authorization": "Bearer not-the-key"}, {"X-API-Key": "not-the-key"},
                  {"Authorization": f"Basic {KEY}"}):
        for resp in (post(url, jpg, auth=wrong), get(url, "/models", auth=wrong), get(url, "/docs", auth=wrong)):
            assert resp.status_code == 401, (wrong, resp.url, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert "API key" in resp.json()["error"]
    assert get(url, "/healthz", auth=None).json()["status"] == "ok"
    assert post(url, jpg, auth={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert post(url, jpg, auth={"X-API-Key": KEY}).status_code == 200
    assert get(url, "/models", auth={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_an_image_just_over_25_megapixels_is_refused_naming_the_limit(url):
    for data, ctype, dims in [(png_bomb(5001, 5000), "image/png", "5001x5000"),
                              (jpeg_header_only(5000, 5001), "image/jpeg", "5000x5001")]:
        resp = post(url, data, ctype)
        assert resp.status_code == 413, resp.text
        error = resp.json()["error"]
        assert "25000000 pixels (25 megapixels)" in error and dims in error


def test_build_app_takes_typed_args_as_serve_run_passes_them(family, monkeypatch):
    """``serve run raykd.serve.app:build_app family=FILE max_batch_size=4`` (strings, validated)."""
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from raykd.serve.app import build_app

    monkeypatch.setenv(API_KEY_ENV, KEY)  # build_app fails closed without one (tests/serve/test_fail_closed.py)
    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"family": str(family["file"]), "max_batch_size": "4"})
    assert isinstance(app, Application)
    with pytest.raises(ValidationError, match="max_batchsize"):
        call_user_app_builder_with_args_if_necessary(
            build_app, {"family": str(family["file"]), "max_batchsize": 4})
    with pytest.raises(ValidationError, match="exactly one"):
        ServeArgs(family=str(family["file"]), models=[str(family["cnn"])])


def test_cli_arguments_become_serve_args(family):
    from raykd.serve.__main__ import args_to_serve_args, parse_args

    ns = parse_args(["--model", str(family["cnn"]), "--model", f"v={family['onnx']}", "--max-batch-size", "1",
                     "--max-body-bytes", "1000", "--num-gpus", "1", "--request-timeout-s", "2.5"])
    args = args_to_serve_args(ns)
    assert args.models == [str(family["cnn"]), f"v={family['onnx']}"]
    assert (args.max_batch_size, args.max_body_bytes, args.num_gpus, args.family) == (1, 1000, 1.0, None)
    assert (args.request_timeout_s, args.max_image_pixels) == (2.5, 25_000_000)
    assert ServeArgs(family="f.json").request_timeout_s == 30.0
