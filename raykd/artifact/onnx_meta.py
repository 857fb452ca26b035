"""The file names of a run's ONNX models and the preprocessing contract stored in them.

:func:`raykd.export.onnx.export_onnx` writes the whole :class:`~raykd.artifact.ArtifactMeta` into an
ONNX file's ``metadata_props`` (key :data:`META_KEY`), so a file alone is servable; this module reads
it back (serving, the family file, the export parity check) without importing the exporter.
"""

from __future__ import annotations

import json
import os

from raykd.artifact.format import ArtifactMeta

__all__ = ["FP16_NAME", "INT8_NAME", "META_KEY", "ONNX_NAME", "meta_from_props", "read_onnx_meta", "read_onnx_props"]

ONNX_NAME = "model.onnx"
FP16_NAME = "model.fp16.onnx"
INT8_NAME = "model.int8.onnx"
#: metadata_props key holding the whole ArtifactMeta as JSON.
META_KEY = "raykd.meta"


def meta_from_props(props: dict[str, str], *, source: str = "onnx") -> ArtifactMeta:
    """Rebuild :class:`ArtifactMeta` from an ONNX model's metadata_props map."""
    if META_KEY not in props:
        raise ValueError(
            f"{source} carries no raykd preprocessing contract (metadata key {META_KEY!r}); "
            "export it with `python -m raykd.export` so it can be served on its own"
        )
    return ArtifactMeta.from_dict(json.loads(props[META_KEY]), source=source)


def read_onnx_props(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx  # lazy: onnx is heavy

    model_proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model_proto.metadata_props}


def read_onnx_meta(path: str | os.PathLike) -> ArtifactMeta:
    """Read the preprocessing contract stored in an ONNX file."""
    return meta_from_props(read_onnx_props(path), source=str(path))
