import json
from pathlib import Path

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


def _append_csv_rows(path, rows):
    import csv

    with path.open("a", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_csv_paths_and_symlinks_resolving_outside_the_source_are_quarantined_unread(tmp_path, monkeypatch):
    src = tmp_path / "src"
    expected = fixtures.ham10000(src)
    part = src / "HAM10000_images_part_1"
    fixtures.write_image(tmp_path / "outside.jpg", 900)  # what src/../outside.jpg names
    fixtures.write_image(tmp_path / "elsewhere" / "secret.jpg", 901)
    (part / "ISIC_7000000.jpg").symlink_to(tmp_path / "elsewhere" / "secret.jpg")  # has a CSV row
    (part / "ISIC_7000002.jpg").symlink_to(tmp_path / "elsewhere" / "secret.jpg")  # has none
    fixtures.write_image(src / "store" / "blob.bin", 902, ".jpg")  # not an image suffix: found via the link only
    (part / "ISIC_7000001.jpg").symlink_to(Path("..") / "store" / "blob.bin")  # relative, stays inside
    _append_csv_rows(src / "HAM10000_metadata.csv", [
        ["HAM_7000000", "ISIC_7000000", "nv", "histo", 30, "male", "back"],
        ["HAM_7000001", "ISIC_7000001", "nv", "histo", 30, "male", "back"],
        ["HAM_7000003", "../outside.jpg", "mel", "histo", 30, "male", "back"],
        ["HAM_7000004", str(tmp_path / "outside.jpg"), "mel", "histo", 30, "male", "back"],
    ])
    read = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.resolve()) or real_read_bytes(self))
    manifest = ingest_mod.ingest("ham10000", src, tmp_path / "out", fractions=FRACTIONS, split_seed=1)
    monkeypatch.undo()

    reasons = {q["image_id"]: q["reason"] for q in manifest.quarantine}
    outside = {"ISIC_7000000", "ISIC_7000002", "../outside.jpg", str(tmp_path / "outside.jpg")}
    assert set(reasons) == set(expected["quarantined"]) | outside
    assert all(reasons[i] == ingest_mod.OUTSIDE_REASON for i in outside)
    assert not [p for p in read if not p.is_relative_to(src.resolve())]
    _, rows = read_rows(tmp_path / "out")
    assert len(rows) == manifest.num_images == expected["good"] + 1
    assert "ISIC_7000001" in {r["image_id"] for r in rows}


def test_folder_symlinks_out_of_the_source_are_quarantined_and_inside_ones_ingest(tmp_path):
    src = tmp_path / "src"
    expected = fixtures.folder(src)
    fixtures.write_image(tmp_path / "elsewhere" / "a.png", 903)
    fixtures.write_image(tmp_path / "elsewhere" / "b.png", 904)
    (src / "benign" / "link_out.png").symlink_to(tmp_path / "elsewhere" / "a.png")
    (src / "outlinked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a class folder
    (src / "malignant" / "link_in.png").symlink_to(src / "malignant" / "img0.png")
    manifest = ingest_mod.ingest("folder", src, tmp_path / "out", fractions=FRACTIONS, split_seed=1)

    reasons = {q["image_id"]: q["reason"] for q in manifest.quarantine}
    outside = {"benign/link_out", "outlinked/a", "outlinked/b"}
    assert set(reasons) == set(expected["quarantined"]) | outside
    assert all(reasons[i] == ingest_mod.OUTSIDE_REASON for i in outside)
    _, rows = read_rows(tmp_path / "out")
    assert "malignant/link_in" in {r["image_id"] for r in rows}
    assert len(rows) == manifest.num_images == expected["good"] + 1


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_and_truncated_image_are_quarantined_and_ingest_goes_on(tmp_path):
    src = tmp_path / "src"
    expected = fixtures.folder(src)
    (src / "malignant" / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))  # 1e10 pixels
    (src / "benign" / "torn.jpg").write_bytes(fixtures.truncated_jpeg(7))
    manifest = ingest_mod.ingest("folder", src, tmp_path / "out", fractions=FRACTIONS, split_seed=1)
    reasons = {q["image_id"]: q["reason"] for q in manifest.quarantine}
    assert "decompression bomb" in reasons["malignant/bomb"]
    assert "unreadable image" in reasons["benign/torn"]
    _, rows = read_rows(tmp_path / "out")
    assert len(rows) == manifest.num_images == expected["good"]


