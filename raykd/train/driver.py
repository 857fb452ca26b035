"""The driver of one training run: validate, prepare data, build the TorchTrainer, fit (its shared
helpers: :mod:`raykd.train.trainer`).

Everything that can be wrong with a config (unknown keys, a method that does not fit the
student/teacher pair, a missing dataset) fails here, before any Ray worker starts.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raykd.artifact.rundir import RunDir
from raykd.cluster import init_local_ray, refuse_relative_in_job
from raykd.config import DataConfig, RunConfig, dump_yaml, from_dict, to_dict
from raykd.console import worker_logging
from raykd.data.dataset import build_dataset
from raykd.data.hardness import sampling_plan
from raykd.data.manifest import Manifest, is_uri, resolve_location
from raykd.data.memory import encoded_bytes
from raykd.data.synthetic import make_synthetic
from raykd.models.weights import check_run_weights
from raykd.storage import Mirror, mirrored, resolve_output, run_reads, train_storage
from raykd.train.build import build_run, set_seed
from raykd.train.loop import fit
from raykd.train.prep import needs_teacher_prep, prep_file_name, run_teacher_prep
from raykd.train.trainer import _warn_data_cpus, failure_config, fit_restarting, worker_resources
from raykd.train.worker import LocalSession, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best: float | None
    best_epoch: int | None
    epochs: int
    val: dict[str, Any]
    test: dict[str, Any]


def ensure_dataset(data: DataConfig) -> Manifest:
    """Load the dataset's manifest, generating the synthetic dataset first when it is missing."""
    path = data.path
    if is_uri(path):  # a bucket is read, never generated into
        return Manifest.load(path)
    path = Path(path)
    if (path / "manifest.json").is_file():
        return Manifest.load(path)
    if not data.generate_if_missing:
        raise FileNotFoundError(f"no dataset at {path} (data.generate_if_missing is false)")

    s = data.synth
    log.info("no dataset at %s: generating %d synthetic %dpx images", path, s.num_images, s.image_size)
    fr = {"train": data.splits.train, "val": data.splits.val, "test": data.splits.test}
    return make_synthetic(path, num_images=s.num_images, image_size=s.image_size, seed=s.seed,
                          atypical=s.atypical,
                          fractions=fr, split_seed=data.splits.seed, shard_mb=data.shard_mb)


#: Evaluation splits are decoded once and kept in the object store when their uint8 images take at
#: most this share of it; larger ones are decoded again on every pass. The same share decides
#: whether the training split's encoded rows are read once and kept (build_dataset's cache_encoded).
CACHE_SHARE = 0.25


def _object_store_bytes() -> float:
    import ray  # lazy: ray is heavy

    return ray.cluster_resources().get("object_store_memory", 0)


