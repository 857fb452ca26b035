"""How much a batch saves per image, for the models bench/serve.py serves: ONNX Runtime on the CPU,
batch 1 against batch 8, with 1 and 2 intra-op threads (a 1-CPU and a 2-CPU replica).

Serve's ``@serve.batch`` can raise throughput only by as much as the model's own batched forward
pass saves per image; this prints that ceiling, measured here.

Usage:
    python bench/batch_gain.py                      # every model of bench/serve.py
    python bench/batch_gain.py hierattn_xs tiny_cnn
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import MODELS, make_model  # noqa: E402 - bench/serve.py, next to this file


def per_image_ms(session, name: str, batch: int, size: int, seconds: float = 1.5) -> float:
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    for _ in range(2):
        session.run(None, {name: x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {name: x})
        n += 1
    return (time.perf_counter() - t0) / (n * batch) * 1e3


def main(keys: list[str]) -> None:
    import onnxruntime as ort

    workdir = Path(tempfile.mkdtemp(prefix="raykd-batch-gain-"))
    print("model         px  threads  batch 1 ms/img  batch 8 ms/img  batch 8 saves")
    for key in keys:
        art = make_model(key, workdir)
        size = json.loads((art / "meta.json").read_text())["preprocess"]["image_size"]
        for threads in (1, 2):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            session = ort.InferenceSession(str(art / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            one, eight = per_image_ms(session, name, 1, size), per_image_ms(session, name, 8, size)
            print(f"{key:<13} {size:>3}  {threads:>7}  {one:>14.2f}  {eight:>14.2f}  {one / eight:>12.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
