"""The Ray Serve application: a FastAPI ingress over batched predictors of one model family.

Routes:
    ``POST /predict[?model=NAME | ?max_latency_ms=MS&max_size_mb=MB][&tta=flip]`` - body: a
        JPEG/PNG image as raw bytes or a multipart upload. Answers ``{"model", "version",
        "backend", "probabilities": {label: p}, "top_class", "top_probability",
        "malignant_probability", "malignant_decision", "decision_threshold", "tta", "budget"}``.
        The malignant probability is the sum over the artifact's malignant labels (SkinDistilViT's
        cancer-vs-benign view, SkinDistilViT section 5.4). ``malignant_decision`` is
        ``malignant_probability >= decision_threshold``, the operating point chosen at export
        (``meta.decision["threshold"]``); both are ``null`` for a model without one.
        **Budgets**: without ``model=``, ``max_latency_ms`` and/or ``max_size_mb`` (10^6 bytes)
        pick the member with the best validation BMA within them (:meth:`Family.within_budget`;
        latency = the one recorded at export/search, else this replica's measurement); ``budget``
        echoes them (``null`` without). None fits: 422 naming the budget and the fastest and
        smallest models on offer; ``model=`` with a budget: 400. **TTA**: ``tta=flip`` averages
        the probabilities of the image and its horizontal and vertical flips (any backend,
        :func:`raykd.serve.backend.predict_tta`; about 3x the compute); default ``none``.
    ``POST /explain[?model=NAME][&target=LABEL]`` - same body, checks and key as ``/predict``.
        Answers ``image/png``: the heatmap of the explained class (default the top class) over the
        image at the model's input size (:mod:`raykd.serve.explain`: Grad-CAM for CNNs,
        gradient-weighted attention rollout for ViTs). The prediction travels in headers:
        ``X-Model``, ``X-Top-Class``, ``X-Top-Probability``, ``X-Malignant-Probability``,
        ``X-Probabilities`` (JSON), ``X-Explained-Class``, ``X-Explanation-Method``, and
        ``X-Malignant-Decision`` / ``X-Decision-Threshold`` when the model has an operating point
        (label names that are not ASCII are percent-encoded). Explanations need the torch model:
        it is the served one (backend torch) or, for a member served through ONNX Runtime, loaded
        on CPU from its artifact folder on first use; an ONNX-only member answers 409.
    ``GET /models`` - the family: name, version, parameters, size, validation BMA, latency, and
        ``budget``: the figures budgets are checked against (``latency_ms``, ``latency_from``
        ``"export"`` or ``"measured"``, ``size_mb``); ``pixel_budget``: this replica's decoded
        pixels in flight (``capacity``, ``in_use``, ``peak``, ``refused``).
    ``GET /models/{name}/card[?format=md]`` - the member's ``model_card.json`` (or
        ``model_card.md`` as ``text/markdown``) from its artifact folder (or its ONNX file's
        folder); 404 naming the file when it has none.
    ``GET /healthz`` - liveness (the one route that never needs the API key).

When ``RAYKD_API_KEY`` is set in the replica's environment every other route needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 otherwise); without it
:func:`build_app` refuses to build for a Serve HTTP host other machines can reach, unless the
``allow_unauthenticated`` arg is set (:func:`~raykd.serve.guard.check_bind`); an unexpected fault
answers ``{"error": "internal error", "request_id": ...}`` and is logged with that id
(:mod:`raykd.serve.guard`).

Load and memory limits (each answer JSON, each 503 with ``Retry-After: retry_after_s``): a request
has ``request_timeout_s`` from the moment its replica starts it, for its whole body to arrive (else
408) and for its prediction (else 503); before decoding, its image's width x height x copies
(:data:`~raykd.serve.options.IMAGE_COPIES`: 2, or 4 with ``tta=flip``) is reserved from the
replica's ``max_pixels_in_flight`` (:class:`~raykd.serve.guard.PixelBudget`), and a request that
does not fit is answered 503 at once. In front of the replicas Serve's own limits hold:
``max_queued_requests`` waiting at each HTTP proxy (beyond: 503 with ``Retry-After``, plain text)
and the proxy's ``request_timeout_s`` (``proxy_timeout_s`` of ``raykd serve``; beyond: 408, plain
text).

Each request decodes its image in a worker thread, then joins ``@serve.batch``: one forward pass
per model per batch, in a worker thread too, so the event loop keeps accepting requests while a
batch computes. The batch does not wait for company by default (``batch_wait_timeout_s=0``): a lone
request runs at once, and under load the requests that arrived while one batch computed form the
next (``bench/serve.py`` measures both). Bad requests are answered 4xx with ``{"error": ...}`` by
:mod:`raykd.serve.intake`: content type, size, signature and declared dimensions before queueing,
corrupt or truncated data when decoded.

Started the same way by ``python -m raykd.serve``, ``serve run raykd.serve.app:build_app
family=FILE`` and ``serve deploy deploy/serve_config.yaml``; ``build_app`` takes typed
:class:`ServeArgs` (Serve validates the config's ``args`` against it).
"""

