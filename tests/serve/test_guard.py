"""The HTTP guards without a cluster: API key middleware, 500 bodies, the prediction timeout.

The middlewares are driven as plain ASGI apps (scope, receive, send); the Serve app installs the
same classes (tests/serve/test_app.py checks them over real HTTP).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from raykd.serve.guard import (
    API_KEY_ENV,
    ApiKeyMiddleware,
    InternalErrorMiddleware,
    PredictionTimeout,
    announce_auth,
    api_key_from_env,
    internal_error,
    within,
)

KEY = "s3cret-key"


async def ok_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def failing_app(scope, receive, send) -> None:
    raise ZeroDivisionError("secret internal detail")


def call(app, method: str = "POST", path: str = "/predict", headers: dict | None = None):
    """Run one HTTP request through an ASGI app: (status, headers, decoded body)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, body


def test_api_key_comes_from_the_environment_and_blank_means_unset():
    assert api_key_from_env({API_KEY_ENV: f" {KEY}\n"}) == KEY  # a secret file's newline
    assert api_key_from_env({API_KEY_ENV: "  "}) is None
    assert api_key_from_env({}) is None


def test_an_open_endpoint_is_announced_with_one_warning(caplog):
    with caplog.at_level(logging.INFO, logger="raykd.serve.guard"):
        assert announce_auth({}) is None
        assert announce_auth({API_KEY_ENV: KEY}) == KEY
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unauthenticated" in warnings[0].getMessage()


def test_api_key_middleware_refuses_missing_and_wrong_keys_with_401():
    app = ApiKeyMiddleware(ok_app, api_key=KEY)
    for headers in [None, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"},
                    {"X-API-Key": "s3cret-kéy"}]:
        status, head, body = call(app, headers=headers)
        assert status == 401, headers
        assert head["www-authenticate"] == "Bearer" and head["content-type"] == "application/json"
        assert "API key" in json.loads(body)["error"]
    for headers in [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY}"},
                    {"X-API-Key": KEY}, {"Authorization": "Bearer wrong", "X-API-Key": KEY}]:
        assert call(app, headers=headers)[0] == 200, headers
    assert call(app, "GET", "/healthz")[0] == 200  # liveness stays open...
    assert call(app, "POST", "/healthz")[0] == 401  # ...for GET only
    assert call(app, "GET", "/docs")[0] == 401 and call(app, "GET", "/models")[0] == 401
    assert call(ApiKeyMiddleware(ok_app, api_key=None), "GET", "/models")[0] == 200  # no key: open


def test_api_key_middleware_reads_the_environment_when_built(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert ApiKeyMiddleware(ok_app).api_key == KEY
    monkeypatch.delenv(API_KEY_ENV)
    assert ApiKeyMiddleware(ok_app).api_key is None


def test_a_500_body_names_no_exception_and_the_log_has_the_detail(caplog):
    assert json.loads(internal_error("abc").body) == {"error": "internal error", "request_id": "abc"}
    with caplog.at_level(logging.ERROR, logger="raykd.serve.guard"):
        status, head, body = call(InternalErrorMiddleware(failing_app, request_id=lambda: "req-7"))
    assert status == 500 and head["content-type"] == "application/json"
    assert json.loads(body) == {"error": "internal error", "request_id": "req-7"}
    assert b"ZeroDivisionError" not in body and b"secret" not in body and b"Traceback" not in body
    (record,) = caplog.records
    assert "req-7" in record.getMessage() and record.exc_info[0] is ZeroDivisionError
    assert call(InternalErrorMiddleware(ok_app))[0] == 200


def test_a_slow_prediction_times_out_and_the_loop_keeps_serving():
    async def scenario():
        t0 = time.perf_counter()
        with pytest.raises(PredictionTimeout, match=r"within 0.05 s") as err:
            await within(asyncio.to_thread(time.sleep, 0.5), 0.05)  # a stuck forward pass
        waited = time.perf_counter() - t0
        assert err.value.timeout_s == 0.05
        with pytest.raises(PredictionTimeout):
            await within(asyncio.sleep(10), 0.05)
        assert await within(asyncio.sleep(0, result=42), 1.0) == 42  # the next request is answered
        with pytest.raises(KeyError):
            await within(_raise(KeyError("x")), 1.0)  # faults pass through (the app answers 500)
        return waited

    assert asyncio.run(scenario()) < 0.4  # answered at the timeout, not when the thread finished


async def _raise(exc: Exception):
    raise exc