def eval_datasets(path: str, manifest: Manifest, split: str, preprocess, num_workers: int,
                  batch_size: int) -> dict[str, Any]:
    """One disjoint slice of ``split`` per rank (``split_0`` ...), so that every row is scored once.

    Ray Train's own split (``streaming_split(equal=True)``) may drop rows to even out shards, which
    would leave a part of the validation split unscored. The eval pipeline is deterministic, so a
    split that fits (:data:`CACHE_SHARE`) is decoded once here and every epoch reads the
    cached images: on 2 cores a 74-image validation pass took ~6 s through a fresh streaming
    execution per epoch, against well under a second from the cache.
    """
    import pyarrow.dataset as pads  # lazy: pyarrow is heavy

    n = max(1, num_workers)
    rows = sum(manifest.counts(split))
    image_bytes = rows * 3 * preprocess.image_size**2
    if image_bytes <= CACHE_SHARE * _object_store_bytes():
        ds = build_dataset(path, split, preprocess, train=False, batch_size=batch_size).materialize()
        log.info("%s: %d images decoded once and cached (%.1f MB)", split, rows, image_bytes / 1e6)
        count = ds.count()
        parts = ds.split_at_indices([count * r // n for r in range(1, n)]) if n > 1 else [ds]  # no row dropped
        return {f"{split}_{r}": part for r, part in enumerate(parts)}
    ids: list[str] = []
    if n > 1:  # the ids alone are cheap to read on the driver; deal them out round-robin
        table = manifest.shard_dataset(path).to_table(
            columns=["image_id"], filter=pads.field("split") == split)
        ids = sorted(table.column("image_id").to_pylist())
    return {
        f"{split}_{r}": build_dataset(path, split, preprocess, train=False, batch_size=batch_size,
                                      keep_ids=ids[r::n] if n > 1 else None)
        for r in range(n)
    }


#: A single-worker run trains in one process on data held in memory (raykd.data.memory) when the
#: dataset's encoded shards take at most this many bytes; larger ones stream through Ray Data.
LOCAL_MAX_BYTES = 256 * 1024**2


def uses_local(cfg: RunConfig) -> bool:
    """Whether ``cfg`` runs in one process (``scaling.executor``; ``auto``: one worker, small data)."""
    ex = cfg.scaling.executor
    if ex == "local" or ex == "trainer":
        return ex == "local"
    return cfg.scaling.num_workers <= 1 and encoded_bytes(cfg.data.path) <= LOCAL_MAX_BYTES


def resolve_outputs(cfg: RunConfig) -> RunConfig:
    """``output_dir`` made absolute; a URI becomes its local mirror (``mirror_uri``/``mirror_dir``,
    :mod:`raykd.storage`)."""
    if cfg.mirror_uri:  # resolved before (a search's run config)
        return cfg
    local, uri, mirror_dir = resolve_output(cfg.output_dir, cfg.mirror_dir)
    return replace(cfg, output_dir=local, mirror_uri=uri, mirror_dir=mirror_dir)


def prepare(cfg: RunConfig) -> tuple[RunConfig, Manifest, Any, Path]:
    """Resolve paths, make sure the data exists, run the method's teacher prep when it has one
    and the config names no output of it, and build the run (which checks that the method
    fits); returns the resolved config, manifest, built run parts, run folder."""
    refuse_relative_in_job({"data.path": cfg.data.path, "output_dir": cfg.output_dir}, "run config")
    check_run_weights(cfg)  # pretrained weights: a readable local file, or the hub reachable
    cfg = replace(resolve_outputs(cfg), data=replace(cfg.data, path=resolve_location(cfg.data.path)))
    for role in ("student", "teacher"):
        m = getattr(cfg, role)
        if m is not None and m.checkpoint:
            setattr(cfg, role, replace(m, checkpoint=str(Path(m.checkpoint).resolve())))
    manifest = ensure_dataset(cfg.data)
    if needs_teacher_prep(cfg):
        build_run(cfg, manifest, probe=True)  # a misfit fails now, not after the prep
        cfg = run_teacher_prep(cfg, RunDir.of(cfg).prep_file(prep_file_name(cfg)))
    set_seed(cfg.train.seed)  # the models' initial weights: the same run gives the same models
    parts = build_run(cfg, manifest)  # raises ValueError when the method does not fit
    run_dir = RunDir.of(cfg).path
    return cfg, manifest, parts, run_dir


def run_train(cfg: RunConfig, *, resume: bool = False, callbacks: list | None = None, in_process: bool = False,
              on_report=None, on_built=None) -> TrainResult:
    """Train one run on the Ray cluster (local unless ``cfg.address``/``$RAY_ADDRESS`` names one).

    A multi-worker run (or a large dataset) is a Ray Train ``TorchTrainer`` with Ray Data shards;
    a single-worker run on small data (:func:`uses_local`) trains in one process on data held in
    memory: in this process with ``in_process`` (a Tune trial, which holds the resources), else in
    a Ray task with the run's CPUs/GPU, retried from its last checkpoint up to
    ``train.max_failures`` times. ``on_report`` gets every epoch's metrics (local runs; Train runs
    take ``callbacks``); ``on_built(parts)`` is called once with the built models.

    The run folder gets ``timing.json``: wall time and the seconds spent in setup, model builds,
    training steps, evaluation, reporting and checkpoints, and the test split.
    """
    cfg = resolve_outputs(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    with mirrored(Mirror.of(cfg), own=run_dir, reads=run_reads(cfg)) as mirror:  # outputs in a bucket
        if not resume and not RunDir(run_dir).is_empty():
            raise FileExistsError(f"run folder {run_dir} exists: pass --resume to continue it or pick another name")
        return _run_train(cfg, mirror, resume=resume, callbacks=callbacks, in_process=in_process,
                          on_report=on_report, on_built=on_built)


def _run_train(cfg: RunConfig, mirror, *, resume: bool, callbacks, in_process: bool, on_report,
               on_built) -> TrainResult:
    t_start = t0 = time.perf_counter()
    cfg, manifest, parts, run_dir = prepare(cfg)
    build_s = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    rd = RunDir(run_dir)
    dump_yaml(cfg, rd.config_file)
    if on_built is not None:
        on_built(parts)
    local = uses_local(cfg)
    if local and in_process:
        out = _local_fit(cfg, run_dir, manifest, parts, on_report=on_report, timing={"build_s": build_s})
    elif local:
        out = _local_task(cfg, run_dir, build_s)
    else:
        out = _trainer_fit(cfg, manifest, parts.preprocess, run_dir, callbacks)
    if mirror is not None and not (local and in_process):  # what the run's workers wrote on their nodes
        mirror.pull(run_dir)
    history = rd.read_metrics()
    best_row = next((r for r in history if r["epoch"] == out.get("best_epoch")), {})
    summary = TrainResult(
        run_dir=run_dir, best=out.get("best"), best_epoch=out.get("best_epoch"), epochs=len(history),
        val={k[4:]: v for k, v in best_row.items() if k.startswith("val/")}, test=out.get("test", {}),
    )
    rd.write_summary({
        "best": summary.best, "best_epoch": summary.best_epoch, "epochs": summary.epochs,
        "select_metric": cfg.train.select_metric, "val": summary.val, "test": summary.test,
        "teacher": out.get("teacher"),  # fit() says where the teacher's outputs came from
        "test_with_best_weights": out.get("best_model_loaded"),  # False: the last epoch's weights scored it
    })
    timing = {"executor": "local" if local else "trainer", **(out.get("timing") or {})}
    timing["wall_s"] = time.perf_counter() - t_start
    steps = sum(timing.get(k, 0.0) for k in ("train_s", "eval_s"))
    timing["compute_share"] = steps / timing["wall_s"] if timing["wall_s"] > 0 else 0.0
    rd.write_timing(timing)
    return summary


def _local_fit(cfg: RunConfig, run_dir: Path, manifest: Manifest, parts, *, on_report=None,
               timing: dict[str, float]) -> dict[str, Any]:
    """The run in this process (see :class:`raykd.train.worker.LocalSession`)."""
    import torch  # lazy: torch is heavy

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, math.ceil(cfg.scaling.cpus_per_worker)))
    try:
        set_seed(cfg.train.seed)
        t0 = time.perf_counter()
        session = LocalSession(cfg, run_dir, parts.preprocess, on_report=on_report, method=parts.method)
        timing = {**timing, "data_s": time.perf_counter() - t0}
        return fit(cfg, run_dir, manifest, parts, session, timing=timing)
    finally:
        torch.set_num_threads(threads)


def _local_run_task(cfg_dict: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """A Ray task body: rebuild the run (models are cheap next to shipping them) and fit it."""
    worker_logging(progress=True)  # the epoch lines reach the driver's console
    cfg = from_dict(RunConfig, cfg_dict, where="run config")
    with mirrored(Mirror.of(cfg), own=run_dir, reads=run_reads(cfg)):  # this node may not have them
        manifest = Manifest.load(cfg.data.path)
        t0 = time.perf_counter()
        set_seed(cfg.train.seed)  # as prepare() does: the same initial weights in this process
        parts = build_run(cfg, manifest)
        return _local_fit(cfg, Path(run_dir), manifest, parts, timing={"build_s": time.perf_counter() - t0})


def _local_task(cfg: RunConfig, run_dir: Path, build_s: float) -> dict[str, Any]:
    import ray  # lazy: ray is heavy

    init_local_ray(cfg.address)
    resources: dict[str, Any] = {"num_cpus": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["num_gpus"] = cfg.scaling.gpus_per_worker
    task = ray.remote(_local_run_task).options(max_retries=max(cfg.train.max_failures, 0), retry_exceptions=False,
                                               name=f"raykd-run:{cfg.name}", **resources)
    out = ray.get(task.remote(to_dict(cfg), str(run_dir)))
    out.setdefault("timing", {})["build_s"] = out["timing"].get("build_s", 0.0) + build_s
    return out


def _torch_trainer(cfg: RunConfig, run_dir: Path, datasets: dict, callbacks: list | None,
                   workers: int | tuple[int, int]):
    """The run's ``TorchTrainer`` with ``workers`` workers (Ray Train's ``(min, max)`` when elastic)."""
    import ray.train  # lazy: ray is heavy
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=worker_resources(cfg),
            placement_strategy="SPREAD" if cfg.scaling.placement == "spread" else "PACK",
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            **train_storage(Mirror.of(cfg), run_dir.parent),  # with mirrored outputs: the bucket itself
            # a fixed-size group is restarted by fit_restarting, an elastic one by Ray Train
            failure_config=failure_config(cfg, restarts=cfg.scaling.min_workers is not None),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _trainer_fit(cfg: RunConfig, manifest: Manifest, preprocess, run_dir: Path, callbacks: list | None) -> dict:
    """The run as a Ray Train ``TorchTrainer`` (DDP workers, Ray Data shards)."""
    init_local_ray(cfg.address)
    t0 = time.perf_counter()
    sampling = cfg.data.sampling
    keep_ids, rates = sampling_plan(cfg.data.path, sampling.strategy, target=sampling.target_count, seed=sampling.seed)
    encoded = encoded_bytes(cfg.data.path)  # all splits: an upper bound
    cache = encoded <= CACHE_SHARE * _object_store_bytes()
    log.info("train: %s (shards %.1f MB)", "encoded rows read once and cached" if cache else "streamed from Parquet",
             encoded / 1e6)
    datasets = {
        "train": build_dataset(cfg.data.path, "train", preprocess, train=True, recipe=cfg.train.recipe,
                               keep_ids=keep_ids, rates=rates, batch_size=cfg.train.batch_size,
                               cache_encoded=cache)
    }
    workers = cfg.scaling.num_workers
    datasets.update(eval_datasets(cfg.data.path, manifest, "val", preprocess, workers, cfg.train.eval_batch_size))
    datasets.update(eval_datasets(cfg.data.path, manifest, "test", preprocess, workers, cfg.train.eval_batch_size))
    data_s = time.perf_counter() - t0

    if cfg.scaling.min_workers is not None:
        _warn_data_cpus(cfg)
    result = fit_restarting(cfg, functools.partial(_torch_trainer, cfg, run_dir, datasets, callbacks))
    out = dict(result.return_value or {})
    out.setdefault("timing", {})["data_s"] = data_s
    return out
