"""Connecting to Ray: an existing cluster when one is named, otherwise a local one.

The resource choices follow measurements on 2-core machines (docs/cluster.md): Tune trial drivers
hold a zero-CPU custom resource ``trial_slot`` instead of CPUs, and the dashboard stays on because
Train's placement-group cleanup queries actor state through it.

Ray kills idle worker processes above a soft limit (by default one per CPU) after a second. Every
Ray Data execution (one per epoch and split) then starts fresh task workers that import torch and
albumentations again: measured on 2 cores, a 74-image validation pass took 6.5-8.7 s that way and
1.7 s with the idle workers kept. Local clusters therefore keep up to ``DATA_TASKS_PER_CPU`` idle
workers per CPU, as many as 0.25-CPU data tasks can run at once. For a small cluster started with
``ray start``, export ``RAY_num_workers_soft_limit`` before it (docs/cluster.md); nodes with many
cores have room enough under the default.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from raykd.config import ConfigError
from raykd.data.manifest import Manifest, filesystem, is_uri
from raykd.raycompat import autoscaler_max_resources

log = logging.getLogger(__name__)

TRIAL_SLOT = "trial_slot"
DATA_TASKS_PER_CPU = 4  # raykd.data.dataset runs its tasks at 0.25 CPU


def init_local_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_mb: int | None = None,
    trial_slots: int = 4,
) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``) or start a local cluster; idempotent."""
    import ray  # lazy: ray is heavy

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
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    kwargs["_system_config"] = {"num_workers_soft_limit": DATA_TASKS_PER_CPU * cpus}
    log.info("starting a local Ray cluster (%s)", kwargs)
    ray.init(**kwargs)


def job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this process is the entrypoint of (``ray job submit
    --working-dir``), or None outside a job or without one. Relative paths in such a job resolve
    inside its temporary copy of that folder, on the node that runs the entrypoint only."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        env = (json.loads(raw) or {}).get("runtime_env") or {}
    except ValueError:
        return None
    return env.get("working_dir") or None


def refuse_relative_in_job(paths: dict[str, str | None], where: str) -> None:
    """Under ``ray job submit --working-dir``, refuse relative ``paths`` (name -> path) with an
    error naming each and the fix: they would resolve inside the job's temporary copy on the head,
    where the other nodes' tasks cannot read them and where nothing outlives the job."""
    working_dir = job_working_dir()
    if working_dir is None:
        return
    relative = {k: v for k, v in paths.items() if v and "://" not in v and not os.path.isabs(os.path.expanduser(v))}
    if relative:
        listed = ", ".join(f"{k}={v!r}" for k, v in relative.items())
        fixes = " ".join(f"--set {k}=/shared/..." for k in relative)
        raise ConfigError(
            f"{where}: relative paths in a Ray job with a working_dir ({working_dir}): {listed}. They would "
            f"resolve inside the job's temporary copy on the node running the entrypoint, which other nodes "
            f"cannot read and which is deleted with the job; give absolute paths on storage every node "
            f"reaches, e.g. {fixes}")


def cluster_capacity() -> dict[str, float]:
    """The resources work can count on now: the alive nodes' totals, raised to the autoscaler's
    maximum where the cluster has one (pending work is what makes it scale up)."""
    import ray  # lazy: ray is heavy

    live = {k: float(v) for k, v in ray.cluster_resources().items()}
    for key, most in autoscaler_max_resources().items():
        live[key] = max(live.get(key, 0.0), most)
    return live


def _pong() -> bool:
    return True


def responsive_node_cpus(*, probe: bool = True, timeout_s: float = 20.0) -> dict[str, float]:
    """Each alive node's CPUs, by node id. With ``probe``, only the nodes that run a zero-CPU task
    pinned to them within ``timeout_s``: a node lost a moment ago stays listed alive until its
    health checks have failed, and a worker group sized on it would not fit where it lands."""
    import ray  # lazy: ray is heavy
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")}
    if not probe or len(nodes) <= 1:
        return nodes
    ping = ray.remote(num_cpus=0, max_retries=0)(_pong)
    refs = {ping.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(): node
            for node in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref)
    answered = set()
    for ref in ready:
        try:
            ray.get(ref)
            answered.add(refs[ref])
        except Exception as exc:  # noqa: BLE001 - a node that cannot run the task does not count
            log.debug("node %s did not run the check: %s", refs[ref][:8], exc)
    if len(answered) < len(nodes):
        log.warning("%d of %d nodes did not answer within %g s and are left out: %s", len(nodes) - len(answered),
                    len(nodes), timeout_s, ", ".join(n[:8] for n in nodes if n not in answered))
    return {node: cpus for node, cpus in nodes.items() if node in answered}


