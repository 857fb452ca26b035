"""The Ray Serve application: a FastAPI ingress over batched predictors of one model family.

Routes:
    ``POST /predict[?model=NAME]`` - body: a JPEG/PNG image as raw bytes or a multipart upload.
        Answers ``{"model", "version", "backend", "probabilities": {label: p}, "top_class",
        "top_probability", "malignant_probability"}``; the malignant probability is the sum over
        the artifact's malignant labels (SkinDistilViT's cancer-vs-benign view, seed 000 section 5.4).
    ``GET /models`` - the family: name, version, parameters, size, validation BMA, latency.
    ``GET /healthz`` - liveness (the one route that never needs the API key).

When ``RAYKD_API_KEY`` is set in the replica's environment every other route needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 otherwise); a prediction that takes
longer than ``request_timeout_s`` answers 503; an unexpected fault answers
``{"error": "internal error", "request_id": ...}`` and is logged with that id
(:mod:`raykd.serve.guard`).

Requests are grouped by ``@serve.batch`` (decoding, then one forward pass per model per batch) and
run in a worker thread so the event loop keeps accepting requests while a batch computes. Bad
requests are answered 4xx with ``{"error": ...}`` by :mod:`raykd.serve.intake`: content type, size,
signature and declared dimensions before queueing, corrupt or truncated data when decoded (the
other requests of that batch are still answered).

Started the same way by ``python -m raykd.serve``, ``serve run raykd.serve.app:build_app
registry=FILE`` and ``serve deploy deploy/serve_config.yaml``; ``build_app`` takes typed
:class:`ServeArgs` (Serve validates the config's ``args`` against it).
"""

# No ``from __future__ import annotations`` here: Serve and FastAPI read these annotations at run
# time (Serve checks that build_app's parameter is a pydantic model class).

import asyncio
import logging
import os
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from raykd.serve.family import Family, family_from_paths, load_family
from raykd.serve.guard import (
    ApiKeyMiddleware,
    InternalErrorMiddleware,
    PredictionTimeout,
    announce_auth,
    error_response,
    internal_error,
    new_request_id,
    within,
)
from raykd.serve.intake import (
    Limits,
    RequestError,
    check_content_type,
    decode,
    extract_image_bytes,
    precheck,
    read_body,
)

log = logging.getLogger(__name__)

__all__ = ["ServeArgs", "ModelServer", "build_app", "bind_app", "resolve_family"]

