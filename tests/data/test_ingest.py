import json

import pyarrow.dataset as pads
import pytest

from raykd.data import ingest as ingest_mod
from raykd.data.__main__ import main as data_main
from raykd.data.manifest import Manifest
from raykd.data.writer import IngestError
from tests.data import fixtures

FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}
LAYOUTS = {
    "isic2019": fixtures.isic2019,
    "ham10000": fixtures.ham10000,
    "pad_ufes_20": fixtures.pad_ufes_20,
    "folder": fixtures.folder,
}


def read_rows(out):
    manifest = Manifest.load(out)
    table = pads.dataset(manifest.shard_paths(out), format="parquet").to_table()
    return manifest, table.drop_columns(["image"]).to_pylist()


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_each_layout_ingests_with_bad_items_quarantined(tmp_path, fmt):
    expected = LAYOUTS[fmt](tmp_path / "src")
    manifest = ingest_mod.ingest(fmt, tmp_path / "src", tmp_path / "out", fractions=FRACTIONS, split_seed=1)
    manifest, rows = read_rows(tmp_path / "out")

    assert len(rows) == expected["good"] == manifest.num_images
    reasons = {q["image_id"]: q["reason"] for q in manifest.quarantine}
    assert set(reasons) == set(expected["quarantined"])
    for image_id, fragment in expected["quarantined"].items():
        assert fragment in reasons[image_id]
    # every row's label name agrees with the label map, and per-split counts add up
    for r in rows:
        assert manifest.label_names[r["label"]] == r["label_name"] and r["source"] == fmt
    for split in manifest.class_counts:
        assert sum(manifest.class_counts[split].values()) == sum(r["split"] == split for r in rows)


def test_isic_unk_never_becomes_a_class_and_metadata_is_kept(tmp_path):
    fixtures.isic2019(tmp_path / "src")
    manifest = ingest_mod.ingest("isic2019", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS)
    _, rows = read_rows(tmp_path / "out")
    assert manifest.label_names == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert manifest.malignant == ["MEL", "BCC", "SCC"]
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["ISIC_0000003"]["lesion_id"] == "IL_0000001"
    assert by_id["ISIC_0000003"]["age"] == 45.0 and by_id["ISIC_0000003"]["sex"] == "male"


@pytest.mark.parametrize("fmt", ["isic2019", "ham10000", "pad_ufes_20"])
def test_no_lesion_or_patient_spans_two_splits(tmp_path, fmt):
    LAYOUTS[fmt](tmp_path / "src")
    ingest_mod.ingest(fmt, tmp_path / "src", tmp_path / "out", fractions=FRACTIONS, split_seed=3)
    _, rows = read_rows(tmp_path / "out")
    for key in ("lesion_id", "patient_id"):
        splits_of: dict[str, set] = {}
        for r in rows:
            if r[key] is not None:
                splits_of.setdefault(r[key], set()).add(r["split"])
        assert all(len(s) == 1 for s in splits_of.values()), key
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_missing_required_column_names_column_and_file(tmp_path):
    src = tmp_path / "src"
    fixtures.write_csv(src / "HAM10000_metadata.csv", ["lesion_id", "image_id"], [["HAM_1", "ISIC_1"]])
    with pytest.raises(IngestError) as err:
        ingest_mod.ingest("ham10000", src, tmp_path / "out", fractions=FRACTIONS)
    assert "'dx'" in str(err.value) and "HAM10000_metadata.csv" in str(err.value)


def test_cli_exits_nonzero_only_when_nothing_usable(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xffgarbage")
    code = data_main(["ingest", "--format", "folder", "--src", str(src), "--out", str(tmp_path / "o")])
    assert code == 2 and "no usable images" in capsys.readouterr().err

    fixtures.folder(tmp_path / "ok")
    code = data_main(["ingest", "--format", "folder", "--src", str(tmp_path / "ok"), "--out", str(tmp_path / "o2")])
    out = capsys.readouterr().out
    assert code == 0 and "quarantined 2 items" in out


def test_ingest_refuses_to_overwrite_unless_asked(tmp_path):
    fixtures.folder(tmp_path / "src")
    ingest_mod.ingest("folder", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS)
    with pytest.raises(IngestError, match="--overwrite"):
        ingest_mod.ingest("folder", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS)
    m = ingest_mod.ingest("folder", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS, overwrite=True)
    assert m.num_images == 10


def test_manifest_is_plain_json_with_label_map_and_seed(tmp_path):
    fixtures.pad_ufes_20(tmp_path / "src")
    ingest_mod.ingest("pad_ufes_20", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS, split_seed=9)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["label_names"] == ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    assert data["split_seed"] == 9 and data["source"] == "pad_ufes_20"
    assert data["class_counts"]["train"]["ACK"] + data["class_counts"]["val"]["ACK"] + data["class_counts"]["test"]["ACK"] == 4


def test_shards_respect_the_target_size(tmp_path):
    fixtures.ham10000(tmp_path / "src")
    m = ingest_mod.ingest("ham10000", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS, shard_mb=0.002)
    assert len(m.shards) > 3  # ~1 KB images, 2 KB shards
    _, rows = read_rows(tmp_path / "out")
    assert len(rows) == 21
