"""What a run leaves behind and every later stage reads: the saved model format (weights, the
preprocessing contract, the rebuild recipe), the contract inside ONNX files, the predictors of a
saved model, and the run folder's layout (:mod:`raykd.artifact.rundir`).

It sits below training, export, serving and the search, so none of them imports another to read
a model.
"""

from raykd.artifact.format import (
    BEST_DIR,
    META_NAME,
    WEIGHTS_NAME,
    ArtifactMeta,
    build_model,
    count_params,
    find_artifact,
    load_artifact,
    read_meta,
    save_artifact,
    write_meta,
)

__all__ = ["BEST_DIR", "META_NAME", "WEIGHTS_NAME", "ArtifactMeta", "build_model", "count_params", "find_artifact",
           "load_artifact", "read_meta", "save_artifact", "write_meta"]