DEPLOYMENT_NAME = "ModelServer"


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run ... key=value`` or the config's ``args``)."""

    model_config = ConfigDict(extra="forbid")

    registry: str | None = Field(None, description="family JSON written by the tune job")
    models: list[str] = Field(default_factory=list,
                              description="artifact/run folders or .onnx files ([NAME=]PATH)")
    winner: str | None = Field(None, description="default model (default: the family's winner)")
    backend: Literal["auto", "torch", "onnx"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(8, ge=1, description="1 turns batching off")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(Limits.max_image_pixels, gt=0,
                                  description="largest width x height accepted (from the image header)")
    request_timeout_s: float = Field(30.0, gt=0.0,
                                     description="a prediction taking longer answers 503")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    max_ongoing_requests: int = Field(64, ge=1)
    onnx_cache_dir: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ServeArgs":
        if bool(self.registry) == bool(self.models):
            raise ValueError("give exactly one of 'registry' (a family file) or 'models' (paths)")
        return self


def resolve_family(args: ServeArgs) -> Family:
    """The family to serve, with absolute paths (fails early, naming the bad file or name)."""
    if args.registry:
        family = load_family(args.registry)
        if args.winner:
            family.get(args.winner)
            family.winner = args.winner
        return family
    return family_from_paths(args.models, winner=args.winner)


def _request_id() -> str:
    """Serve's id of the current request (the ``X-Request-ID`` it answers with), else a new one."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or new_request_id()
    except Exception:  # noqa: BLE001 - a private Serve API: never let it break an error answer
        return new_request_id()


fastapi_app = FastAPI(title="raykd", description="Skin-lesion classifier family served by Ray Serve")
# Added last = outermost: the key is checked first; any fault inside becomes a logged 500.
fastapi_app.add_middleware(InternalErrorMiddleware, request_id=_request_id)
fastapi_app.add_middleware(ApiKeyMiddleware)


def _file_size(path: str | None) -> int:
    if not path:
        return 0
    if os.path.isdir(path):  # an artifact folder: its weights file
        path = os.path.join(path, "model.safetensors")
    return os.path.getsize(path)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class ModelServer:
    """One replica: every model of the family loaded, answering over HTTP.

    Args:
        family: ``Family.to_dict()`` with absolute paths.
        args: ``ServeArgs.model_dump()``.
    """

    def __init__(self, family: dict, args: dict) -> None:
        from raykd.serve.predictor import load_predictor, measure_latency_ms

        self.args = ServeArgs.model_validate(args)
        self.family = Family.from_dict(family)
        announce_auth()  # one warning when RAYKD_API_KEY is unset: the endpoint is open
        self.limits = Limits(self.args.max_body_bytes, self.args.max_image_pixels)
        self.predictors = {}
        self.measured_ms: dict[str, float] = {}
        for entry in self.family.models:
            predictor = load_predictor(entry, backend=self.args.backend, device=self.args.device,
                                       cache_dir=self.args.onnx_cache_dir)
            self.predictors[entry.name] = predictor
            self.measured_ms[entry.name] = measure_latency_ms(predictor)
            log.info("serving %s via %s (%.1f ms/image)", entry.name, predictor.backend,
                     self.measured_ms[entry.name])
        self.batches = self.batched_requests = 0
        self._batch.set_max_batch_size(self.args.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def _run(self, names: list[str], blobs: list[bytes]) -> list:
        """Run one batch: decode every image, then one forward pass per model named in it.

        Returns, in request order, ``(probabilities, backend that answered)`` or the
        :class:`RequestError` of an image that would not decode (the others still get answers).
        """
        out: list = [None] * len(names)
        images = {}
        for i, data in enumerate(blobs):
            try:
                images[i] = decode(data)
            except RequestError as exc:
                out[i] = exc
        for name in dict.fromkeys(names):
            predictor = self.predictors[name]
            idx = [i for i, n in enumerate(names) if n == name and i in images]
            if not idx:
                continue
            fallbacks = getattr(predictor, "fallbacks", 0)
            probs = predictor.predict([images[i] for i in idx])
            fell_back = getattr(predictor, "fallbacks", 0) > fallbacks
            backend = "onnx (fallback)" if fell_back else predictor.backend
            for row, i in enumerate(idx):
                out[i] = (probs[row], backend)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, names: list[str], blobs: list[bytes]) -> list:
        self.batches += 1
        self.batched_requests += len(names)
        return await asyncio.to_thread(self._run, names, blobs)

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": self.family.names, "winner": self.family.winner, "pid": os.getpid()}

    @fastapi_app.get("/models")
    async def models(self) -> dict:
        rows = []
        for entry in self.family.models:
            predictor = self.predictors[entry.name]
            rows.append({
                "name": entry.name,
                "version": entry.version,
                "backend": predictor.backend,
                "params": entry.params or getattr(predictor, "params", 0),
                "size_bytes": entry.size_bytes or _file_size(entry.onnx or entry.artifact),
                "val_bma": entry.val_bma,
                "latency_ms": entry.latency_ms,
                "measured_latency_ms": round(self.measured_ms[entry.name], 3),
                "fallbacks": getattr(predictor, "fallbacks", 0),
                "label_names": predictor.meta.label_names,
                "malignant": predictor.meta.malignant,
            })
        batching = {"max_batch_size": self.args.max_batch_size, "batches": self.batches,
                    "requests": self.batched_requests}
        return {"winner": self.family.winner, "models": rows, "batching": batching}

    @fastapi_app.post("/predict")
    async def predict(self, request: Request, model: str | None = None):
        try:
            try:
                entry = self.family.get(model)
            except KeyError as exc:
                raise RequestError(404, str(exc.args[0])) from None
            content_type = request.headers.get("content-type")
            check_content_type(content_type)  # before reading any of the body
            body = await read_body(request.headers.get("content-length"), request.stream(), self.limits)
            data = await extract_image_bytes(content_type, body, self.limits)
            precheck(data, self.limits)  # header only: cheap enough for the event loop
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        try:
            result = await within(self._batch(entry.name, data), self.args.request_timeout_s)
        except PredictionTimeout as exc:
            log.warning("prediction with %s timed out after %g s (request %s)", entry.name,
                        exc.timeout_s, _request_id())
            return error_response(503, str(exc), headers={"Retry-After": "1"})
        except Exception:  # noqa: BLE001 - a model fault must not kill the replica
            rid = _request_id()
            log.exception("prediction with %s failed (request %s)", entry.name, rid)
            return internal_error(rid)
        if isinstance(result, RequestError):
            return error_response(result.status, result.message)
        probs, backend = result
        meta = self.predictors[entry.name].meta
        top = int(np.argmax(probs))
        return {
            "model": entry.name,
            "version": entry.version or meta.version,
            "backend": backend,
            "probabilities": {name: float(p) for name, p in zip(meta.label_names, probs)},
            "top_class": meta.label_names[top],
            "top_probability": float(probs[top]),
            "malignant_probability": float(sum(probs[i] for i in meta.malignant_indices())),
        }


def build_app(args: ServeArgs) -> Application:
    """Typed application builder (``serve run raykd.serve.app:build_app registry=FILE``).

    The family is resolved here, on the driver, so a missing file or an unknown winner fails
    before any replica starts.
    """
    return bind_app(args)


def bind_app(args: ServeArgs | dict, *, env_vars: dict[str, str] | None = None) -> Application:
    """:func:`build_app` with extra environment variables for the replicas (``runtime_env``).

    For tests and for drivers that connect to a running cluster; the variables become part of the
    deployment's config (visible in the dashboard), so a production key belongs in the pods' env.
    """
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    family = resolve_family(args)
    actor_options: dict = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    if env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
    return ModelServer.options(
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(family.to_dict(), args.model_dump())
