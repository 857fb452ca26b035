"""Serve latency (p50/p99) and throughput at concurrency 1 and 16, with ``@serve.batch`` on and off.

One local Ray cluster, one Serve instance on 127.0.0.1, two applications of the same model side by
side: ``/batched`` (max_batch_size 8) and ``/unbatched`` (max_batch_size 1). Each setting sends
``--requests`` real HTTP POSTs of one JPEG (a 600x450 smooth colour image, the size of a resized
dermoscopy photo) from ``concurrency`` client threads; decoding, preprocessing, inference and the
HTTP round trip are all inside the measured latency. The settings are run round-robin for
``--rounds`` rounds and pooled. Model weights are random (speed only). The load generator runs on
the same machine as the cluster, which is said in the output together with the load average.

Usage:
    python bench/serve.py                          # HierAttn-xs (256 px), ONNX Runtime on CPU
    python bench/serve.py --model vit6             # the 6-block ViT-B student (slow on 2 cores)
    python bench/serve.py --model tiny_cnn --requests 400
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODELS = {
    "tiny_cnn": ("raykd_tiny_cnn", {}, None),
    "hierattn_xs": ("raykd_hierattn_xs", {}, 256),
    "mobilenetv2": ("mobilenetv2_100", {}, 224),
    "vit6": ("vit_base_patch16_224", {"depth": 6}, 224),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(key: str, workdir: Path) -> Path:
    """Random-weight artifact + ONNX export of ``key`` (what a CPU replica serves)."""
    import torch

    from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_MALIGNANT
    from raykd.artifact import ArtifactMeta, build_model, save_artifact
    from raykd.export.onnx import export_onnx

    name, kwargs, size = MODELS[key]
    meta = ArtifactMeta(model_name=name, num_classes=8, model_kwargs=kwargs,
                        label_names=list(ISIC2019_CLASSES), malignant=list(ISIC2019_MALIGNANT),
                        preprocess={"image_size": size or 224}, version="bench-random-weights")
    torch.manual_seed(0)
    model = build_model(meta).eval()
    meta.preprocess["image_size"] = size or model.pretrained_cfg["input_size"][-1]
    art = save_artifact(workdir / key / "best", model, meta)
    export_onnx(model, meta, art / "model.onnx")
    return art


def jpeg(seed: int = 0, size: tuple[int, int] = (450, 600)) -> bytes:
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[0] // 25, size[1] // 25, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC))
    assert ok
    return buf.tobytes()


def load(url: str, body: bytes, concurrency: int, n: int) -> tuple[list[float], float]:
    """Send ``n`` POSTs from ``concurrency`` threads; per-request latencies (s) and wall time."""
    import requests

    def worker(count: int) -> list[float]:
        out = []
        with requests.Session() as s:
            for _ in range(count):
                t0 = time.perf_counter()
                r = s.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=120)
                out.append(time.perf_counter() - t0)
                r.raise_for_status()
        return out

    shares = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = [x for part in pool.map(worker, shares) for x in part]
    return lat, time.perf_counter() - t0


def direct(art: Path, body: bytes, n: int) -> list[float]:
    """Latencies (s) of the same work without HTTP or Serve: decode the JPEG and run the predictor
    the replica builds (same backend choice and preprocessing), in this process, one at a time."""
    from raykd.serve.family import family_from_paths
    from raykd.serve.intake import decode
    from raykd.serve.predictor import load_predictor

    predictor = load_predictor(family_from_paths([f"m={art}"]).get("m"), backend="auto", device="auto")
    for _ in range(8):  # warm-up, as the HTTP settings get
        predictor.predict([decode(body)])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        predictor.predict([decode(body)])
        out.append(time.perf_counter() - t0)
    return out


def batching(base: str) -> tuple[int, int]:
    """The batched app's (batches, requests) counters so far."""
    import requests

    b = requests.get(f"{base}/batched/models", timeout=30).json()["batching"]
    return b["batches"], b["requests"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="hierattn_xs")
    p.add_argument("--requests", type=int, default=160, help="requests per setting and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="@serve.batch wait for a fuller batch")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    args = p.parse_args(argv)

    import requests
    from ray import serve

    from raykd.cluster import init_local_ray
    from raykd.serve.app import ServeArgs, build_app

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="raykd-bench-serve-") as tmp:
        art = make_model(args.model, Path(tmp))
        init_local_ray(num_cpus=max(2, os.cpu_count() or 2))
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        apps = {"batched": args.max_batch_size, "unbatched": 1}
        try:
            for name, mbs in apps.items():
                sargs = ServeArgs(models=[f"m={art}"], max_batch_size=mbs, num_cpus=args.num_cpus,
                                  batch_wait_timeout_s=args.batch_wait_ms / 1e3)
                serve.run(build_app(sargs),
                          name=name, route_prefix=f"/{name}", blocking=False)
            body = jpeg()
            for name in apps:  # warm-up (first requests open connections, fill caches)
                load(f"{base}/{name}/predict", body, 4, 16)
            results: dict[tuple[str, int], tuple[list[float], float]] = {}
            batches: dict[int, list[int]] = {c: [0, 0] for c in args.concurrency}
            direct_lat: list[float] = []
            tta_lat: list[float] = []
            for r in range(args.rounds):
                direct_lat += direct(art, body, args.requests)  # the same work in-process, side by side
                for c in args.concurrency:
                    for name in apps:
                        before = batching(base) if name == "batched" else None
                        lat, wall = load(f"{base}/{name}/predict", body, c, args.requests)
                        if before is not None:
                            after = batching(base)
                            batches[c][0] += after[0] - before[0]
                            batches[c][1] += after[1] - before[1]
                        old = results.get((name, c), ([], 0.0))
                        results[(name, c)] = (old[0] + lat, old[1] + wall)
                tta_lat += load(f"{base}/unbatched/predict?tta=flip", body, 1, args.requests // 2)[0]
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            stats = requests.get(f"{base}/batched/models", timeout=30).json()
        finally:
            serve.shutdown()
    load1 = os.getloadavg()

    m = stats["models"][0]
    print(f"# Serve bench: {MODELS[args.model][0]} {MODELS[args.model][1] or ''} via {m['backend']}, "
          f"{m['params'] / 1e6:.2f} M params, single-image latency at the replica "
          f"{m['measured_latency_ms']:.1f} ms; "
          f"1 replica x {args.num_cpus} CPU; client on the same {os.cpu_count()}-core machine; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"# batched app: max batch {stats['batching']['max_batch_size']}, wait {args.batch_wait_ms:g} ms")
    direct_p50 = float(np.percentile(np.array(direct_lat) * 1e3, 50))
    fmt = "{:<10} {:>11} {:>9} {:>9} {:>9} {:>10} {:>11} {:>10}"
    print(fmt.format("batching", "concurrency", "requests", "p50 ms", "p99 ms", "req/s", "mean batch",
                     "overhead"))
    print(fmt.format("direct", 1, len(direct_lat), f"{direct_p50:.1f}",
                     f"{np.percentile(np.array(direct_lat) * 1e3, 99):.1f}",
                     f"{len(direct_lat) / sum(direct_lat):.1f}", "-", "-"))
    for c in args.concurrency:
        for name in apps:
            lat, wall = results[(name, c)]
            arr = np.array(lat) * 1e3
            p50, p99 = np.percentile(arr, 50), np.percentile(arr, 99)
            mean_batch = f"{batches[c][1] / max(batches[c][0], 1):.2f}" if name == "batched" else "1"
            overhead = f"{p50 - direct_p50:+.1f} ms" if c == 1 else "-"
            print(fmt.format("on" if name == "batched" else "off", c, len(lat), f"{p50:.1f}", f"{p99:.1f}",
                             f"{len(lat) / wall:.1f}", mean_batch, overhead))
    for c in args.concurrency:
        if c > 1:
            on, off = (len(results[(n, c)][0]) / results[(n, c)][1] for n in ("batched", "unbatched"))
            print(f"# concurrency {c}: throughput with batching {on / off:.2f}x without")
    tta_p50 = float(np.percentile(np.array(tta_lat) * 1e3, 50))
    plain = float(np.percentile(np.array(results[("unbatched", 1)][0]) * 1e3, 50))
    print(f"# test-time augmentation (?tta=flip, 3 views): p50 {tta_p50:.1f} ms vs {plain:.1f} ms without "
          f"({tta_p50 / plain:.2f}x), batching off, concurrency 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
