"""The Serve app's clinic routes on a real local Ray cluster, over real HTTP: budgets, decisions,
test-time augmentation, model cards and explanations.

One application is started for the module (a few seconds, like ``test_app.py``). Its family: a
test ViT (artifact + ONNX, with a cancer-vs-benign operating point in its metadata), a tiny CNN
(artifact + ONNX, with a model card) and ``edge``, the same CNN as an ONNX file only (with a card
next to it). Sizes and latencies are set in the family file, so budget answers do not depend on
how fast the machine is. The replica runs on CPU, so every model is served through ONNX Runtime and
``/explain`` loads the torch model from the artifact on first use. ``RAYKD_API_KEY`` is set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from raykd.artifact.format import ArtifactMeta, build_model, load_artifact, save_artifact
from raykd.data.transforms import decode_image
from raykd.export.onnx import export_onnx
from raykd.serve.__main__ import run_serve
from raykd.serve.app import ServeArgs
from raykd.serve.backend import OnnxPredictor, predict_tta
from raykd.serve.family import FamilyEntry, write_family
from raykd.serve.guard import API_KEY_ENV
from tests.export.helpers import LABELS, MALIGNANT, encoded_image, make_artifact
from tests.serve.test_app import AUTH, KEY, _free_port, get

THRESHOLD = 0.3
CARD = {"model": "cnn", "intended_use": "triage research only", "val_bma": 0.6}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("clinic")
    meta = ArtifactMeta(model_name="test_vit", num_classes=len(LABELS), model_kwargs={"img_size": 64},
                        label_names=list(LABELS), malignant=list(MALIGNANT), version="vit-1",
                        preprocess={"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3,
                                    "crop_black_border": False, "fusion_preprocess": False},
                        temperature=1.5, decision={"threshold": THRESHOLD, "target_sensitivity": 0.95})
    torch.manual_seed(0)
    vit = save_artifact(root / "vit_run" / "best", build_model(meta), meta)
    vit_onnx = export_onnx(*load_artifact(vit), vit / "model.onnx")
    cnn = make_artifact(root / "cnn_run" / "best", "raykd_test_tiny_cnn", {}, image_size=32,
                        version="cnn-1", seed=1)
    cnn_onnx = export_onnx(*load_artifact(cnn), cnn / "model.onnx")
    (cnn / "model_card.json").write_text(json.dumps(CARD))
    (cnn / "model_card.md").write_text("# cnn\n\nTriage research only.\n")
    (root / "edge").mkdir()
    edge_onnx = shutil.copy(cnn_onnx, root / "edge" / "model.onnx")
    (root / "edge" / "model_card.json").write_text(json.dumps({"model": "edge"}))
    entries = [
        FamilyEntry("vit", "vit-1", str(vit), str(vit_onnx), size_bytes=3_000_000, val_bma=0.7, latency_ms=20.0),
        FamilyEntry("cnn", "cnn-1", str(cnn), str(cnn_onnx), size_bytes=10_000, val_bma=0.6, latency_ms=0.5),
        FamilyEntry("edge", "cnn-1", None, str(edge_onnx), size_bytes=20_000, val_bma=0.65, latency_ms=5.0),
    ]
    path = write_family(root / "family.json", entries, winner="vit")
    return {"file": path, "vit": vit, "vit_onnx": vit_onnx, "cnn": cnn, "cnn_onnx": cnn_onnx, "edge_dir": root / "edge"}


@pytest.fixture(scope="module")
def url(ray_cluster, family):
    from ray import serve

    port = _free_port()
    args = ServeArgs(family=str(family["file"]), num_cpus=0.5)
    run_serve(args, host="127.0.0.1", port=port, blocking=False, env_vars={API_KEY_ENV: KEY})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def call(url: str, route: str, data: bytes, params: dict | None = None, ctype: str = "image/jpeg",
         auth: dict | None = AUTH) -> requests.Response:
    return requests.post(f"{url}{route}", data=data, params=params, timeout=60,
                         headers={"Content-Type": ctype, **(auth or {})})


def test_predictions_carry_the_decision_at_the_exported_operating_point(url):
    data = encoded_image(11, ".jpg", (80, 64))
    vit = call(url, "/predict", data).json()
    assert vit["model"] == "vit" and vit["decision_threshold"] == THRESHOLD
    assert vit["malignant_decision"] is (vit["malignant_probability"] >= THRESHOLD)
    assert vit["tta"] == "none" and vit["budget"] is None
    cnn = call(url, "/predict", data, {"model": "cnn"}).json()
    assert cnn["malignant_decision"] is None and cnn["decision_threshold"] is None


def test_a_budget_picks_the_most_accurate_model_that_fits(url):
    jpg = encoded_image(12, ".jpg")
    cases = [({"max_latency_ms": "100"}, "vit"), ({"max_latency_ms": "10"}, "edge"),
             ({"max_latency_ms": "1"}, "cnn"), ({"max_size_mb": "0.015"}, "cnn"),
             ({"max_latency_ms": "50", "max_size_mb": "1"}, "edge")]
    for params, expected in cases:
        body = call(url, "/predict", jpg, params).json()
        assert body["model"] == expected, (params, body)
        assert body["budget"] == {k: float(v) for k, v in params.items()}
    rows = {m["name"]: m["budget"] for m in get(url, "/models").json()["models"]}
    assert rows["cnn"] == {"latency_ms": 0.5, "latency_from": "export", "size_mb": 0.01}
    assert rows["vit"] == {"latency_ms": 20.0, "latency_from": "export", "size_mb": 3.0}


def test_an_impossible_or_malformed_budget_is_a_4xx_that_says_what_is_on_offer(url):
    jpg = encoded_image(13, ".jpg")
    fast = call(url, "/predict", jpg, {"max_latency_ms": "0.1"})
    assert fast.status_code == 422
    assert "max_latency_ms=0.1" in fast.json()["error"] and "0.5 ms (cnn)" in fast.json()["error"]
    small = call(url, "/predict", jpg, {"max_size_mb": "0.001"})
    assert small.status_code == 422 and "smallest is 0.01 MB (cnn)" in small.json()["error"]
    both = call(url, "/predict", jpg, {"model": "cnn", "max_latency_ms": "1"})
    assert both.status_code == 400 and "not both" in both.json()["error"]
    for params, words in [({"max_latency_ms": "fast"}, "max_latency_ms must be a number"),
                          ({"max_size_mb": "-1"}, "max_size_mb must be a positive number"),
                          ({"tta": "rotate"}, "tta='rotate'")]:
        resp = call(url, "/predict", jpg, params)
        assert resp.status_code == 422 and words in resp.json()["error"], resp.text


def test_flip_tta_averages_the_image_and_its_flips(url, family):
    data = encoded_image(14, ".png", (40, 56))
    body = call(url, "/predict", data, {"model": "cnn", "tta": "flip"}, "image/png").json()
    image = decode_image(data)
    views = [image, image[:, ::-1].copy(), image[::-1].copy()]
    expected = OnnxPredictor(family["cnn_onnx"]).predict(views).mean(axis=0)
    assert body["tta"] == "flip"
    np.testing.assert_allclose([body["probabilities"][n] for n in LABELS], expected, atol=1e-6)
    plain = call(url, "/predict", data, {"model": "cnn"}, "image/png").json()
    assert plain["probabilities"] != pytest.approx(body["probabilities"], abs=1e-6)
    np.testing.assert_allclose(predict_tta(OnnxPredictor(family["cnn_onnx"]), [image], "flip")[0], expected,
                               atol=1e-7)


def test_model_cards_are_served_from_the_model_folder_or_a_404_says_why(url):
    card = get(url, "/models/cnn/card")
    assert card.status_code == 200 and card.json() == CARD
    md = get(url, "/models/cnn/card?format=md")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert "Triage research only." in md.text
    assert get(url, "/models/edge/card").json() == {"model": "edge"}  # next to the ONNX file
    missing = get(url, "/models/vit/card")
    assert missing.status_code == 404 and "model 'vit' has no model card" in missing.json()["error"]
    assert get(url, "/models/edge/card?format=md").status_code == 404
    unknown = get(url, "/models/resnet/card")
    assert unknown.status_code == 404 and "unknown model 'resnet'" in unknown.json()["error"]
    assert get(url, "/models/cnn/card?format=pdf").status_code == 400


def test_a_model_card_that_links_outside_its_folder_is_not_served(url, family, tmp_path):
    secret = tmp_path / "secret.md"
    secret.write_text("private notes")
    link = Path(family["edge_dir"]) / "model_card.md"
    link.symlink_to(secret)
    try:
        resp = get(url, "/models/edge/card?format=md")
    finally:
        link.unlink()
    assert resp.status_code == 404 and "private" not in resp.text
    assert resp.json()["error"] == "model 'edge' has no model card inside its folder"


def test_explain_answers_a_heatmap_png_with_the_prediction_in_headers(url):
    data = encoded_image(15, ".jpg", (72, 60))
    resp = call(url, "/explain", data, {"model": "cnn"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png" and resp.headers["cache-control"] == "no-store"
    png = cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (32, 32, 3)
    predicted = call(url, "/predict", data, {"model": "cnn"}).json()  # ONNX Runtime; /explain: torch
    assert resp.headers["x-model"] == "cnn" and resp.headers["x-explanation-method"] == "grad-cam"
    assert resp.headers["x-top-class"] == predicted["top_class"] == resp.headers["x-explained-class"]
    assert float(resp.headers["x-top-probability"]) == pytest.approx(predicted["top_probability"], abs=1e-4)
    assert float(resp.headers["x-malignant-probability"]) == pytest.approx(
        predicted["malignant_probability"], abs=1e-4)
    assert json.loads(resp.headers["x-probabilities"]) == pytest.approx(predicted["probabilities"], abs=1e-4)
    assert "x-malignant-decision" not in resp.headers
    upload = requests.post(f"{url}/explain", params={"target": "NV"}, headers=AUTH, timeout=60,
                           files={"file": ("lesion.jpg", data, "image/jpeg")})
    assert upload.status_code == 200, upload.text
    assert cv2.imdecode(np.frombuffer(upload.content, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    assert upload.headers["x-model"] == "vit" and upload.headers["x-explained-class"] == "NV"
    assert upload.headers["x-explanation-method"] == "attention-rollout:grad-weighted"
    assert upload.headers["x-decision-threshold"] == "0.3"
    malignant = float(upload.headers["x-malignant-probability"])
    assert upload.headers["x-malignant-decision"] == ("true" if malignant >= THRESHOLD else "false")


def test_explain_refuses_what_it_cannot_do_in_words(url):
    jpg = encoded_image(16, ".jpg")
    onnx_only = call(url, "/explain", jpg, {"model": "edge"})
    assert onnx_only.status_code == 409
    assert "explanations need the torch model" in onnx_only.json()["error"]
    cases = [(call(url, "/explain", jpg, {"target": "XYZ"}), 422),
             (call(url, "/explain", jpg[: len(jpg) // 2]), 400),
             (call(url, "/explain", b"hello", ctype="text/plain"), 415),
             (call(url, "/explain", jpg, {"model": "resnet"}), 404)]
    for resp, code in cases:
        assert resp.status_code == code, resp.text
        assert "Error" not in resp.json()["error"] and "Traceback" not in resp.text


def test_the_api_key_guards_the_new_routes(url):
    jpg = encoded_image(17, ".jpg")
    for wrong in (None, {"X-API-Key": "not-the-key"}):
        for resp in (call(url, "/explain", jpg, auth=wrong), get(url, "/models/cnn/card", auth=wrong),
                     call(url, "/predict", jpg, {"max_latency_ms": "100"}, auth=wrong)):
            assert resp.status_code == 401, (wrong, resp.url, resp.text)
            assert "API key" in resp.json()["error"]
