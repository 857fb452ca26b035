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
- **Timeout.** :func:`within` answers :class:`PredictionTimeout` when a prediction (queueing,
  decoding and forward pass) outlasts ``request_timeout_s``; the work is abandoned, not waited for,
  so the event loop and the replica stay responsive.
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
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

__all__ = ["API_KEY_ENV", "OPEN_ROUTES", "ApiKeyMiddleware", "InternalErrorMiddleware",
           "PredictionTimeout", "UnauthenticatedBind", "announce_auth", "api_key_from_env", "check_bind",
           "error_response", "internal_error", "is_loopback", "presented_keys", "within"]

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


class PredictionTimeout(Exception):
    """A prediction outlasted ``request_timeout_s`` (the app answers 503)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"the prediction did not finish within {timeout_s:g} s (the server is busy "
                         "or the model is slow); retry later")


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so an abandoned failure is not reported as never retrieved


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``await awaitable``, or :class:`PredictionTimeout` after ``timeout_s`` seconds.

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
        raise PredictionTimeout(timeout_s)
    return task.result()
