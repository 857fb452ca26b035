"""Shared fixtures: one real local Ray cluster per test session, sized like the CI machine."""

from __future__ import annotations

import logging
import os

import pytest

# Ray settings measured on 2-core machines: quiet progress bars, fast teardown.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The S3 bucket of tests/test_storage.py (moto, on loopback) takes any key; set before any Ray
# cluster starts so its workers inherit them, and never look for cloud instance credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raykd-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raykd-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


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


@pytest.fixture(scope="session")
def s3():
    """An S3 server on loopback with a bucket; yields ``uri(prefix)``."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    def uri(prefix: str) -> str:
        return f"s3://raykd/{prefix}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    fs, _ = pafs.FileSystem.from_uri(uri("x") + "&allow_bucket_creation=true")
    fs.create_dir("raykd")
    yield uri
    server.stop()


def s3_listing(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    return sorted(f.path[len(root) + 1:] for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if f.type == pafs.FileType.File)


def s3_mtime(uri: str, name: str):
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(f"{root}/{name}").mtime


@pytest.fixture(scope="session")
def s3_dataset(s3, tmp_path_factory):
    """A generated dataset uploaded to the bucket; returns its URI."""
    import pyarrow.fs as pafs

    from raykd.data.synthetic import make_synthetic

    local = tmp_path_factory.mktemp("s3data") / "data"
    make_synthetic(local, num_images=120, image_size=32, seed=0)
    fs, root = pafs.FileSystem.from_uri(s3("data"))
    pafs.copy_files(str(local), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return s3("data")
