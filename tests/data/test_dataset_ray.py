"""The shards read back through Ray Data on a real local Ray cluster."""

from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from raykd.data import ingest as ingest_mod
from raykd.data.dataset import build_dataset, read_split
from raykd.data.hardness import sampling_plan
from raykd.data.manifest import Manifest
from raykd.data.transforms import PreprocessSpec, normalize_chw
from tests.data import fixtures

SPEC = PreprocessSpec(image_size=32)


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    root = tmp_path_factory.mktemp("isic")
    fixtures.isic2019(root / "src")
    ingest_mod.ingest("isic2019", root / "src", root / "out", fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    return root / "out"


def test_every_split_reads_back_with_its_labels(ray_cluster, isic):
    manifest = Manifest.load(isic)
    parquet = pads.dataset(manifest.shard_paths(isic), format="parquet").to_table(columns=["image_id", "label", "split"])
    expected = {(i, lab, s) for i, lab, s in zip(*(parquet.column(c).to_pylist() for c in ("image_id", "label", "split")))}
    seen = set()
    for split in ("train", "val", "test"):
        rows = read_split(isic, split).take_all()
        assert len(rows) == sum(manifest.counts(split))
        seen |= {(r["image_id"], int(r["label"]), split) for r in rows}
    assert seen == expected


def test_eval_pipeline_yields_uint8_chw_tensors_that_normalise_on_the_device(ray_cluster, isic):
    manifest = Manifest.load(isic)
    ds = build_dataset(isic, "val", SPEC, train=False, batch_size=4)
    batches = list(ds.iter_torch_batches(batch_size=8))
    images = np.concatenate([b["image"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert images.shape == (sum(manifest.counts("val")), 3, 32, 32) and images.dtype == np.uint8
    assert Counter(labels.tolist()) == Counter({i: n for i, n in enumerate(manifest.counts("val")) if n})
    normalised = normalize_chw(torch.from_numpy(images), SPEC).numpy()
    assert normalised.dtype == np.float32 and -3.0 < normalised.mean() < 3.0 and normalised.std() > 0.1



def test_train_pipeline_oversamples_per_pass(ray_cluster, isic):
    manifest = Manifest.load(isic)
    counts = manifest.counts("train")
    keep, rates = sampling_plan(isic, "oversample")
    assert keep is None
    ds = build_dataset(isic, "train", SPEC, train=True, recipe="light", rates=rates, batch_size=4)
    for _ in range(2):  # each pass (epoch) draws a new plan; here every class has the same count
        labels = np.concatenate([b["label"].numpy() for b in ds.iter_torch_batches(batch_size=8)])
        got = Counter(labels.tolist())
        assert all(got[c] == max(counts) for c, n in enumerate(counts) if n)


def test_instance_hardness_subset_is_a_fixed_filter(ray_cluster, isic):
    manifest = Manifest.load(isic)
    keep = [r["image_id"] for r in read_split(isic, "train").take_all()][:3]
    ds = build_dataset(isic, "train", SPEC, train=True, keep_ids=keep, batch_size=2)
    assert ds.count() == 3 and sum(manifest.counts("train")) > 3


def test_instance_hardness_plan_rebalances_to_the_target(tmp_path):
    from raykd.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "d", num_images=160, image_size=24, seed=1)
    counts = np.asarray(Manifest.load(tmp_path / "d").counts("train"))
    keep, rates = sampling_plan(tmp_path / "d", "instance_hardness", target=10)
    table = pads.dataset(Manifest.load(tmp_path / "d").shard_paths(tmp_path / "d"), format="parquet").to_table(
        columns=["image_id", "label"])
    label_of = dict(zip(table.column("image_id").to_pylist(), table.column("label").to_pylist()))
    kept = Counter(label_of[i] for i in keep)
    for c, n in enumerate(counts):
        assert kept[c] == min(n, 10)  # large classes cut to their 10 easiest images
        if n:  # and every class reaches 10 per epoch in expectation
            assert kept[c] * rates[c] == pytest.approx(max(10, kept[c]))
    assert (tmp_path / "d" / "instance_hardness_t10_s0.json").is_file()  # cached for the next run