# No ``from __future__ import annotations`` here: Serve and FastAPI read these annotations at run
# time (Serve checks that build_app's parameter is a pydantic model class).

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from raykd.data.manifest import is_uri
from raykd.raycompat import serve_http_host
from raykd.serve.family import BYTES_PER_MB, Family, FamilyEntry, family_from_paths, load_family
from raykd.serve.guard import (
    ApiKeyMiddleware,
    Deadline,
    InternalErrorMiddleware,
    Overloaded,
    PixelBudget,
    RequestTimeout,
    UploadTimeout,
    announce_auth,
    api_key_from_env,
    check_bind,
    error_response,
    internal_error,
    new_request_id,
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
from raykd.serve.options import IMAGE_COPIES, ServeArgs

if TYPE_CHECKING:
    from raykd.artifact.format import ArtifactMeta

log = logging.getLogger(__name__)

CARD_FILES = {"json": "model_card.json", "md": "model_card.md"}

__all__ = ["ServeArgs", "ModelServer", "build_app", "bind_app", "resolve_family"]

DEPLOYMENT_NAME = "ModelServer"
#: What a route answers on purpose, without a traceback: a 4xx, a timeout (408/503), no room (503).
REFUSALS = (RequestError, RequestTimeout, Overloaded)


def resolve_family(args: ServeArgs) -> Family:
    """The family to serve, with absolute paths (fails early, naming the bad file or name)."""
    if args.family:
        family = load_family(args.family)
        if args.winner:
            family.get(args.winner)
            family.winner = args.winner
        return family
    return family_from_paths(args.models, winner=args.winner)


def _request_id() -> str:
    """Serve's id of the current request (the ``X-Request-ID`` it answers with), else a new one."""
    try:
        from ray.serve.context import _get_serve_request_context  # lazy: ray is heavy

        return _get_serve_request_context().request_id or new_request_id()
    except Exception:  # noqa: BLE001 - a private Serve API: never let it break an error answer
        return new_request_id()


fastapi_app = FastAPI(title="raykd", description="Skin-lesion classifier family served by Ray Serve")
# Added last = outermost: the key is checked first; any fault inside becomes a logged 500.
fastapi_app.add_middleware(InternalErrorMiddleware, request_id=_request_id)
fastapi_app.add_middleware(ApiKeyMiddleware)


def _number(name: str, raw: str | None, unit: str) -> float | None:
    """A budget query parameter as a float, or a 422 naming it."""
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise RequestError(422, f"{name} must be a number of {unit}, got {raw!r}") from None


def _decision(meta: "ArtifactMeta", malignant: float) -> dict:
    """The cancer-vs-benign decision at the export's operating point, or nulls without one."""
    threshold = (meta.decision or {}).get("threshold")
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        return {"malignant_decision": None, "decision_threshold": None}
    return {"malignant_decision": bool(malignant >= threshold), "decision_threshold": float(threshold)}


def _header_text(text: str) -> str:
    """A header-safe value: ASCII text as is, anything else percent-encoded (UTF-8)."""
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


def _entry_folder(entry: FamilyEntry) -> Path:
    """Where a member's side files (model card) live: its artifact folder, else its ONNX file's."""
    if entry.artifact:
        from raykd.artifact.format import find_artifact  # lazy: imports torch

        return find_artifact(entry.artifact)
    return Path(entry.onnx).parent


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
        from raykd.serve.backend import load_predictor, measure_latency_ms  # lazy: imports torch

        self.args = ServeArgs.model_validate(args)
        if self.args.family and is_uri(self.args.family):  # this node's own copy of the models in the bucket
            family = resolve_family(self.args).to_dict()
        self.family = Family.from_dict(family)
        announce_auth()  # one warning when RAYKD_API_KEY is unset: the endpoint is open
        self.limits = Limits(self.args.max_body_bytes, self.args.max_image_pixels)
        self.pixel_budget = PixelBudget(self.args.max_pixels_in_flight)
        self.predictors = {}
        self.measured_ms: dict[str, float] = {}
        self._explain_models: dict = {}  # torch models loaded for /explain next to ONNX predictors
        self._explain_lock = threading.Lock()
        for entry in self.family.models:
            if not entry.size_bytes:  # budgets and /models need it
                entry.size_bytes = _file_size(entry.onnx or entry.artifact)
            predictor = load_predictor(entry, backend=self.args.backend, device=self.args.device,
                                       cache_dir=self.args.onnx_cache_dir)
            self.predictors[entry.name] = predictor
            self.measured_ms[entry.name] = measure_latency_ms(predictor)
            log.info("serving %s via %s (%.1f ms/image)", entry.name, predictor.backend,
                     self.measured_ms[entry.name])
        self.batches = self.batched_requests = 0
        self._batch.set_max_batch_size(self.args.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def _run(self, names: list[str], images: list[np.ndarray], ttas: list[str]) -> list:
        """Run one batch of decoded images: one forward pass per model (and TTA) named in it.

        Returns, in request order, ``(probabilities, backend that answered)``.
        """
        from raykd.serve.backend import predict_tta  # lazy: imports torch

        out: list = [None] * len(names)
        for name, tta in dict.fromkeys(zip(names, ttas, strict=True)):
            predictor = self.predictors[name]
            idx = [i for i, key in enumerate(zip(names, ttas)) if key == (name, tta)]
            fallbacks = getattr(predictor, "fallbacks", 0)
            probs = predict_tta(predictor, [images[i] for i in idx], tta)
            fell_back = getattr(predictor, "fallbacks", 0) > fallbacks
            backend = "onnx (fallback)" if fell_back else predictor.backend
            for row, i in enumerate(idx):
                out[i] = (probs[row], backend)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batch(self, names: list[str], images: list[np.ndarray], ttas: list[str]) -> list:
        self.batches += 1
        self.batched_requests += len(names)
        return await asyncio.to_thread(self._run, names, images, ttas)

    async def _predict(self, name: str, data: bytes, tta: str):
        """Decode in a worker thread (requests decode side by side, and beside the batch being
        computed), then join the model's next batch. Raises :class:`RequestError` for an image
        that does not decode."""
        image = await asyncio.to_thread(decode, data)
        return await self._batch(name, image, tta)

    def _entry(self, name: str | None) -> FamilyEntry:
        try:
            return self.family.get(name)
        except KeyError as exc:
            raise RequestError(404, str(exc.args[0])) from None

    async def _image_bytes(self, request: Request) -> tuple[bytes, int]:
        """The checked image bytes of a request (checks 1-5 of :mod:`raykd.serve.intake`) and the
        image's width x height, read from its header."""
        content_type = request.headers.get("content-type")
        check_content_type(content_type)  # before reading any of the body
        body = await read_body(request.headers.get("content-length"), request.stream(), self.limits)
        data = await extract_image_bytes(content_type, body, self.limits)
        width, height = precheck(data, self.limits)  # header only: cheap enough for the event loop
        return data, width * height

    async def _admit(self, request: Request, deadline: Deadline, copies: int) -> tuple[bytes, int]:
        """The request's checked image bytes, read within its deadline (else :class:`UploadTimeout`),
        and the pixels reserved for decoding it: width x height x ``copies`` from the replica's
        budget (else :class:`Overloaded`, at once). The caller releases them once it answers."""
        data, pixels = await deadline.run(self._image_bytes(request), UploadTimeout)
        return data, self.pixel_budget.reserve(pixels * copies)

    def _refusal(self, exc: Exception, what: str) -> JSONResponse:
        """The JSON answer to a request refused on purpose (one of :data:`REFUSALS`)."""
        retry = {"Retry-After": str(self.args.retry_after_s)}
        if isinstance(exc, RequestError):
            return error_response(exc.status, exc.message)
        if isinstance(exc, RequestTimeout):
            log.warning("%s timed out after %g s (request %s)", what, exc.timeout_s, _request_id())
            return error_response(exc.status, str(exc), headers=retry if exc.status == 503 else None)
        log.debug("refused %s: %s", what, exc)  # Overloaded: Serve's access log counts the 503s
        return error_response(503, str(exc), headers=retry)

    def _budget_figures(self, entry: FamilyEntry) -> dict:
        latency = self.family.budget_latency_ms(entry, self.measured_ms)
        return {"latency_ms": None if latency is None else round(latency, 3),
                "latency_from": "export" if entry.latency_ms is not None else "measured",
                "size_mb": round(entry.size_bytes / BYTES_PER_MB, 6) if entry.size_bytes else None}

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
                "size_bytes": entry.size_bytes,
                "val_bma": entry.val_bma,
                "latency_ms": entry.latency_ms,
                "measured_latency_ms": round(self.measured_ms[entry.name], 3),
                "fallbacks": getattr(predictor, "fallbacks", 0),
                "label_names": predictor.meta.label_names,
                "malignant": predictor.meta.malignant,
                "budget": self._budget_figures(entry),
            })
        batching = {"max_batch_size": self.args.max_batch_size, "batches": self.batches,
                    "requests": self.batched_requests}
        return {"winner": self.family.winner, "models": rows, "batching": batching,
                "pixel_budget": self.pixel_budget.stats()}

    def _choose(self, model: str | None, max_latency_ms: str | None, max_size_mb: str | None) -> tuple:
        """The entry a /predict request names or affords, and the budget it gave (or None)."""
        budget = {"max_latency_ms": _number("max_latency_ms", max_latency_ms, "milliseconds"),
                  "max_size_mb": _number("max_size_mb", max_size_mb, "megabytes (10^6 bytes)")}
        if all(v is None for v in budget.values()):
            return self._entry(model), None
        if model is not None:
            raise RequestError(400, "give either model=NAME or a budget (max_latency_ms, max_size_mb), "
                                    "not both: a budget chooses the model")
        try:
            entry = self.family.within_budget(**budget, measured_latency_ms=self.measured_ms)
        except ValueError as exc:  # BudgetError included: both say what to send instead
            raise RequestError(422, str(exc)) from None
        return entry, {k: v for k, v in budget.items() if v is not None}

    @fastapi_app.post("/predict")
    async def predict(self, request: Request, model: str | None = None, max_latency_ms: str | None = None,
                      max_size_mb: str | None = None, tta: str = "none"):
        from raykd.serve.backend import TTA_MODES  # lazy: imports torch

        deadline = Deadline(self.args.request_timeout_s)  # the body's upload counts too
        try:
            entry, budget = self._choose(model, max_latency_ms, max_size_mb)
            if tta not in TTA_MODES:
                raise RequestError(422, f"tta={tta!r}: use one of {list(TTA_MODES)}")
            data, pixels = await self._admit(request, deadline, IMAGE_COPIES[tta])
        except REFUSALS as exc:
            return self._refusal(exc, "reading a /predict request")
        try:
            probs, backend = await deadline.run(self._predict(entry.name, data, tta))
        except REFUSALS as exc:  # the image did not decode, or the prediction timed out
            return self._refusal(exc, f"prediction with {entry.name}")
        except Exception:  # noqa: BLE001 - a model fault must not kill the replica
            rid = _request_id()
            log.exception("prediction with %s failed (request %s)", entry.name, rid)
            return internal_error(rid)
        finally:
            self.pixel_budget.release(pixels)
        return self._prediction(entry, probs, backend, tta, budget)

    def _prediction(self, entry: FamilyEntry, probs: np.ndarray, backend: str, tta: str,
                    budget: dict | None) -> dict:
        """The body of a /predict answer."""
        meta = self.predictors[entry.name].meta
        top = int(np.argmax(probs))
        malignant = float(sum(probs[i] for i in meta.malignant_indices()))
        return {
            "model": entry.name,
            "version": entry.version or meta.version,
            "backend": backend,
            "probabilities": {name: float(p) for name, p in zip(meta.label_names, probs)},
            "top_class": meta.label_names[top],
            "top_probability": float(probs[top]),
            "malignant_probability": malignant,
            **_decision(meta, malignant),
            "tta": tta,
            "budget": budget,
        }

    @fastapi_app.get("/models/{name}/card")
    async def model_card(self, name: str, fmt: str = Query("json", alias="format")):
        try:
            entry = self._entry(name)
            if fmt not in CARD_FILES:
                raise RequestError(400, f"format={fmt!r}: use 'json' (model_card.json) or 'md' (model_card.md)")
            folder = _entry_folder(entry)
            path = folder / CARD_FILES[fmt]
            if not path.is_file():
                raise RequestError(404, f"model {name!r} has no model card ({CARD_FILES[fmt]} is not next to "
                                        "its weights); `python -m raykd.export` writes one")
            if not path.resolve().is_relative_to(folder.resolve()):  # a link out of the folder serves nothing
                log.error("model card %s of %s links outside its folder %s: not served", path, name, folder)
                raise RequestError(404, f"model {name!r} has no model card inside its folder")
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        if fmt == "md":
            return Response(text, media_type="text/markdown; charset=utf-8")
        try:
            return JSONResponse(json.loads(text))
        except json.JSONDecodeError:
            log.error("model card %s of %s is not valid JSON", path, name)
            return error_response(500, f"the model card of {name!r} is not valid JSON; re-export the model")

    def _torch_model_for(self, entry: FamilyEntry):
        """The torch model explaining ``entry``: the served one, else loaded on CPU from its
        artifact (once; in a worker thread, since loading takes a moment)."""
        from raykd.serve.backend import torch_model  # lazy: imports torch

        model = torch_model(self.predictors[entry.name])
        if model is not None:
            return model
        with self._explain_lock:
            if entry.name not in self._explain_models:
                from raykd.artifact.format import load_artifact  # lazy: imports torch

                self._explain_models[entry.name] = load_artifact(entry.artifact, device="cpu")[0]
                log.info("loaded the torch model of %s on CPU for explanations", entry.name)
            return self._explain_models[entry.name]

    def _explain(self, entry: FamilyEntry, data: bytes, target: int | None) -> tuple:
        from raykd.serve.explain import encode_png, explain, overlay  # lazy: imports torch

        image = decode(data)
        meta = self.predictors[entry.name].meta
        result = explain(self._torch_model_for(entry), meta, image, target=target)
        return result, encode_png(overlay(result.view, result.heatmap))

    @fastapi_app.post("/explain")
    async def explain(self, request: Request, model: str | None = None, target: str | None = None):
        from raykd.serve.backend import torch_model  # lazy: imports torch

        deadline = Deadline(self.args.request_timeout_s)
        try:
            entry = self._entry(model)
            meta = self.predictors[entry.name].meta
            if torch_model(self.predictors[entry.name]) is None and not entry.artifact:
                raise RequestError(409, f"model {entry.name!r} is served from an ONNX file only; explanations "
                                        "need the torch model: serve it with backend=torch, or backend=auto "
                                        "with its artifact folder")
            if target is not None and target not in meta.label_names:
                raise RequestError(422, f"target={target!r} is not one of the model's classes {meta.label_names}")
            target_index = None if target is None else meta.label_names.index(target)
            data, pixels = await self._admit(request, deadline, IMAGE_COPIES["none"])
        except REFUSALS as exc:
            return self._refusal(exc, "reading an /explain request")
        try:
            result, png = await deadline.run(asyncio.to_thread(self._explain, entry, data, target_index))
        except REFUSALS as exc:  # the image would not decode, or the explanation timed out
            return self._refusal(exc, f"explanation with {entry.name}")
        except Exception:  # a model fault must not kill the replica
            rid = _request_id()
            log.exception("explanation with %s failed (request %s)", entry.name, rid)
            return internal_error(rid)
        finally:
            self.pixel_budget.release(pixels)
        probs = result.probabilities
        top = int(np.argmax(probs))
        malignant = float(sum(probs[i] for i in meta.malignant_indices()))
        decision = _decision(meta, malignant)
        headers = {
            "X-Model": _header_text(entry.name),
            "X-Top-Class": _header_text(meta.label_names[top]),
            "X-Top-Probability": f"{float(probs[top]):.6f}",
            "X-Malignant-Probability": f"{malignant:.6f}",
            "X-Probabilities": json.dumps({n: round(float(p), 6) for n, p in zip(meta.label_names, probs)},
                                          ensure_ascii=True),
            "X-Explained-Class": _header_text(meta.label_names[result.target]),
            "X-Explanation-Method": result.method,
            "Cache-Control": "no-store",  # a patient's image: no shared caches
        }
        if decision["decision_threshold"] is not None:
            headers["X-Malignant-Decision"] = "true" if decision["malignant_decision"] else "false"
            headers["X-Decision-Threshold"] = f"{decision['decision_threshold']:g}"
        return Response(png, media_type="image/png", headers=headers)


