"""The Serve application on a real local Ray cluster, answering real HTTP requests.

One application is started for the whole module (about 5 s), bound to 127.0.0.1 on a free port, and
shut down at the end. It serves two models from a family file: a test ViT with an exported ONNX
file and a tiny CNN with torch weights only (the replica exports it for its CPU path).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from raykd.data.transforms import decode_image
from raykd.export.artifact import load_artifact
from raykd.export.onnx import export_onnx
from raykd.serve.__main__ import run_serve
from raykd.serve.app import ServeArgs
from raykd.serve.family import FamilyEntry, write_family
from raykd.serve.predictor import OnnxPredictor, TorchPredictor
from tests.export.helpers import LABELS, encoded_image, make_artifact
from tests.serve.test_intake import png_header_only

MAX_BODY = 200_000
MAX_PIXELS = 1_000_000


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
    args = ServeArgs(registry=str(family["file"]), max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS,
                     num_cpus=0.5, onnx_cache_dir=str(tmp_path_factory.mktemp("onnx_cache")))
    run_serve(args, host="127.0.0.1", port=port, blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(url: str, data: bytes, ctype: str = "image/jpeg", model: str | None = None) -> requests.Response:
    params = {"model": model} if model else None
    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, params=params,
                         timeout=60)


def test_health_and_model_listing(url, family):
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["winner"] == "vit"
    listing = requests.get(f"{url}/models", timeout=30).json()
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
    body = requests.post(f"{url}/predict", params={"model": "cnn"}, timeout=60,
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
    before = requests.get(f"{url}/models", timeout=30).json()["batching"]
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda b: post(url, b).json(), blobs))
    after = requests.get(f"{url}/models", timeout=30).json()["batching"]
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
    pid_before = requests.get(f"{url}/healthz", timeout=30).json()["pid"]
    jpg = encoded_image(5, ".jpg")
    png = encoded_image(6, ".png")
    # A real 1200x1000 PNG (1.2 MP > the 1 MP limit) that compresses to a few KB: a small bomb.
    bomb = __import__("cv2").imencode(".png", np.zeros((1000, 1200, 3), np.uint8))[1].tobytes()
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
        "multipart without a file": (requests.post(f"{url}/predict", data={"note": "x"},
                                                   files={"other": ("", b"")}, timeout=30), 400),
        "unknown model": (post(url, jpg, model="resnet9000"), 404),
    }
    for name, (resp, code) in cases.items():
        assert resp.status_code == code, (name, resp.status_code, resp.text)
        assert resp.headers["content-type"].startswith("application/json"), name
        assert "error" in resp.json(), name
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["pid"] == pid_before
    assert post(url, jpg).status_code == 200


def test_build_app_takes_typed_args_as_serve_run_passes_them(family):
    """``serve run raykd.serve.app:build_app registry=FILE max_batch_size=4`` (strings, validated)."""
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from raykd.serve.app import build_app

    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"registry": str(family["file"]), "max_batch_size": "4"})
    assert isinstance(app, Application)
    with pytest.raises(ValidationError, match="max_batchsize"):
        call_user_app_builder_with_args_if_necessary(
            build_app, {"registry": str(family["file"]), "max_batchsize": 4})
    with pytest.raises(ValidationError, match="exactly one"):
        ServeArgs(registry=str(family["file"]), models=[str(family["cnn"])])


def test_cli_arguments_become_serve_args(family):
    from raykd.serve.__main__ import args_to_serve_args, parse_args

    ns = parse_args(["--model", str(family["cnn"]), "--model", f"v={family['onnx']}", "--max-batch-size", "1",
                     "--max-body-bytes", "1000", "--num-gpus", "1"])
    args = args_to_serve_args(ns)
    assert args.models == [str(family["cnn"]), f"v={family['onnx']}"]
    assert (args.max_batch_size, args.max_body_bytes, args.num_gpus, args.registry) == (1, 1000, 1.0, None)
