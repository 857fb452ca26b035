"""Model artifacts, ONNX export with a parity check, and fp16 / int8 variants.

``python -m raykd.export --model RUN_DIR [--fp16] [--int8]``.
"""
