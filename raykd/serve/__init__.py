"""Serving: Ray-free predictors (torch, ONNX Runtime), the model family file, and the Ray Serve app.

``python -m raykd.serve --family FILE`` or ``--model PATH ...``. Importing this package does not
import Ray; the Serve app lives in :mod:`raykd.serve.app`.
"""
