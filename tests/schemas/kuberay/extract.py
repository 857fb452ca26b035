"""Regenerate the vendored KubeRay CRD schemas in this folder (see README.md here).

    git clone https://github.com/ray-project/kuberay && git -C kuberay checkout v1.7.0
    python tests/schemas/kuberay/extract.py kuberay

For each CRD of ``ray-operator/config/crd/bases/`` it keeps only the ``openAPIV3Schema`` of the
``v1`` version (the served storage version the manifests use), written as compact JSON with sorted
keys and gzipped without a timestamp, so the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
VERSION = "v1"


def extract(crd_path: Path) -> bytes:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(crd_path.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    assert version["served"] and version["storage"], f"{crd_path}: {VERSION} is not served/stored"
    schema = version["schema"]["openAPIV3Schema"]
    return json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()


def main(checkout: str) -> None:
    bases = Path(checkout) / "ray-operator/config/crd/bases"
    for kind, name in CRDS.items():
        src = bases / name
        data = extract(src)
        out = HERE / f"{kind.lower()}.v1.schema.json.gz"
        out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        print(f"{kind}: {src} (sha256 {hashlib.sha256(src.read_bytes()).hexdigest()}) -> {out.name} "
              f"(json sha256 {hashlib.sha256(data).hexdigest()})")


if __name__ == "__main__":
    main(*sys.argv[1:])
