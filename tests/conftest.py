"""Shared fixtures: one real local Ray cluster per test session, sized like the CI machine."""

from __future__ import annotations

import os

import pytest

# Ray settings measured on 2-core machines (see shared notes): quiet progress bars, fast teardown.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs (started once, shared by every test that needs Ray)."""
    import ray

    from raykd.cluster import init_local_ray

    init_local_ray(num_cpus=2, object_store_mb=256)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run tiny models: one intra-op thread is as fast and does not fight the Ray workers
    (or other test processes) for the 2 cores of a CI machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
