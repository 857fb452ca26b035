"""The one place raykd reaches into Ray's private internals, checked against the Ray it was written
for (:data:`WRITTEN_FOR`). Everything else in raykd uses Ray's public API only.

:func:`wait_for_trial_reports` works around a race in Ray 2.60's Train V2 + Tune composition (seen
as a trial that stays RUNNING forever, its actor's main thread blocked in ``Queue.put``):
``TuneReportCallback`` hands reports to the trial actor through an inter-actor queue, and the
actor's main thread moves each one into a one-slot result queue. When the trial function returns,
Tune's function wrapper puts a final marker into that same queue from the trial thread; if the last
epoch's report is still in flight, the main thread then blocks putting it into the full queue, and
it is the only reader of that queue. Waiting until both queues are empty closes the window.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

__all__ = ["WRITTEN_FOR", "serve_http_host", "trial_session", "version_supported", "wait_for_trial_reports"]

#: The Ray release line whose internals this module reads.
WRITTEN_FOR = "2.60"


def version_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed Ray's) is the release line this module knows."""
    if version is None:
        import ray  # lazy: ray is heavy

        version = ray.__version__
    return version == WRITTEN_FOR or version.startswith(WRITTEN_FOR + ".")


def trial_session():
    """The running Tune trial's session (None outside a trial, or on a Ray whose internals differ)."""
    try:
        from ray.train._internal.session import get_session  # lazy: ray is heavy
    except ImportError:
        return None
    session = get_session()
    if session is None or not hasattr(session, "result_queue"):
        return None
    return session


def wait_for_trial_reports(timeout_s: float = 60.0) -> bool:
    """Return once Tune's trial actor has taken every epoch report off its queues (True), or after
    ``timeout_s`` with a warning (False). Does nothing (True) outside a trial, and on a Ray other
    than :data:`WRITTEN_FOR` (its internals are unknown here; a warning says so once)."""
    if not version_supported():
        _warn_version()
        return True
    session = trial_session()
    if session is None:
        return True
    inter_actor = getattr(session, "_inter_actor_queue", None)

    def drained() -> bool:
        return (inter_actor is None or inter_actor.empty()) and session.result_queue.empty()

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if drained():
            time.sleep(0.5)  # the main thread may hold an item between the two queues
            if drained():
                return True
        time.sleep(0.1)
    log.warning("reports of trial %s still queued after %.0f s", getattr(session, "trial_id", "?"), timeout_s)
    return False


_warned = False


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """Each alive node's free resources, by node id (Ray's DeveloperAPI ``ray._private.state``);
    empty when this Ray cannot tell (the caller only uses it to word an error)."""
    try:
        from ray._private.state import available_resources_per_node  # lazy: ray is heavy

        return dict(available_resources_per_node())
    except Exception:  # noqa: BLE001 - an error message must not fail over its detail
        log.debug("could not read free resources per node", exc_info=True)
        return {}


def train_group_start_timeout_s() -> float:
    """How long Ray Train waits to place one worker group before it retries (its private
    constant, overridable by its environment variable)."""
    from ray.train.v2._internal.constants import (  # lazy: ray is heavy
        DEFAULT_WORKER_GROUP_START_TIMEOUT_S,
        WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
    )

    return float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))


def autoscaler_max_resources() -> dict[str, float]:
    """The most of each resource the cluster's autoscaler may bring up (its node groups' max
    counts, from the cluster config the autoscaler publishes in the GCS); empty without one."""
    try:
        from ray._private.state import state  # lazy: ray is heavy

        return {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception:  # noqa: BLE001 - no autoscaler (or another Ray): the live resources decide
        log.debug("could not read the autoscaler's maximum resources", exc_info=True)
        return {}


def serve_http_host(timeout_s: float = 10.0) -> str | None:
    """The host the running Serve instance's HTTP proxies bind (its controller's ``http_options``),
    read from a process already connected to Ray (a Serve build task, a driver after
    ``serve.start``); None when this process is not connected, no Serve controller runs, or this
    Ray answers otherwise. Never starts or connects to Ray itself."""
    try:
        import ray  # lazy: ray is heavy
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE  # lazy: ray is heavy

        if not ray.is_initialized():
            return None
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return str(ray.get(controller.get_http_config.remote(), timeout=timeout_s).host)
    except Exception:  # noqa: BLE001 - unknown: the caller treats it as reachable from other machines
        log.debug("could not read the Serve HTTP host", exc_info=True)
        return None


def _warn_version() -> None:
    global _warned
    if not _warned:
        import ray  # lazy: ray is heavy

        log.warning("raykd.raycompat was written for Ray %s, this is Ray %s: the wait for a trial's last "
                    "reports is skipped (a trial may then hang at its end)", WRITTEN_FOR, ray.__version__)
        _warned = True
