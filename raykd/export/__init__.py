"""Model artifacts, ONNX export with a parity check, and fp16 / int8 variants.

``python -m raykd.export --model RUN_DIR [--fp16] [--int8]``.
"""

from raykd.artifact import ArtifactMeta, find_artifact, load_artifact, read_meta, save_artifact

__all__ = ["ArtifactMeta", "find_artifact", "load_artifact", "read_meta", "save_artifact"]
