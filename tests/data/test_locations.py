"""Dataset locations are folders or URIs read through pyarrow's filesystems (s3://, gs://, file://):
the manifest, the shards, a training run and Ray Data read a ``file://`` URI exactly as they read
the folder behind it (an S3 bucket served on loopback reads and writes them in tests/test_storage.py)."""

from __future__ import annotations

import pytest

from raykd.config import RunConfig, load_config
from raykd.data.manifest import Manifest, is_uri, resolve_location
from raykd.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("uri") / "data"
    make_synthetic(path, num_images=120, image_size=32, seed=0)
    return path


def test_uris_and_paths_are_told_apart():
    assert is_uri("s3://bucket/isic") and is_uri("gs://b/x") and is_uri("file:///tmp/x")
    assert not is_uri("/data/isic") and not is_uri("data/isic") and not is_uri("C:\\data")
    assert resolve_location("s3://bucket/isic/") == "s3://bucket/isic/"
    assert resolve_location("data").startswith("/")


def test_the_manifest_and_shards_read_through_a_uri_as_through_the_folder(dataset):
    uri = f"file://{dataset}"
    by_path, by_uri = Manifest.load(dataset), Manifest.load(uri)
    assert by_uri == by_path
    assert by_uri.shard_dataset(uri).count_rows() == by_path.shard_dataset(dataset).count_rows() == 120
    assert by_uri.shard_bytes(uri) == by_path.shard_bytes(dataset) > 0
    assert all(p.startswith(f"{uri}/shards/") for p in by_uri.shard_paths(uri))


def test_a_uri_without_a_dataset_names_the_location(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"file://.*/nothing/manifest.json not found: .* is not a raykd dataset"):
        Manifest.load(f"file://{tmp_path}/nothing")


def test_a_run_trains_from_a_uri_dataset_and_its_artifact_names_the_uri(dataset, tmp_path):
    from raykd.artifact.format import read_meta
    from raykd.train.driver import run_train

    uri = f"file://{dataset}"
    cfg = load_config(RunConfig, None, [
        "name=from-uri", f"output_dir={tmp_path}", f"data.path={uri}", "student.name=raykd_test_tiny_cnn",
        "student.image_size=32", "train.epochs=1", "train.batch_size=16", "scaling.num_workers=1",
        "scaling.executor=local"])
    result = run_train(cfg, in_process=True)
    assert result.epochs == 1 and result.test
    assert read_meta(result.run_dir / "best").dataset == uri


def test_ray_data_reads_a_split_from_a_uri(ray_cluster, dataset):
    from raykd.data.dataset import read_split

    uri = f"file://{dataset}"
    manifest = Manifest.load(dataset)
    assert read_split(uri, "val").count() == sum(manifest.counts("val"))
