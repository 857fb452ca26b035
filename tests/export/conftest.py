from __future__ import annotations

import pytest

from tests.export.helpers import make_artifact, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, dataset):
    """A training-run folder holding best/ with a 64-px timm test ViT."""
    run = tmp_path_factory.mktemp("run_vit")
    make_artifact(run / "best", "test_vit", {"img_size": 64}, image_size=64, dataset=dataset)
    return run
