"""Connecting to Ray: an existing cluster when one is named, otherwise a local one.

The resource choices follow measurements on 2-core machines (shared notes): Tune trial drivers
hold a zero-CPU custom resource ``trial_slot`` instead of CPUs, and the dashboard stays on because
Train's placement-group cleanup queries actor state through it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

TRIAL_SLOT = "trial_slot"


def init_local_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_mb: int | None = None,
    trial_slots: int = 4,
) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``) or start a local cluster; idempotent."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    # address="local": start a fresh cluster even when a `ray start` cluster runs on this machine
    # (plain ray.init() would join it and then refuse num_cpus/resources).
    kwargs: dict = {"address": "local", "resources": {TRIAL_SLOT: trial_slots}, "include_dashboard": True}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    if object_store_mb is not None:
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    log.info("starting a local Ray cluster (%s)", kwargs)
    ray.init(**kwargs)
