"""Guards around the HTTP surface: the optional API key, the prediction timeout, error bodies.

Ray-free (Starlette only), so they are tested without a cluster; :mod:`raykd.serve.app` installs
them on its FastAPI ingress.

- **API key.** When ``RAYKD_API_KEY`` is set in the replica's environment, every route except
  ``GET /healthz`` needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (compared in
  constant time); otherwise the answer is a 401 JSON body with ``WWW-Authenticate: Bearer``.
  Pass the key from a secret: a Kubernetes Secret as container env of every pod (see
  ``deploy/kuberay-rayservice.yaml``), or the environment of ``ray start`` on every node; a local
  cluster started by ``serve run`` or ``python -m raykd.serve`` inherits it from the shell.
- **Fail closed.** :func:`check_bind` decides whether serving may start without a key: with a key,
  always; without one, only on a loopback bind (``127.0.0.0/8``, ``::1``, ``localhost``: reachable
  from this machine only, with a warning) or when ``allow_unauthenticated`` says to serve openly on
  purpose (a louder warning). Any other bind (``0.0.0.0``, ``::``, a LAN address, a host name, or a
  host that could not be read) raises :class:`UnauthenticatedBind` naming the three fixes.
  ``raykd serve`` checks before Ray starts; :func:`raykd.serve.app.build_app` checks too, for
  ``serve run`` and ``serve deploy``.
- **Timeout.** Each request has one :class:`Deadline`, ``request_timeout_s`` from the moment its
  replica starts it: reading the body must finish within it (else :class:`UploadTimeout`, 408: a
  client trickling its upload cannot hold a replica slot), and so must the prediction, queueing,
  decoding and forward pass (else :class:`PredictionTimeout`, 503). :func:`within` abandons the
  work rather than wait for it, so the event loop and the replica stay responsive.
- **Pixel budget.** :class:`PixelBudget` bounds the decoded pixels a replica holds at once: a
  request reserves width x height x copies (read from the image header, before any pixel is
  decoded) and gives them back when it is answered; a request that does not fit is refused at once
  with :class:`Overloaded` (503 with ``Retry-After``), never queued, so a burst of large images
  cannot grow the replica's memory past the budget.
- **Error bodies.** 4xx and 5xx bodies say what went wrong in words; an unexpected exception is
  logged with its traceback and a request id, and the client gets only
  ``{"error": "internal error", "request_id": ...}`` (the id is also Serve's ``X-Request-ID``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

__all__ = ["API_KEY_ENV", "OPEN_ROUTES", "ApiKeyMiddleware", "Deadline", "InternalErrorMiddleware",
           "Overloaded", "PixelBudget", "PredictionTimeout", "RequestTimeout", "UnauthenticatedBind",
           "UploadTimeout", "announce_auth", "api_key_from_env", "check_bind", "error_response",
           "internal_error", "is_loopback", "presented_keys", "within"]

API_KEY_ENV = "RAYKD_API_KEY"
OPEN_ROUTES = frozenset({("GET", "/healthz")})  # (method, path) pairs that never need the key

T = TypeVar("T")


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured API key (surrounding whitespace, e.g. a secret file's newline, stripped), or
    None when ``RAYKD_API_KEY`` is unset or blank."""
    value = (os.environ if environ is None else environ).get(API_KEY_ENV, "").strip()
    return value or None


def is_loopback(host: str | None) -> bool:
    """Whether binding ``host`` is reachable from this machine only: ``localhost``, an address in
    ``127.0.0.0/8`` or ``::1`` (bracketed or IPv4-mapped too). Anything else, ``0.0.0.0``, ``::``,
    another name and None (a host that could not be read) included, is not."""
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class UnauthenticatedBind(ValueError):
    """Serving would be open to other machines: no API key, a non-loopback bind and no override."""


