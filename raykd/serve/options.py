"""The options of serving, typed and defined once.

:class:`ServeArgs` is what the Serve application is built from: ``serve run
raykd.serve.app:build_app key=value``, the ``args`` of a Serve config file (``deploy/*.yaml``)
and ``raykd serve``, whose flags are made from its fields (:mod:`raykd.serve.__main__`).
:class:`ServerOptions` is what only ``raykd serve`` is told: where to listen and which Ray cluster
to join (a Serve config file says that in its own ``http_options``).

Serving fails closed (:func:`raykd.serve.guard.check_bind`): without ``RAYKD_API_KEY`` it starts on
a loopback bind only, unless ``allow_unauthenticated`` is set (``--allow-unauthenticated``).

Load and memory are bounded by four of these options: ``max_queued_requests`` (requests waiting at
each Serve HTTP proxy; beyond it Serve answers 503 with ``Retry-After``), ``max_pixels_in_flight``
(the decoded pixels a replica holds at once, :class:`raykd.serve.guard.PixelBudget`; beyond it the
replica answers 503 with ``Retry-After``), ``request_timeout_s`` (one deadline per request, the
body upload included) and ``proxy_timeout_s`` (the proxy's own end-to-end limit, queueing included).

Each field's default, type, constraint and description (the flag's help) are written here and
nowhere else: the request :class:`~raykd.serve.intake.Limits` default to these fields too. This
module imports pydantic only (no Ray, no torch), so ``raykd serve --help`` stays fast.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["IMAGE_COPIES", "ServeArgs", "ServerOptions", "default"]

#: Full-size decoded copies of its image a request holds at its peak, by ``tta``: its views (the
#: image; with ``flip`` also its two mirror images, :func:`raykd.serve.backend.predict_tta`) plus
#: one working copy (the decoder's BGR frame before the RGB conversion, or a preprocessing step's
#: output). A request reserves width x height x this from its replica's pixel budget.
IMAGE_COPIES: dict[str, int] = {"none": 2, "flip": 4}


class ServeArgs(BaseModel):
    """Arguments of :func:`~raykd.serve.app.build_app` (``serve run ... key=value``, a config's ``args``)."""

    model_config = ConfigDict(extra="forbid")

    family: str | None = Field(None, description=(
        "family file (family.json) written by the tune job, a path or a URI such as "
        "s3://bucket/runs/family.json"))
    models: list[str] = Field(default_factory=list, description="artifact/run folders or .onnx files ([NAME=]PATH)")
    winner: str | None = Field(None, description=(
        "default model (default: the family's winner / first --model)"))
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="auto: torch on GPU when present, else ONNX Runtime on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="device of the torch backend; auto picks cuda when present")
    max_batch_size: int = Field(8, ge=1, description=(
        "most requests a replica runs as one batch; 1 turns batching off"))
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, description=(
        "seconds a replica waits to fill a batch (0: take what is queued)"))
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0, description=(
        "largest request body accepted, in bytes (a multipart envelope included)"))
    max_image_pixels: int = Field(25_000_000, gt=0, description=(
        "largest image accepted, in width x height pixels (read from the image header)"))
    request_timeout_s: float = Field(30.0, gt=0.0, description=(
        "seconds a request may take in its replica, reading the body included: a body not received "
        "by then answers 408, a prediction not finished by then 503 (JSON, with Retry-After)"))
    max_pixels_in_flight: int = Field(150_000_000, gt=0, description=(
        "decoded pixels a replica holds at once, summed over its requests (width x height x 2 per "
        "image, x 4 with tta=flip; 3 bytes each: the default is 450 MB); a request that does not fit "
        "answers 503 with Retry-After at once. At least 4 x max_image_pixels"))
    max_queued_requests: int = Field(64, ge=-1, description=(
        "requests each Serve HTTP proxy holds waiting for a replica with a free slot "
        "(max_ongoing_requests); beyond it Serve answers 503 with Retry-After (-1: no limit)"))
    retry_after_s: int = Field(1, ge=1, description=(
        "the Retry-After header, in seconds, of every 503: queue full, pixel budget spent, prediction "
        "timeout"))
    num_replicas: int = Field(1, ge=1, description="replicas of the deployment")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica")
    max_ongoing_requests: int = Field(64, ge=1, description=(
        "requests a replica holds at once (queued or running)"))
    onnx_cache_dir: str | None = Field(None, description=(
        "folder kept for the ONNX files exported at startup for models that have none (default: a "
        "temporary folder)"))
    allow_unauthenticated: bool = Field(False, description=(
        "serve without an API key on a bind other machines can reach (0.0.0.0, ::, a LAN address), on "
        "purpose; without it serving refuses to start there unless RAYKD_API_KEY is set (a loopback "
        "bind such as 127.0.0.1 serves without a key, with a warning)"))

    @model_validator(mode="after")
    def _one_source(self) -> "ServeArgs":
        if bool(self.family) == bool(self.models):
            raise ValueError("give exactly one of 'family' (a family file) or 'models' (paths)")
        return self

    @model_validator(mode="after")
    def _limits_agree(self) -> "ServeArgs":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or a positive number of requests")
        largest = self.max_image_pixels * max(IMAGE_COPIES.values())
        if self.max_pixels_in_flight < largest:
            raise ValueError(
                f"max_pixels_in_flight={self.max_pixels_in_flight} cannot hold one image of "
                f"max_image_pixels={self.max_image_pixels} with tta=flip ({max(IMAGE_COPIES.values())} "
                f"copies = {largest} pixels), which would be refused forever: raise max_pixels_in_flight "
                f"to at least {largest} or lower max_image_pixels")
        return self


class ServerOptions(BaseModel):
    """Where ``raykd serve`` serves: the HTTP proxy's address and the Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description=(
        "HTTP bind address, of the proxy and of --direct-port's replica ports; 0.0.0.0 to expose "
        "(needs RAYKD_API_KEY, or --allow-unauthenticated)"))
    port: int = Field(8000, description="HTTP port")
    direct_port: int | None = Field(None, description=(
        "also answer on each replica's own port (PORT, PORT+1, ...), skipping Serve's proxy hop "
        "(Ray Serve's direct ingress; a local cluster started here only)"))
    address: str | None = Field(None, description="Ray cluster address (default: $RAY_ADDRESS or local)")
    proxy_timeout_s: float = Field(60.0, gt=0.0, description=(
        "seconds the Serve HTTP proxy gives a request end to end, waiting in its queue included, "
        "before it answers 408 (plain text); keep it above --request-timeout-s so the app's own "
        "JSON answers come first"))


def default(model: type[BaseModel], name: str) -> Any:
    """The default of ``model``'s field ``name`` (a factory's value for a ``default_factory``)."""
    return model.model_fields[name].get_default(call_default_factory=True)
