"""Ray Train ``TorchTrainer`` helpers shared by a run (:mod:`raykd.train.driver`) and a method's
teacher prep (:mod:`raykd.train.prep`): a worker's resources, the worker count of an elastic group, the
failure policy, and a ``fit()`` that turns a worker group Ray could not place into an error naming
what was missing.
"""

from __future__ import annotations

import logging
import math

from raykd.config import RunConfig
from raykd.raycompat import free_resources_per_node, train_group_start_timeout_s

log = logging.getLogger(__name__)

__all__ = ["ClusterResourcesError", "failure_config", "fit_bounded", "missing_resources_message",
           "worker_resources"]


def fit_bounded(trainer, cfg: RunConfig):
    """``trainer.fit()``; a worker group that got no resources within ``train.resource_wait_s``
    (Train's controller gave up placing it) becomes a :class:`ClusterResourcesError` naming them."""
    import ray.train  # lazy: ray is heavy

    try:
        return trainer.fit()
    except ray.train.ControllerError as exc:
        if type(exc.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        raise ClusterResourcesError(missing_resources_message(cfg)) from None


class ClusterResourcesError(RuntimeError):
    """A Ray Train worker group could not get its resources within ``train.resource_wait_s``."""


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    """One Ray Train worker's resources."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


def _warn_data_cpus(cfg: RunConfig) -> None:
    """An elastic group fills each node with as many workers as fit; warn where that would leave
    the data pipeline less than one read task's CPU (the run would then wait on its data)."""
    import ray  # lazy: ray is heavy

    from raykd.data.dataset import DATA_TASK_CPUS  # lazy: imports torch

    per = cfg.scaling.cpus_per_worker
    for node in ray.nodes():
        cpus = float(node.get("Resources", {}).get("CPU", 0.0)) if node.get("Alive") else 0.0
        if per <= 0 or cpus < per:
            continue
        spare = cpus - math.floor(cpus / per + 1e-9) * per
        if spare < DATA_TASK_CPUS:
            log.warning("node %s: %g CPUs hold %d workers of scaling.cpus_per_worker=%g and leave %g CPU to "
                        "Ray Data (< %g): if the group shrinks onto it, its data may starve; pick a "
                        "cpus_per_worker that leaves a remainder", node["NodeID"][:8], cpus,
                        math.floor(cpus / per + 1e-9), per, spare, DATA_TASK_CPUS)


def _worker_count(cfg: RunConfig) -> int | tuple[int, int]:
    """``num_workers``, or Train's elastic ``(min, max)`` when ``scaling.min_workers`` is below it."""
    low, high = cfg.scaling.min_workers, cfg.scaling.num_workers
    return (low, high) if low is not None and low < high else high


def failure_config(cfg: RunConfig):
    """Ray Train's ``FailureConfig`` of a run: ``train.max_failures`` worker-group restarts, and
    as many start attempts as fit in ``train.resource_wait_s`` (Ray's default, -1, retries a
    worker group that cannot be placed forever: the silent hang after a lost node)."""
    import ray.train  # lazy: ray is heavy

    retries = max(0, math.ceil(cfg.train.resource_wait_s / train_group_start_timeout_s()) - 1)
    return ray.train.FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=retries)


def missing_resources_message(cfg: RunConfig) -> str:
    """What the run asked for, next to what each alive node has free."""
    import ray  # lazy: ray is heavy

    need = worker_resources(cfg)
    low = cfg.scaling.min_workers or cfg.scaling.num_workers
    want = f"{cfg.scaling.num_workers} workers" if low == cfg.scaling.num_workers else \
        f"{low} to {cfg.scaling.num_workers} workers"

    nodes = []
    free = free_resources_per_node()
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        avail = free.get(node["NodeID"], {})
        have = ", ".join(f"{k} {avail.get(k, 0.0):g} free of {node['Resources'].get(k, 0.0):g}" for k in need)
        nodes.append(f"node {node['NodeID'][:8]} ({node.get('NodeManagerAddress', '?')}): {have}")
    return (
        f"run {cfg.name}: the cluster could not host {want} x {need} for "
        f"{cfg.train.resource_wait_s:g} s (train.resource_wait_s). Alive nodes: "
        + ("; ".join(nodes) or "none")
        + ". Add nodes, lower scaling.num_workers or scaling.cpus_per_worker, or set scaling.min_workers "
        "so the run continues with fewer workers."
    )