def test_any_decoder_error_becomes_a_quarantine_reason(monkeypatch):
    import struct

    from PIL import Image

    from raykd.data.schema import Item
    from raykd.data.writer import _read_checked, check_image

    png = fixtures.image_bytes(5, ".png")  # 24x24 = 576 pixels
    assert check_image(png)[1] == "png"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 576 > 2 * 200: a decompression bomb
    with pytest.raises(ValueError, match="decompression bomb"):
        check_image(png)
    monkeypatch.undo()

    def crash(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image, "open", crash)  # a decoder failure of an unexpected type
    with pytest.raises(ValueError, match="unreadable image: error: unpack requires"):
        check_image(png)

    def broken_loader() -> bytes:
        raise RuntimeError("storage went away")

    data, _, reason = _read_checked(Item(image_id="x", label_name="a", load=broken_loader))
    assert data is None and "RuntimeError: storage went away" in reason


def _dataset_snapshot(out):
    manifest = Manifest.load(out)
    table = pads.dataset(manifest.shard_paths(out), format="parquet").to_table()
    return manifest, sorted(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))


def test_failed_overwrite_leaves_the_old_dataset_intact(tmp_path, monkeypatch):
    from raykd.data import writer

    fixtures.folder(tmp_path / "old")
    fixtures.ham10000(tmp_path / "new")
    out = tmp_path / "out"
    ingest_mod.ingest("folder", tmp_path / "old", out, fractions=FRACTIONS)
    (out / "notes.txt").write_text("kept")
    before = _dataset_snapshot(out)

    real_flush = writer._ShardWriter.flush

    def flush_then_fail(self):
        real_flush(self)
        if len(self.shards) >= 2:
            raise OSError("disk full")

    monkeypatch.setattr(writer._ShardWriter, "flush", flush_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ingest_mod.ingest("ham10000", tmp_path / "new", out, fractions=FRACTIONS, shard_mb=0.002,
                          overwrite=True)
    after = _dataset_snapshot(out)
    assert after[0] == before[0] and after[1] == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out"]  # no staging folder left

    monkeypatch.undo()
    m = ingest_mod.ingest("ham10000", tmp_path / "new", out, fractions=FRACTIONS, shard_mb=0.002,
                          overwrite=True)
    assert m.source == "ham10000" and Manifest.load(out).num_images == m.num_images == 21
    assert (out / "notes.txt").read_text() == "kept"  # files beside the dataset are carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out"]


def test_overwrite_killed_mid_ingest_keeps_the_old_dataset(tmp_path):
    """The real check: ``python -m raykd.data ingest --overwrite`` killed with SIGKILL while writing."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from PIL import Image

    fixtures.folder(tmp_path / "old")
    out = tmp_path / "out"
    ingest_mod.ingest("folder", tmp_path / "old", out, fractions=FRACTIONS)
    before = _dataset_snapshot(out)

    rng = np.random.default_rng(0)
    for k in range(300):  # noise PNGs of ~50 KB: a few hundred shards at --shard-mb 0.1
        img = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
        path = tmp_path / "big" / ("a" if k % 2 else "b") / f"img{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, compress_level=0)

    cmd = [sys.executable, "-m", "raykd.data", "ingest", "--format", "folder", "--src", str(tmp_path / "big"),
           "--out", str(out), "--shard-mb", "0.1", "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        staging = tmp_path / f"out.tmp-{proc.pid}" / "shards"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if staging.is_dir() and len(list(staging.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the ingest finished (or failed) before it could be killed mid-way"
        assert len(list(staging.glob("part-*.parquet"))) >= 2, "the ingest did not start writing within 15 s"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    after = _dataset_snapshot(out)  # loadable, and the very same manifest and shards
    assert after[0] == before[0] and after[1] == before[1]
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(before[0].shards)

    # the next ingest removes the killed one's staging folder
    ingest_mod.ingest("folder", tmp_path / "old", out, fractions=FRACTIONS, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "old", "out"]
