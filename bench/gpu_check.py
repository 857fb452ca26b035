"""GPU checks for a cluster node, in under 5 minutes: AMP training steps, an nccl process group,
CUDA torch against ONNX Runtime inference, and a Serve replica on the GPU answering HTTP.

Run on a machine with a CUDA GPU (``bash bench/gpu_check.sh``); never in CI. Each check prints one
line; the summary block at the end goes into a dated page under docs/results/. Without a GPU (or with
``--cpu``) the same checks run on the CPU with gloo, so the script itself can be tried anywhere:
that run says so in every line and proves nothing about a GPU.

    python bench/gpu_check.py            # the GPU checks (falls back to CPU, saying so)
    python bench/gpu_check.py --cpu      # the CPU dry run
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_amp(device, steps: int, batch: int) -> str:
    """Training steps of MobileNetV2 (224 px) in fp32 and with raykd's autocast (bf16 where the GPU
    supports it, else fp16 with a grad scaler): images/s of each and the final losses."""
    import timm
    import torch

    from raykd.train.loop import autocast

    def run(amp: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=8).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        use_scaler = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 8, (batch,), device=device)
        loss = torch.zeros(())
        for i in range(steps + 2):  # 2 warm-up steps
            if i == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with autocast(device, amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise RuntimeError(f"AMP check: non-finite loss {loss.item()} (amp={amp})")
        return steps * batch / seconds, float(loss)

    fp32, loss32 = run(False)
    amp, loss_amp = run(True)
    kind = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16" \
        if device.type == "cuda" else "none on CPU (raykd autocasts on CUDA only)"
    return (f"AMP training ({device.type}, mobilenetv2_100 224 px, batch {batch}, {steps} steps): fp32 "
            f"{fp32:.0f} img/s, autocast {kind} {amp:.0f} img/s ({amp / fp32:.2f}x); final loss "
            f"{loss32:.3f} / {loss_amp:.3f}")


def check_process_group(device) -> str:
    """A one-rank process group on the GPU with nccl (gloo on CPU): an all_reduce and a broadcast."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        t = torch.arange(4, dtype=torch.float32, device=device)
        dist.all_reduce(t)
        dist.broadcast(t, src=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ok = torch.equal(t.cpu(), torch.arange(4, dtype=torch.float32))
    finally:
        dist.destroy_process_group()
    if not ok:
        raise RuntimeError(f"process group check: all_reduce on {backend} gave {t.tolist()}")
    return f"process group: {backend} on {device.type}, all_reduce + broadcast correct ({time.perf_counter() - t0:.2f} s)"


def make_artifact(workdir: Path) -> Path:
    """A random-weight HierAttn-xs artifact (256 px) with its ONNX export."""
    import torch

    from raykd.artifact.format import ArtifactMeta, build_model, save_artifact
    from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_MALIGNANT
    from raykd.export.onnx import export_onnx

    meta = ArtifactMeta(model_name="raykd_hierattn_xs", num_classes=8, model_kwargs={},
                        label_names=list(ISIC2019_CLASSES), malignant=list(ISIC2019_MALIGNANT),
                        preprocess={"image_size": 256}, version="gpu-check-random-weights")
    torch.manual_seed(0)
    model = build_model(meta).eval()
    art = save_artifact(workdir / "hierattn_xs" / "best", model, meta)
    export_onnx(model, meta, art / "model.onnx")
    return art


def check_inference(device, art: Path, batch: int, reps: int) -> str:
    """The same images through torch on ``device`` and ONNX Runtime on CPU: images/s and the largest
    probability difference."""
    from raykd.artifact.predict import OnnxPredictor, TorchPredictor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8) for _ in range(batch)]
    torch_p = TorchPredictor.from_artifact(art, device=device.type)
    onnx_p = OnnxPredictor(art / "model.onnx")
    out = {}
    for name, p in (("torch", torch_p), ("onnx", onnx_p)):
        p.predict(images)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            probs = p.predict(images)
        out[name] = (probs, reps * batch / (time.perf_counter() - t0))
    diff = float(np.abs(out["torch"][0] - out["onnx"][0]).max())
    return (f"inference (raykd_hierattn_xs 256 px, batch {batch}, preprocessing included): torch on "
            f"{torch_p.device} {out['torch'][1]:.0f} img/s, ONNX Runtime CPU {out['onnx'][1]:.0f} img/s "
            f"({out['torch'][1] / out['onnx'][1]:.2f}x); max |p_torch - p_onnx| {diff:.2e}")


def check_serve(device, art: Path, n: int) -> str:
    """A Serve replica holding the GPU (backend auto picks torch on CUDA) answering real HTTP."""
    import requests
    from ray import serve

    from raykd.serve.__main__ import run_serve
    from raykd.serve.app import ServeArgs

    port = _free_port()
    gpus = 1.0 if device.type == "cuda" else 0.0
    args = ServeArgs(models=[f"m={art}"], num_gpus=gpus, num_cpus=1.0)
    run_serve(args, host="127.0.0.1", port=port, blocking=False)
    try:
        import cv2

        ok, buf = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (450, 600, 3), dtype=np.uint8))
        body = buf.tobytes()
        url = f"http://127.0.0.1:{port}/predict"
        lat, backend = [], None
        with requests.Session() as s:
            for i in range(n + 5):
                t0 = time.perf_counter()
                r = s.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=60)
                r.raise_for_status()
                if i >= 5:
                    lat.append((time.perf_counter() - t0) * 1e3)
                backend = r.json()["backend"]
        models = requests.get(f"http://127.0.0.1:{port}/models", timeout=30).json()["models"][0]
    finally:
        serve.shutdown()
    return (f"Serve replica ({gpus:g} GPU): backend {backend}, HTTP p50 {np.percentile(lat, 50):.1f} ms, "
            f"p99 {np.percentile(lat, 99):.1f} ms over {n} requests; replica-measured "
            f"{models['measured_latency_ms']:.1f} ms/image")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the checks on the CPU (a dry run of the script)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (no GPU check was run)"
    lines = [f"# gpu_check {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {where}"]
    t0 = time.perf_counter()
    steps, batch = (args.steps, args.batch) if device.type == "cuda" else (3, 8)
    lines.append(check_amp(device, steps, batch))
    print(lines[-1], flush=True)
    lines.append(check_process_group(device))
    print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="raykd-gpu-check-") as tmp:
        art = make_artifact(Path(tmp))
        lines.append(check_inference(device, art, batch=batch, reps=5 if device.type == "cuda" else 2))
        print(lines[-1], flush=True)
        lines.append(check_serve(device, art, n=50 if device.type == "cuda" else 10))
        print(lines[-1], flush=True)
    lines.append(f"# total {time.perf_counter() - t0:.0f} s")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
