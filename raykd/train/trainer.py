"""Ray Train ``TorchTrainer`` helpers shared by a run (:mod:`raykd.train.driver`) and a method's
teacher prep (:mod:`raykd.train.prep`): a worker's resources, the worker count of an elastic group, the
failure policy, and a ``fit()`` that turns a worker group Ray could not place into an error naming
what was missing.

A run of a fixed size restarts its worker group itself (:func:`fit_restarting`) rather than leaving
it to Ray Train: before each start it sizes the group to what the cluster's nodes host while
leaving one node the CPU a Ray Data task needs (:func:`group_size`), so a group that comes back on
fewer nodes after a node loss never takes the CPU its own data pipeline needs to run.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from raykd.cluster import responsive_node_cpus
from raykd.config import RunConfig
from raykd.raycompat import free_resources_per_node, train_group_start_timeout_s

log = logging.getLogger(__name__)

__all__ = ["ClusterResourcesError", "data_room", "failure_config", "fit_bounded", "fit_restarting", "group_size",
           "missing_resources_message", "pack_spare", "starved_data", "worker_resources"]


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


def failure_config(cfg: RunConfig, *, restarts: bool = True):
    """Ray Train's ``FailureConfig`` of a run: ``train.max_failures`` worker-group restarts (none
    with ``restarts`` False: :func:`fit_restarting` does them), and as many start attempts as fit in
    ``train.resource_wait_s`` (Ray's default, -1, retries a worker group that cannot be placed
    forever: the silent hang after a lost node)."""
    import ray.train  # lazy: ray is heavy

    retries = max(0, math.ceil(cfg.train.resource_wait_s / train_group_start_timeout_s()) - 1)
    return ray.train.FailureConfig(max_failures=cfg.train.max_failures if restarts else 0,
                                   controller_failure_limit=retries)


def pack_spare(node_cpus: Mapping[str, float], workers: int, per: float) -> float | None:
    """The most CPU one node keeps free once ``workers`` of ``per`` CPU are packed onto the
    biggest nodes first (the worst case of Ray's PACK placement); None when they do not fit."""
    if per <= 0:
        return max(node_cpus.values(), default=0.0)
    left, spare = workers, []
    for cpus in sorted(node_cpus.values(), reverse=True):
        here = min(left, math.floor(cpus / per + 1e-9))
        left -= here
        spare.append(cpus - here * per)
    return None if left > 0 else max(spare, default=0.0)


def group_size(cfg: RunConfig, node_cpus: Mapping[str, float], *, restart: bool) -> int:
    """How many workers to start: the most, up to ``scaling.num_workers``, that ``node_cpus`` host
    while one node keeps a Ray Data task's CPU. At the first start a cluster too small for the whole
    group keeps the asked size (an autoscaler may be adding nodes; the wait is bounded by
    ``train.resource_wait_s``); at a restart the group shrinks to what the nodes left host."""
    from raykd.data.dataset import DATA_TASK_CPUS  # lazy: imports torch

    want, per = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    fits = next((k for k in range(want, 0, -1) if (pack_spare(node_cpus, k, per) or 0.0) >= DATA_TASK_CPUS - 1e-9), 0)
    if fits == 0 or fits == want or not (restart or pack_spare(node_cpus, want, per) is not None):
        return want
    log.warning("run %s: %d workers of %g CPU would leave Ray Data no CPU on the %d node(s) of %s CPU; "
                "starting %d", cfg.name, want, per, len(node_cpus),
                "+".join(f"{c:g}" for c in node_cpus.values()), fits)
    return fits


def data_room(node_cpus: Mapping[str, float], rank_nodes: Sequence[str], per: float) -> float:
    """The most CPU an alive node has beside the worker group's ranks (``rank_nodes``: each rank's node)."""
    held = Counter(rank_nodes)
    return max((cpus - held[node] * per for node, cpus in node_cpus.items()), default=0.0)


def starved_data(rank_nodes: Sequence[str], per: float) -> str | None:
    """Why Ray Data cannot run beside this worker group, or None when some alive node has room."""
    import ray  # lazy: ray is heavy

    from raykd.data.dataset import DATA_TASK_CPUS  # lazy: imports torch

    alive = {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")}
    if data_room(alive, rank_nodes, per) >= DATA_TASK_CPUS - 1e-9:
        return None
    gone = len(set(rank_nodes) - set(alive))
    return (f"Ray Data's tasks need {DATA_TASK_CPUS:g} CPU on one node and none is left: the "
            f"{len(rank_nodes)} workers of {per:g} CPU hold the alive nodes' "
            f"{'+'.join(f'{c:g}' for c in alive.values()) or '0'} CPU"
            + (f" ({gone} of the group's nodes are gone)" if gone else ""))


def fit_restarting(cfg: RunConfig, make_trainer: Callable[[int | tuple[int, int]], object]):
    """``fit_bounded(make_trainer(workers), cfg)``; when the worker group fails (a worker or node
    died, or its data stalled), up to ``train.max_failures`` times: fit again, which resumes from the
    last checkpoint, with the group sized by :func:`group_size` on the nodes that still answer.
    Elastic runs (``scaling.min_workers``) leave sizing and restarts to Ray Train."""
    import ray.train  # lazy: ray is heavy

    if cfg.scaling.min_workers is not None:
        return fit_bounded(make_trainer(_worker_count(cfg)), cfg)
    failures, budget = 0, cfg.train.max_failures
    while True:
        nodes = responsive_node_cpus() if failures else responsive_node_cpus(probe=False)
        try:
            return fit_bounded(make_trainer(group_size(cfg, nodes, restart=failures > 0)), cfg)
        except ray.train.WorkerGroupError as exc:
            if budget != -1 and failures >= budget:
                raise
            failures += 1
            log.warning("run %s: the worker group failed (%s); starting it again from the last checkpoint "
                        "(restart %d of %s, train.max_failures)", cfg.name, str(exc).strip().splitlines()[0][:300],
                        failures, "unlimited" if budget == -1 else budget)


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
