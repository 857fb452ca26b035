"""The binary task: ``ingest --binary`` writes benign vs malignant, with the classes the user names
malignant (the fusion-teacher paper counts MEL, BCC, AKIEC, BKL and VASC malignant in HAM10000)."""

import pytest

from raykd.data import ingest as ingest_mod
from raykd.data.__main__ import main as data_main
from raykd.data.manifest import Manifest
from raykd.data.writer import IngestError
from tests.data import fixtures
from tests.data.test_ingest import FRACTIONS, read_rows

PAPER_004_MALIGNANT = ["mel", "bcc", "akiec", "bkl", "vasc"]


def test_binary_ingest_merges_the_named_classes_into_malignant_and_the_rest_into_benign(tmp_path):
    expected = fixtures.ham10000(tmp_path / "src")  # 7 classes x 3 images, and one unknown label
    m = ingest_mod.ingest("ham10000", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS,
                          malignant=PAPER_004_MALIGNANT, binary=True)
    assert m.label_names == ["benign", "malignant"] and m.malignant == ["malignant"]
    assert m.label_groups == {"benign": ["df", "nv"], "malignant": ["akiec", "bcc", "bkl", "mel", "vasc"]}
    totals = {name: sum(m.class_counts[s][name] for s in m.class_counts) for name in m.label_names}
    assert totals == {"benign": 2 * 3, "malignant": 5 * 3}
    manifest, rows = read_rows(tmp_path / "out")
    assert len(rows) == expected["good"]
    assert {r["label_name"] for r in rows} == {"benign", "malignant"}
    assert all(manifest.label_names[r["label"]] == r["label_name"] for r in rows)
    assert [q["image_id"] for q in manifest.quarantine] == ["ISIC_8000000"]  # unknown labels stay out
    assert Manifest.load(tmp_path / "out").label_groups == m.label_groups


def test_binary_ingest_defaults_to_the_formats_own_malignant_classes(tmp_path):
    fixtures.ham10000(tmp_path / "src")
    m = ingest_mod.ingest("ham10000", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS, binary=True)
    assert m.label_groups["malignant"] == ["akiec", "bcc", "mel"]
    assert sum(m.class_counts[s]["malignant"] for s in m.class_counts) == 9


@pytest.mark.parametrize(("malignant", "match"), [
    (["mel", "melanoma"], r"\['melanoma'\] are not classes of this dataset \(classes: akiec, bcc"),
    (["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], "leaves no benign class"),
    ([], "--malignant \\(none\\) leaves no malignant class"),
])
def test_binary_ingest_refuses_names_that_leave_a_side_empty_or_are_unknown(tmp_path, malignant, match):
    fixtures.ham10000(tmp_path / "src")
    with pytest.raises(IngestError, match=match):
        ingest_mod.ingest("ham10000", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS,
                          malignant=malignant, binary=True)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_cli_ingests_the_binary_task(tmp_path, capsys):
    fixtures.ham10000(tmp_path / "src")
    code = data_main(["ingest", "--format", "ham10000", "--src", str(tmp_path / "src"), "--out",
                      str(tmp_path / "out"), "--binary", "--malignant", ",".join(PAPER_004_MALIGNANT),
                      "--train", "0.5", "--val", "0.25", "--test", "0.25"])
    assert code == 0 and "benign" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "out").label_names == ["benign", "malignant"]


def test_a_multiclass_ingest_records_no_label_groups(tmp_path):
    fixtures.ham10000(tmp_path / "src")
    m = ingest_mod.ingest("ham10000", tmp_path / "src", tmp_path / "out", fractions=FRACTIONS)
    assert m.label_groups == {} and len(m.label_names) == 7