def check_bind(host: str | None, api_key: str | None, allow_unauthenticated: bool = False, *,
               bind_fix: str = "--host 127.0.0.1",
               override_fix: str = "--allow-unauthenticated") -> str | None:
    """The fail-closed rule of serving (pure: no Ray, no environment read).

    With ``api_key``: None (nothing to say). Without one: a warning to log when ``host`` is loopback
    (:func:`is_loopback`) or ``allow_unauthenticated`` is set; otherwise :class:`UnauthenticatedBind`,
    whose message names the fixes (``bind_fix`` and ``override_fix`` spell two of them the way the
    caller's user writes them: flags for ``raykd serve``, config keys for a Serve config).
    """
    if api_key:
        return None
    where = (f"on {host}" if host else
             "on a host that could not be read (counted as reachable from other machines)")
    if is_loopback(host):
        return (f"{API_KEY_ENV} is not set: serving without authentication {where}, reachable from this "
                f"machine only (any local user or process may call every route); set {API_KEY_ENV} to "
                "require an API key")
    if allow_unauthenticated:
        return (f"{API_KEY_ENV} is not set and unauthenticated serving was allowed on purpose: serving "
                f"without authentication {where}, reachable from other machines; anyone who can reach it "
                "may call every route")
    raise UnauthenticatedBind(
        f"refusing to serve without authentication {where}: {API_KEY_ENV} is not set and the bind is "
        "reachable from other machines, so anyone who can reach it could call every route. "
        f"Set an API key in the environment of the processes that serve (e.g. export {API_KEY_ENV}="
        f"$(openssl rand -hex 32); clients then send 'Authorization: Bearer <key>'), or bind this "
        f"machine only ({bind_fix}), or pass {override_fix} to serve openly on purpose.")


def announce_auth(environ: Mapping[str, str] | None = None) -> str | None:
    """:func:`api_key_from_env`, logging once (at replica startup) whether the endpoint is open."""
    key = api_key_from_env(environ)
    if key is None:
        log.warning("%s is not set: this endpoint is unauthenticated, anyone who can reach it may "
                    "call every route; set it in the replica's environment to require an API key",
                    API_KEY_ENV)
    else:
        log.info("API key required on every route except GET /healthz")
    return key


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """``{"error": message, "status": status}``: the body of every 4xx/503 answer."""
    return JSONResponse(status_code=status, content={"error": message, "status": status},
                        headers=dict(headers) if headers else None)


def internal_error(request_id: str) -> JSONResponse:
    """The 500 body: no exception type, message or traceback, only the id to find them in the log."""
    return JSONResponse(status_code=500, content={"error": "internal error", "request_id": request_id})


def presented_keys(headers: Mapping[str, str]) -> list[str]:
    """The keys a request presents: the ``Authorization: Bearer`` token and/or ``X-API-Key``."""
    keys = []
    scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    if headers.get("x-api-key"):
        keys.append(headers["x-api-key"].strip())
    return keys


def _matches(presented: str, expected: str) -> bool:
    # Bytes, so a non-ASCII header cannot make compare_digest raise (it refuses non-ASCII str).
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


_FROM_ENV: Any = object()


class ApiKeyMiddleware:
    """ASGI middleware: refuse requests without the API key with a 401 (see the module doc).

    Args:
        app: The wrapped ASGI app.
        api_key: The key; by default read from ``RAYKD_API_KEY`` when the middleware is built,
            which happens inside the replica. None leaves every route open.
    """

    def __init__(self, app, api_key: str | None = _FROM_ENV) -> None:
        self.app = app
        self.api_key = api_key_from_env() if api_key is _FROM_ENV else api_key

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or self.api_key is None
                or (scope.get("method"), _route_path(scope)) in OPEN_ROUTES):
            await self.app(scope, receive, send)
            return
        keys = presented_keys(Headers(scope=scope))
        # Compare every presented key (no early exit on the first header) so timing reveals nothing.
        if keys and any([_matches(k, self.api_key) for k in keys]):
            await self.app(scope, receive, send)
            return
        message = ("invalid API key" if keys else
                   "missing API key: send the header 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        response = error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def new_request_id() -> str:
    return uuid.uuid4().hex


class InternalErrorMiddleware:
    """ASGI middleware: an exception escaping a route becomes :func:`internal_error` (500).

    The traceback is logged with the request id; the client sees only the id. When the response
    had already started, the exception is logged and the connection is left to the server.

    Args:
        app: The wrapped ASGI app.
        request_id: Returns the current request's id (the Serve app passes Serve's own id).
    """

    def __init__(self, app, request_id: Callable[[], str] = new_request_id) -> None:
        self.app = app
        self.request_id = request_id

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:  # noqa: BLE001 - every unexpected fault becomes a logged 500
            rid = self.request_id()
            log.exception("internal error answering %s %s (request %s)", scope.get("method"),
                          scope.get("path"), rid)
            if not started:
                await internal_error(rid)(scope, receive, send)


class RequestTimeout(Exception):
    """A request outlasted ``request_timeout_s``; ``status`` is what the app answers."""

    status = 503

    def __init__(self, timeout_s: float, message: str) -> None:
        self.timeout_s = timeout_s
        super().__init__(message)


class UploadTimeout(RequestTimeout):
    """The request body did not arrive within ``request_timeout_s`` (408 Request Timeout)."""

    status = 408

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s, f"the request body did not arrive within {timeout_s:g} s; send the "
                                    "whole image at once (or a smaller one)")


