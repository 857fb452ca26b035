"""ONNX export with a dynamic batch axis, and the fp16 / int8 variants.

The exported graph maps normalised NCHW float32 images to logits, exactly like the torch model; the
softmax and the preprocessing stay in the shared predictor code so the torch and ONNX Runtime paths
cannot drift apart. The preprocessing contract (:class:`~raykd.artifact.ArtifactMeta`:
size, mean, std, label names, benign/malignant map) is written into the model's
``metadata_props``, so an ONNX file alone is servable.

Variants:
- fp16: weights and activations in half precision with float32 inputs/outputs (casts at the
  edges). The fusion-teacher paper (Islam et al. fusion paper, section 3.7) shrinks its student from 2.03 MB to
  469.77 KB with 16-bit quantisation; here the file size halves and the BMA change is measured.
- int8: ONNX Runtime dynamic quantisation (int8 weights, activations quantised on the fly), which
  needs no calibration data and speeds up the MatMul-heavy ViT students on CPU.

torch 2.14's default exporter (``dynamo=True``) needs ``onnxscript``, which is not a dependency;
the TorchScript exporter is used, with ``external_data=False`` semantics (one self-contained file;
all our models are far below the 2 GB protobuf limit).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from raykd.artifact.format import ArtifactMeta
from raykd.artifact.onnx_meta import (  # noqa: F401 - part of this module's API
    FP16_NAME,
    INT8_NAME,
    META_KEY,
    ONNX_NAME,
    meta_from_props,
    read_onnx_meta,
    read_onnx_props,
)
from raykd.data.transforms import PreprocessSpec
from raykd.export.options import ExportConfig

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "ONNX_NAME",
    "FP16_NAME",
    "INT8_NAME",
    "META_KEY",
    "export_onnx",
    "convert_fp16",
    "quantize_int8",
    "read_onnx_meta",
    "read_onnx_props",
    "meta_from_props",
]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = ExportConfig.opset


class ExportError(RuntimeError):
    """The model cannot be converted to ONNX (an unsupported operator)."""


class _DropQuantHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _adaptive_avg_pool2d(g, x, output_size):
    """ONNX for ``adaptive_avg_pool2d`` also when the output size does not divide the input size.

    The TorchScript exporter refuses that case (HierAttn's branch attention pools 8x8 maps to 3x3
    and 5x5, HierAttn section III-C). With static spatial sizes the op is a fixed set of windows:
    output cell ``i`` averages rows ``floor(i*H/oh)`` to ``ceil((i+1)*H/oh)`` (PyTorch's rule),
    each window exported as Slice + AveragePool, then concatenated.
    """
    from torch.onnx import symbolic_helper as sh  # lazy: torch is heavy

    oh, ow = sh._parse_arg(output_size, "is")
    if (oh, ow) == (1, 1):
        return g.op("GlobalAveragePool", x)
    sizes = sh._get_tensor_sizes(x)
    if not sizes or len(sizes) != 4 or sizes[2] is None or sizes[3] is None:
        return sh._unimplemented("adaptive_avg_pool2d", "input spatial size not static", x)
    h, w = int(sizes[2]), int(sizes[3])
    if h % oh == 0 and w % ow == 0:
        k = [h // oh, w // ow]
        return g.op("AveragePool", x, kernel_shape_i=k, strides_i=k)

    def const(values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    axes = const([2, 3])
    rows = []
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cells = []
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            window = g.op("Slice", x, const([h0, w0]), const([h1, w1]), axes)
            cells.append(g.op("AveragePool", window, kernel_shape_i=[h1 - h0, w1 - w0]))
        rows.append(g.op("Concat", *cells, axis_i=3))
    return g.op("Concat", *rows, axis_i=2)


def _input_size(meta: ArtifactMeta) -> tuple[int, int]:
    """Model input height and width: the square ``image_size`` of the preprocessing contract."""
    size = PreprocessSpec.from_dict(meta.preprocess).image_size
    return size, size


def _set_props(model_proto, meta: ArtifactMeta, extra: dict[str, str] | None = None) -> None:
    """Write the preprocessing contract into ``metadata_props`` (replacing any earlier values)."""
    props = {
        META_KEY: json.dumps(meta.to_dict(), sort_keys=True),
        "label_names": json.dumps(meta.label_names),
        "malignant": json.dumps(meta.malignant),
        "preprocess": json.dumps(meta.preprocess, sort_keys=True),
        "model_name": meta.model_name,
        "version": meta.version,
        **(extra or {}),
    }
    keep = [p for p in model_proto.metadata_props if p.key not in props]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save(model_proto, path: Path) -> Path:
    import onnx  # lazy: onnx is heavy

    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model_proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)
    return path


def _trace_to_file(model: nn.Module, meta: ArtifactMeta, tmp: Path, size: tuple[int, int],
                   opset: int) -> None:
    """Run the TorchScript exporter on ``model`` (images -> logits, dynamic batch) into ``tmp``.

    Our ``adaptive_avg_pool2d`` symbolic is registered only for the call. Any exporter failure
    becomes an :class:`ExportError` naming its first line (the full message embeds the graph).
    """
    # A batch of 2 while tracing keeps the exporter from specialising any reshape on batch 1.
    dummy = torch.zeros(2, 3, *size)
    torch.onnx.register_custom_op_symbolic("aten::adaptive_avg_pool2d", _adaptive_avg_pool2d, 9)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from timm's shape asserts; deprecation note
            torch.onnx.export(
                model, (dummy,), str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter's messages embed the whole TorchScript graph
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.debug("ONNX export of %s failed", meta.model_name, exc_info=True)
        raise ExportError(
            f"ONNX export of {meta.model_name} failed: {first[:500]}. The model uses an operator the "
            "TorchScript exporter cannot convert; serve it with torch (--backend torch)"
        ) from None
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::adaptive_avg_pool2d", 9)


def export_onnx(
    model: nn.Module,
    meta: ArtifactMeta,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (images -> logits) to one ONNX file with a dynamic batch axis.

    Args:
        model: The torch model (moved to CPU float32 for tracing; the caller's copy is not changed
            in place beyond ``eval()``).
        meta: Its metadata, stored in ``metadata_props``.
        path: Output ``.onnx`` file (written atomically).
        opset: ONNX opset.

    Returns:
        The written path.
    """
    import onnx  # lazy: onnx is heavy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = _input_size(meta)
    model = model.eval()
    params = next(model.parameters(), None)
    if params is not None and (params.device.type != "cpu" or params.dtype != torch.float32):
        raise ValueError("export_onnx expects a float32 CPU model; call model.float().cpu() first")
    tmp = path.with_name(path.name + ".raw")
    _trace_to_file(model, meta, tmp, (h, w), opset)
    try:
        model_proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    model_proto.producer_name = "raykd"
    n_params = sum(p.numel() for p in model.parameters())
    _set_props(model_proto, meta, {"precision": "fp32", "params": str(n_params)})
    onnx.checker.check_model(model_proto)
    _save(model_proto, path)
    log.info("exported %s to %s (%.1f MB)", meta.model_name, path, path.stat().st_size / 1e6)
    return path


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Half-precision copy of ``src`` with float32 inputs/outputs (the fusion paper's 16-bit model)."""
    import onnx  # lazy: onnx is heavy
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model_proto = onnx.load(str(src))
    props = {p.key: p.value for p in model_proto.metadata_props}
    meta = meta_from_props(props, source=str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some values truncated" notes for tiny weights
        half = convert_float_to_float16(model_proto, keep_io_types=True)
    _set_props(half, meta, {"precision": "fp16", "params": props.get("params", "0")})
    return _save(half, Path(dst))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation of ``src`` (weights int8, activations quantised at run time)."""
    import onnx  # lazy: onnx is heavy
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    props = read_onnx_props(src)
    meta = meta_from_props(props, source=str(src))
    tmp = dst.with_name(dst.name + ".raw")
    root, hint = logging.getLogger(), _DropQuantHint()
    root.addFilter(hint)  # quantize_dynamic logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(hint)
    try:
        model_proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    _set_props(model_proto, meta, {"precision": "int8", "params": props.get("params", "0")})
    return _save(model_proto, dst)