#: How a Serve config's user spells the fixes :class:`~raykd.serve.guard.UnauthenticatedBind` names.
CONFIG_FIXES = {"bind_fix": "http_options: {host: 127.0.0.1} in the Serve config",
                "override_fix": ("the application arg allow_unauthenticated: true (serve run ... "
                                 "allow_unauthenticated=true)")}


def build_app(args: ServeArgs) -> Application:
    """Typed application builder (``serve run raykd.serve.app:build_app family=FILE``).

    Fails closed, like ``raykd serve``: without ``RAYKD_API_KEY`` in the environment it is built in
    (a ``serve deploy``/RayService build task runs on any node, the head included, so the key
    belongs on every node) and without ``allow_unauthenticated``, it raises
    :class:`~raykd.serve.guard.UnauthenticatedBind` (a ``ValueError``) unless the Serve HTTP host
    is loopback. The host is asked of the running Serve controller
    (:func:`raykd.raycompat.serve_http_host`); where it cannot be read (``serve run IMPORT_PATH``
    builds before Ray starts, so no controller exists yet) it counts as reachable from other
    machines, and the build is refused.

    The family is resolved here, on the driver, so a missing file or an unknown winner fails
    before any replica starts.
    """
    warning = check_bind(serve_http_host(), api_key_from_env(), args.allow_unauthenticated, **CONFIG_FIXES)
    if warning:
        log.warning(warning)
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
        # Serve's own queue bound: each HTTP proxy answers 503 + Retry-After beyond it.
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        ray_actor_options=actor_options,
    ).bind(family.to_dict(), args.model_dump())
