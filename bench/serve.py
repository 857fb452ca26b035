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

    from raykd.artifact.format import ArtifactMeta, build_model, save_artifact
    from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_MALIGNANT
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
    from raykd.serve.backend import load_predictor
    from raykd.serve.family import family_from_paths
    from raykd.serve.intake import decode

    predictor = load_predictor(family_from_paths([f"m={art}"]).get("m"), backend="auto", device="auto")
    for _ in range(8):  # warm-up, as the HTTP settings get
        predictor.predict([decode(body)])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        predictor.predict([decode(body)])
        out.append(time.perf_counter() - t0)
    return out


def batching(url: str) -> tuple[int, int]:
    """An app's (batches, requests) counters so far."""
    import requests

    b = requests.get(f"{url}/models", timeout=30).json()["batching"]
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
    p.add_argument("--no-direct-ingress", action="store_true",
                   help="only the proxy path (default: also each replica's own HTTP port, side by side)")
    args = p.parse_args(argv)

    from ray import serve

    from raykd.cluster import init_local_ray
    from raykd.serve.__main__ import direct_ingress_env
    from raykd.serve.app import ServeArgs, build_app

    load0 = os.getloadavg()
    direct_port = None if args.no_direct_ingress else _free_port_range(8)
    if direct_port is not None:  # read by the Serve processes this cluster starts
        os.environ.update(direct_ingress_env(direct_port, replicas=8))
    with tempfile.TemporaryDirectory(prefix="raykd-bench-serve-") as tmp:
        art = make_model(args.model, Path(tmp))
        init_local_ray(num_cpus=max(2, os.cpu_count() or 2))
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apps = {"batched": args.max_batch_size, "unbatched": 1}
        try:
            for name, mbs in apps.items():
                sargs = ServeArgs(models=[f"m={art}"], max_batch_size=mbs, num_cpus=args.num_cpus,
                                  batch_wait_timeout_s=args.batch_wait_ms / 1e3)
                serve.run(build_app(sargs), name=name, route_prefix=f"/{name}", blocking=False)
            routes = {("proxy", name): f"http://127.0.0.1:{port}/{name}" for name in apps}
            if direct_port is not None:
                routes.update({("direct", name): url for name, url in _direct_routes(direct_port, apps).items()})
            body = jpeg()
            for url in routes.values():  # warm-up (first requests open connections, fill caches)
                load(f"{url}/predict", body, 4, 16)
            results: dict[tuple[str, str, int], tuple[list[float], float]] = {}
            batches: dict[tuple[str, int], list[int]] = {}
            direct_lat: list[float] = []
            tta_lat: list[float] = []
            for r in range(args.rounds):
                direct_lat += direct(art, body, args.requests)  # the same work in-process, side by side
                for c in args.concurrency:
                    for (path, name), url in routes.items():
                        before = batching(url)
                        lat, wall = load(f"{url}/predict", body, c, args.requests)
                        after = batching(url)
                        got = batches.setdefault((path, c), [0, 0]) if name == "batched" else [0, 0]
                        got[0] += after[0] - before[0]
                        got[1] += after[1] - before[1]
                        old = results.get((path, name, c), ([], 0.0))
                        results[(path, name, c)] = (old[0] + lat, old[1] + wall)
                tta_url = routes.get(("direct", "unbatched"), routes[("proxy", "unbatched")])
                tta_lat += load(f"{tta_url}/predict?tta=flip", body, 1, args.requests // 2)[0]
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            import requests

            stats = requests.get(f"{routes[('proxy', 'batched')]}/models", timeout=30).json()
        finally:
            serve.shutdown()
    load1 = os.getloadavg()
    report(args, stats, results, batches, direct_lat, tta_lat, load0, load1)
    return 0


def _free_port_range(n: int) -> int:
    """A port p with p .. p+n-1 free (each replica's own HTTP port under direct ingress)."""
    for _ in range(50):
        p = _free_port()
        if p + n < 65536 and all(_port_free(p + i) for i in range(n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _direct_routes(first: int, apps: dict, tries: int = 8) -> dict[str, str]:
    """Each app's replica port under direct ingress (found by asking each candidate port)."""
    import requests

    found: dict[str, str] = {}
    for p in range(first, first + tries):
        for name in apps:
            try:
                if requests.get(f"http://127.0.0.1:{p}/{name}/healthz", timeout=2).status_code == 200:
                    found[name] = f"http://127.0.0.1:{p}/{name}"
            except requests.RequestException:
                pass
    missing = sorted(set(apps) - set(found))
    if missing:
        raise RuntimeError(f"direct ingress: no replica port answered for {missing} in {first}..{first + tries - 1}")
    return found


def report(args, stats, results, batches, direct_lat, tta_lat, load0, load1) -> None:
    m = stats["models"][0]
    print(f"# Serve bench: {MODELS[args.model][0]} {MODELS[args.model][1] or ''} via {m['backend']}, "
          f"{m['params'] / 1e6:.2f} M params, single-image latency at the replica "
          f"{m['measured_latency_ms']:.1f} ms; "
          f"1 replica x {args.num_cpus} CPU per app; client on the same {os.cpu_count()}-core machine; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"# batched app: max batch {stats['batching']['max_batch_size']}, wait {args.batch_wait_ms:g} ms; "
          "path proxy = Serve's HTTP proxy, direct = the replica's own port (direct ingress)")
    ms = lambda xs, q: float(np.percentile(np.array(xs) * 1e3, q))  # noqa: E731
    direct_p50 = ms(direct_lat, 50)
    fmt = "{:<7} {:<9} {:>11} {:>9} {:>8} {:>8} {:>8} {:>11} {:>10}"
    print(fmt.format("path", "batching", "concurrency", "requests", "p50 ms", "p99 ms", "req/s", "mean batch",
                     "overhead"))
    print(fmt.format("-", "predictor", 1, len(direct_lat), f"{direct_p50:.1f}", f"{ms(direct_lat, 99):.1f}",
                     f"{len(direct_lat) / sum(direct_lat):.1f}", "-", "-"))
    for (path, name, c), (lat, wall) in sorted(results.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        b = batches.get((path, c), [0, 0])
        mean_batch = f"{b[1] / max(b[0], 1):.2f}" if name == "batched" else "1"
        overhead = f"{ms(lat, 50) - direct_p50:+.1f} ms" if c == 1 else "-"
        print(fmt.format(path, "on" if name == "batched" else "off", c, len(lat), f"{ms(lat, 50):.1f}",
                         f"{ms(lat, 99):.1f}", f"{len(lat) / wall:.1f}", mean_batch, overhead))
    for path in sorted({k[0] for k in results}):
        for c in args.concurrency:
            if c > 1:
                on, off = (len(results[(path, n, c)][0]) / results[(path, n, c)][1] for n in ("batched", "unbatched"))
                print(f"# {path}, concurrency {c}: throughput with batching {on / off:.2f}x without")
    plain = results.get(("direct", "unbatched", 1)) or results[("proxy", "unbatched", 1)]
    print(f"# test-time augmentation (?tta=flip, 3 views): p50 {ms(tta_lat, 50):.1f} ms vs "
          f"{ms(plain[0], 50):.1f} ms without ({ms(tta_lat, 50) / ms(plain[0], 50):.2f}x), batching off, "
          "concurrency 1")


if __name__ == "__main__":
    sys.exit(main())
