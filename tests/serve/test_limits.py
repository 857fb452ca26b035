"""Load and memory limits without a cluster: the pixel budget, the request deadline (the body upload
included), and their options. The Serve app's use of them over real HTTP is tests/serve/test_overload.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from raykd.serve.__main__ import args_to_serve_args, http_options, parse_args, server_options
from raykd.serve.backend import TTA_MODES, _views
from raykd.serve.guard import (
    Deadline,
    Overloaded,
    PixelBudget,
    PredictionTimeout,
    RequestTimeout,
    UploadTimeout,
    within,
)
from raykd.serve.intake import Limits, RequestError, precheck, read_body
from raykd.serve.options import IMAGE_COPIES, ServeArgs, ServerOptions
from tests.serve.test_intake import png_header_only

ROOT = Path(__file__).resolve().parents[2]
MP = 1_000_000


# -- the pixel budget -----------------------------------------------------------------------------

def test_reservations_add_up_and_are_given_back():
    budget = PixelBudget(100 * MP)
    a = budget.reserve(50 * MP)
    b = budget.reserve(49 * MP)
    assert budget.in_use == 99 * MP and budget.peak == 99 * MP
    budget.release(a)
    assert budget.in_use == 49 * MP
    c = budget.reserve(51 * MP)  # exactly full fits
    assert budget.in_use == budget.capacity
    budget.release(b)
    budget.release(c)
    assert budget.stats() == {"capacity": 100 * MP, "in_use": 0, "peak": 100 * MP, "refused": 0}


def test_a_request_that_does_not_fit_is_refused_at_once_and_takes_nothing():
    budget = PixelBudget(100 * MP)
    budget.reserve(60 * MP)
    t0 = time.perf_counter()
    with pytest.raises(Overloaded, match="retry shortly") as err:
        budget.reserve(50 * MP)
    assert time.perf_counter() - t0 < 0.05  # never waits
    assert "50.0 megapixels" in str(err.value)
    assert budget.in_use == 60 * MP and budget.stats()["refused"] == 1
    budget.reserve(40 * MP)  # what is left still serves a smaller image


def test_misuse_is_an_error_not_a_silent_drift():
    budget = PixelBudget(10)
    with pytest.raises(ValueError, match="cannot reserve 11 pixels"):
        budget.reserve(11)  # could never fit: ServeArgs refuses such limits up front
    with pytest.raises(ValueError, match="cannot reserve 0"):
        budget.reserve(0)
    budget.reserve(4)
    with pytest.raises(ValueError, match="only 4 are reserved"):
        budget.release(5)
    with pytest.raises(ValueError, match="positive capacity"):
        PixelBudget(0)


def test_reservations_from_many_threads_stay_exact():
    budget = PixelBudget(1_000)
    granted = []

    def worker() -> None:
        for _ in range(2_000):
            try:
                n = budget.reserve(7)
            except Overloaded:
                continue
            granted.append(n)
            budget.release(n)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.in_use == 0 and budget.peak <= budget.capacity and granted


def test_copies_count_the_tta_views_plus_one_working_copy():
    image = np.zeros((6, 4, 3), np.uint8)
    assert set(IMAGE_COPIES) == set(TTA_MODES)
    for tta in TTA_MODES:
        assert IMAGE_COPIES[tta] == len(_views(image, tta)) + 1, tta
    assert (IMAGE_COPIES["none"], IMAGE_COPIES["flip"]) == (2, 4)


def test_the_header_gives_the_pixels_to_reserve_before_decoding():
    assert precheck(png_header_only(4990, 4990), Limits()) == (4990, 4990)  # 100 bytes, no pixels
    width, height = precheck(png_header_only(6000, 4000), Limits())
    assert width * height * IMAGE_COPIES["flip"] == 96 * MP
    budget = PixelBudget(ServeArgs(family="f").max_pixels_in_flight)
    for _ in range(3):  # three 24.9 MP images at once fit the default budget, a fourth does not
        budget.reserve(4990 * 4990 * IMAGE_COPIES["none"])
    with pytest.raises(Overloaded):
        budget.reserve(4990 * 4990 * IMAGE_COPIES["none"])
    budget.reserve(224 * 224 * IMAGE_COPIES["none"])  # a small image still fits beside them


# -- the deadline ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_deadline_is_shared_by_the_phases_of_a_request():
    clock = FakeClock()
    deadline = Deadline(30.0, clock)
    assert deadline.remaining() == 30.0
    clock.now += 12.5  # the body took 12.5 s...
    assert deadline.remaining() == 17.5  # ...so the prediction has what is left
    clock.now += 40
    assert deadline.remaining() == 0.0


def test_a_slow_body_times_out_with_408_and_a_slow_prediction_with_503():
    async def trickle():
        yield b"\x89PNG"
        await asyncio.sleep(10)  # a client that stalls mid-upload
        yield b"rest"

    async def scenario():
        deadline = Deadline(0.2)
        t0 = time.perf_counter()
        with pytest.raises(UploadTimeout) as err:
            await deadline.run(read_body("100", trickle(), Limits()), UploadTimeout)
        took = time.perf_counter() - t0
        with pytest.raises(PredictionTimeout):  # nothing left for the prediction either
            await deadline.run(asyncio.sleep(0, result=1))
        return err.value, took

    err, took = asyncio.run(scenario())
    assert isinstance(err, RequestTimeout) and err.status == 408 and err.timeout_s == 0.2
    assert str(err).startswith("the request body did not arrive within 0.2 s")
    assert took < 1.0  # answered at the deadline, not when the client gives up
    assert PredictionTimeout(30).status == 503


def test_work_within_the_deadline_passes_its_result_and_its_errors_through():
    async def bad_body():
        raise RequestError(413, "too big")
        yield b""  # an async generator

    async def scenario():
        deadline = Deadline(5.0)
        assert await deadline.run(asyncio.sleep(0.01, result="ok"), UploadTimeout) == "ok"
        with pytest.raises(RequestError):
            await deadline.run(read_body(None, bad_body(), Limits()), UploadTimeout)
        with pytest.raises(UploadTimeout):
            await within(asyncio.sleep(1), 0.01, lambda: UploadTimeout(0.01))

    asyncio.run(scenario())


# -- the options ----------------------------------------------------------------------------------

def test_the_defaults_bound_load_and_memory():
    args, server = ServeArgs(family="f"), ServerOptions()
    assert (args.max_queued_requests, args.max_ongoing_requests, args.retry_after_s) == (64, 64, 1)
    assert args.max_pixels_in_flight == 150 * MP  # 450 MB of RGB pixels
    assert args.max_pixels_in_flight >= IMAGE_COPIES["flip"] * args.max_image_pixels
    assert server.proxy_timeout_s == 60.0 > args.request_timeout_s == 30.0


def test_the_limits_are_flags_and_serve_run_strings():
    ns = parse_args(["--family", "f.json", "--max-queued-requests", "-1", "--max-pixels-in-flight", "200000000",
                     "--retry-after-s", "3", "--proxy-timeout-s", "90", "--request-timeout-s", "45"])
    args = args_to_serve_args(ns)
    assert (args.max_queued_requests, args.max_pixels_in_flight, args.retry_after_s) == (-1, 200 * MP, 3)
    assert server_options(ns).proxy_timeout_s == 90.0 and args.request_timeout_s == 45.0
    typed = ServeArgs.model_validate({"family": "f", "max_queued_requests": "10", "max_pixels_in_flight": "100000000"})
    assert (typed.max_queued_requests, typed.max_pixels_in_flight) == (10, 100 * MP)


@pytest.mark.parametrize(("extra", "words"), [
    ({"max_queued_requests": 0}, "max_queued_requests must be -1 (no limit) or a positive"),
    ({"max_queued_requests": -2}, "greater than or equal to -1"),
    ({"max_pixels_in_flight": 99_999_999}, "raise max_pixels_in_flight to at least 100000000"),
    ({"max_pixels_in_flight": 0}, "greater than 0"),
    ({"retry_after_s": 0}, "greater than or equal to 1"),
])
def test_limits_that_cannot_work_are_refused_naming_the_fix(extra, words):
    with pytest.raises(ValidationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ServeArgs(family="f", **extra)
    ServeArgs(family="f", max_image_pixels=1_000_000, max_pixels_in_flight=4_000_000)  # scaled together: fine


def test_the_proxy_timeout_goes_to_serve_and_a_low_one_is_warned_about(caplog):
    args = ServeArgs(family="f")
    with caplog.at_level(logging.WARNING, logger="raykd.serve.__main__"):
        assert http_options(args, "127.0.0.1", 8000) == {"host": "127.0.0.1", "port": 8000,
                                                         "request_timeout_s": 60.0}
        assert not caplog.records
        assert http_options(args, "127.0.0.1", 8000, 30.0)["request_timeout_s"] == 30.0
    (record,) = caplog.records
    assert "plain-text 408" in record.getMessage()


@pytest.mark.parametrize("rel", ["deploy/serve_config.yaml", "deploy/serve_config_cpu.yaml"])
def test_the_shipped_serve_configs_set_every_limit(rel):
    cfg = yaml.safe_load((ROOT / rel).read_text())
    (app,) = cfg["applications"]
    args = ServeArgs.model_validate(app["args"])
    (deployment,) = app["deployments"]
    assert deployment["max_queued_requests"] == args.max_queued_requests > 0
    assert deployment["max_ongoing_requests"] == args.max_ongoing_requests
    assert "max_pixels_in_flight" in app["args"] and "retry_after_s" in app["args"]
    assert cfg["http_options"]["request_timeout_s"] > args.request_timeout_s