class PredictionTimeout(RequestTimeout):
    """A prediction outlasted ``request_timeout_s`` (the app answers 503 with ``Retry-After``)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s, f"the prediction did not finish within {timeout_s:g} s (the server is "
                                    "busy or the model is slow); retry later")


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so an abandoned failure is not reported as never retrieved


async def within(awaitable: Awaitable[T], timeout_s: float,
                 error: Callable[[], Exception] | None = None) -> T:
    """``await awaitable``, or ``error()`` (default :class:`PredictionTimeout`) after ``timeout_s``.

    On timeout the work is cancelled but not waited for: a forward pass stuck in a worker thread
    cannot hold the request (or the event loop) hostage. Cancelling the caller cancels the work.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.add_done_callback(_consume)
        task.cancel()
        raise (error() if error is not None else PredictionTimeout(timeout_s))
    return task.result()


class Deadline:
    """One time limit shared by the phases of a request (reading the body, then predicting).

    Args:
        timeout_s: The whole request's limit, ``request_timeout_s``, counted from construction.
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._end = clock() + timeout_s

    def remaining(self) -> float:
        """Seconds left (0 once expired)."""
        return max(0.0, self._end - self._clock())

    async def run(self, awaitable: Awaitable[T], timeout: type[RequestTimeout] = PredictionTimeout) -> T:
        """``await awaitable`` within what is left; ``timeout(timeout_s)`` once the deadline passes
        (at once, without starting the work, when nothing is left)."""
        left = self.remaining()
        if left <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started: no "never awaited" warning
            raise timeout(self.timeout_s)
        return await within(awaitable, left, lambda: timeout(self.timeout_s))


class Overloaded(Exception):
    """The replica cannot take this request now: 503 with ``Retry-After`` (try again shortly)."""


class PixelBudget:
    """The decoded pixels a replica may hold at once, shared by its requests.

    :meth:`reserve` takes a request's pixels (width x height x copies) or refuses it at once with
    :class:`Overloaded`; :meth:`release` gives them back. Reservations come from the replica's
    event loop and never wait, so one lock (held for a few instructions) keeps them exact even
    when a worker thread releases.

    Args:
        capacity: Most pixels in flight (``max_pixels_in_flight``).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a pixel budget needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.in_use = self.peak = self.refused = 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> int:
        """Take ``pixels`` (returned, for :meth:`release`), or raise :class:`Overloaded`."""
        if not 0 < pixels <= self.capacity:
            raise ValueError(f"cannot reserve {pixels} pixels from a budget of {self.capacity}")
        with self._lock:
            if self.in_use + pixels > self.capacity:
                self.refused += 1
                raise Overloaded(
                    f"the server is busy decoding other images and has no room for this one now "
                    f"({pixels / 1e6:.1f} megapixels with its working copies); retry shortly")
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        return pixels

    def release(self, pixels: int) -> None:
        """Give back what :meth:`reserve` took."""
        with self._lock:
            if pixels > self.in_use:
                raise ValueError(f"releasing {pixels} pixels, but only {self.in_use} are reserved")
            self.in_use -= pixels

    def stats(self) -> dict[str, int]:
        """``capacity``, ``in_use``, ``peak`` and ``refused`` (for ``GET /models``)."""
        with self._lock:
            return {"capacity": self.capacity, "in_use": self.in_use, "peak": self.peak,
                    "refused": self.refused}