def _probe_storage(read: dict[str, str], write: dict[str, str], marker: str,
                   local: dict[str, str] | None = None) -> list[str]:
    """On one node: what of ``read`` (dataset folders) it cannot read, of ``write`` (folders or
    URIs) it cannot write or does not share with the driver (the driver's ``marker`` file is not
    there), and of ``local`` (this node's own folders) it cannot write."""
    problems = []
    for name, path in read.items():
        try:
            Manifest.load(path)  # a folder or a URI, read the way the trials will read it
        except (OSError, ValueError) as exc:
            reason = "no manifest.json there" if isinstance(exc, FileNotFoundError) and "not found" in str(exc) \
                else str(exc)
            problems.append(f"cannot read {name}={path} ({reason})")
    for name, path in write.items():
        if is_uri(path):
            problems += _probe_bucket(name, path, marker)
            continue
        if not (Path(path) / marker).is_file():
            problems.append(f"does not see the driver's files in {name}={path} (not storage shared with the driver)")
            continue
        problems += _probe_folder(name, path)
    for name, path in (local or {}).items():
        problems += _probe_folder(name, path)
    return problems


def _probe_folder(name: str, path: str) -> list[str]:
    probe = Path(path) / f".raykd-write-check-{uuid.uuid4().hex}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return [f"cannot write {name}={path} ({e.strerror or e})"]
    return []


def _probe_bucket(name: str, uri: str, marker: str) -> list[str]:
    """A bucket location: the driver's ``marker`` is visible and an object can be written."""
    import pyarrow.fs as pafs  # lazy: pyarrow is heavy

    try:
        fs, root = filesystem(uri)
        if fs.get_file_info(f"{root.rstrip('/')}/{marker}").type != pafs.FileType.File:
            return [f"does not see the driver's files in {name}={uri} (another bucket or account?)"]
        probe = f"{root.rstrip('/')}/.raykd-write-check-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        return [f"cannot write {name}={uri} ({e})"]
    return []


def _write_marker(location: str, marker: str, text: str | None) -> None:
    """Write (or with ``text`` None, remove) the file ``marker`` in a folder or bucket URI."""
    if not is_uri(location):
        if text is None:
            (Path(location) / marker).unlink(missing_ok=True)
        else:
            Path(location).mkdir(parents=True, exist_ok=True)
            (Path(location) / marker).write_text(text)
        return
    fs, root = filesystem(location)
    path = f"{root.rstrip('/')}/{marker}"
    if text is None:
        try:
            fs.delete_file(path)
        except OSError:
            pass
    else:
        with fs.open_output_stream(path) as out:
            out.write(text.encode())


def check_storage_on_every_node(read: dict[str, str], write: dict[str, str], where: str,
                                timeout_s: float = 120.0, *, local: dict[str, str] | None = None) -> None:
    """Before any trial: from every alive node of the cluster, the datasets of ``read`` can be read,
    the folders or bucket URIs of ``write`` are shared with the driver and writable (a zero-CPU
    task pinned to each node looks for a file the driver just wrote there, then writes its own),
    and each node's own folders of ``local`` (an output mirror) are writable. Raises ConfigError
    naming each node and path that fails; a single-node cluster has nothing to check beyond the
    driver's own checks."""
    import ray  # lazy: ray is heavy
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return

    marker = f".raykd-shared-check-{uuid.uuid4().hex}"
    for path in write.values():  # what every node must see: a file the driver wrote
        _write_marker(path, marker, "written by the driver")
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_storage)
    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(read, write, marker, local) for n in nodes}
    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    failures = []
    try:
        for node_id, ref in refs.items():
            try:
                problems = ray.get(ref, timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - a node that cannot run the check is a failure too
                problems = [f"the check did not run ({type(e).__name__})"]
            failures += [f"node {addresses[node_id]} ({node_id[:12]}): {p}" for p in problems]
    finally:
        for path in write.values():
            _write_marker(path, marker, None)
    if failures:
        raise ConfigError(f"{where}: storage is not reachable from every node of the cluster; put data and "
                          "output on storage all nodes mount (NFS, s3://, gs://):\n  " + "\n  ".join(failures))
    log.info("storage checked from %d nodes: data readable, output writable", len(nodes))
