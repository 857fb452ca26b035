"""Publishing a family to a bucket is atomic and verified: the family file goes up after the models
it names, a push that fails half way leaves the old family whole, a reader fetching during a
publish sees the old family or the new one, and a file changed in the bucket is refused by name.
Against moto's S3 server on loopback (fixture ``s3`` in conftest.py), spoken to by pyarrow's S3
client as a cluster's bucket would be."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from raykd.serve.family import FamilyEntry, FamilyIntegrityError, fetch_family, load_family, write_family
from raykd.storage import Mirror, default_mirror_dir, push_order, split_uri
from raykd.tune.publish import PUBLISHED_DIR, publish_family, snapshot_model

# --------------------------------------------------------------------------------------------------
# a tune job's outputs, without the training: runs' best/ folders and the family published from them
# --------------------------------------------------------------------------------------------------


def model_folder(best: Path, seed: str, *, int8: bool = True) -> Path:
    """A run's ``best/`` as an export leaves it (random bytes stand in for the weights)."""
    rng = random.Random(seed)
    if best.exists():
        shutil.rmtree(best)  # retrained: best/ replaced in place, as save_artifact does
    best.mkdir(parents=True)
    (best / "model.safetensors").write_bytes(rng.randbytes(3000))
    (best / "meta.json").write_text(json.dumps({"seed": seed}))
    (best / "model.onnx").write_bytes(rng.randbytes(2000))
    if int8:
        (best / "model_int8.onnx").write_bytes(rng.randbytes(700))
    return best


def publish_version(out: Path, version: int) -> list[Path]:
    """Publish family ``version`` from ``out/exp``: version 2 retrains t1 (whose new best/ has no
    int8 variant) and leaves t2 as it was."""
    exp = out / "exp"
    entries = []
    for run in ("t1", "t2"):
        best = exp / "runs" / run / "best"
        seed = f"{run}-{version if run == 't1' else 1}"
        if not best.exists() or run == "t1":
            model_folder(best, seed, int8=version == 1)
        (best.parent / "summary.json").write_text(json.dumps({"seed": seed}))
        entries.append(FamilyEntry(name=run, version=str(version), artifact=str(best), onnx=str(best / "model.onnx")))
    return publish_family(exp, out, entries, winner="t1")


def read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as src:
        return src.read()


def bucket_family(uri: str, name: str = "family.json") -> str:
    """The version of the bucket's family file ``name``, after checking that every file it names is
    there with its recorded sha256 and size."""
    fs, root = pafs.FileSystem.from_uri(uri)
    family = json.loads(read(fs, f"{root}/{name}"))
    parent = str(PurePosixPath(name).parent)
    folder = f"{root}/{parent}" if parent != "." else root
    for m in family["models"]:
        for rel, record in m["files"].items():
            data = read(fs, f"{folder}/{rel}")
            assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["size"], rel
    versions = {m["version"] for m in family["models"]}
    assert len(versions) == 1, versions  # never a mix of two publishes
    return versions.pop()


def bucket_names(uri: str) -> set[str]:
    fs, root = pafs.FileSystem.from_uri(uri)
    return {f.path[len(root) + 1:] for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File}


class FlakyFS:
    """A pyarrow filesystem whose ``fail_at``-th write (an upload or a delete) fails as a dropped
    connection would: nothing of it is stored. ``mode`` "open" fails the request before any byte,
    "close" when the upload completes (S3 stores an object whole when its stream closes). Every
    finished write calls ``after`` (a reader fetching in between)."""

    def __init__(self, fs, fail_at: int | None = None, mode: str = "open", after=None) -> None:
        self._fs, self.fail_at, self.mode, self.after = fs, fail_at, mode, after
        self.calls, self.injected, self.written = 0, 0, []

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.injected += 1
            raise OSError(f"injected failure of write {self.calls}")

    def _done(self, path: str, what: str) -> None:
        self.written.append((what, path))
        if self.after is not None:
            self.after()

    def open_output_stream(self, path, *args, **kwargs):
        if self.mode == "open":
            self._tick()
        return _Upload(self, path)

    def delete_file(self, path):
        self._tick()
        self._fs.delete_file(path)
        self._done(path, "delete")


class _Upload:
    """An upload buffered until it closes, then stored in one request (or failed, storing nothing)."""

    def __init__(self, owner: FlakyFS, path: str) -> None:
        self.owner, self.path, self.chunks = owner, path, []

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:  # the caller failed: the connection drops, nothing is stored
            return False
        if self.owner.mode == "close":
            self.owner._tick()
        with self.owner._fs.open_output_stream(self.path) as out:
            out.write(b"".join(self.chunks))
        self.owner._done(self.path, "upload")
        return False


# --------------------------------------------------------------------------------------------------


def test_publishing_copies_each_model_into_a_folder_named_after_its_content(tmp_path):
    first = publish_version(tmp_path, 1)
    family = json.loads(first[0].read_text())
    folders = sorted(p.name for p in (tmp_path / "exp" / PUBLISHED_DIR).iterdir())
    assert len(folders) == 2 and {m["artifact"] for m in family["models"]} == {f"published/{d}" for d in folders}
    t1 = family["models"][0]
    assert t1["onnx"] == t1["artifact"] + "/model.onnx"
    assert set(t1["files"]) == {f"{t1['artifact']}/{n}" for n in
                                ("meta.json", "model.onnx", "model.safetensors", "model_int8.onnx")}
    root_family = json.loads(first[1].read_text())  # output_dir's family names the same copies
    assert root_family["models"][0]["artifact"] == "exp/" + t1["artifact"]
    assert publish_version(tmp_path, 1) and sorted(p.name for p in (tmp_path / "exp" / PUBLISHED_DIR).iterdir()) \
        == folders  # the same models again: nothing new
    publish_version(tmp_path, 2)
    after = sorted(p.name for p in (tmp_path / "exp" / PUBLISHED_DIR).iterdir())
    assert len(after) == 3 and set(folders) <= set(after)  # t1's new copy; the old ones stay valid
    old = tmp_path / "exp" / t1["artifact"]
    (old / "model.onnx").write_bytes(b"damaged")  # a damaged copy is rebuilt when it is published again
    entry = FamilyEntry("x", artifact=str(model_folder(tmp_path / "again", "t1-1")))
    assert snapshot_model(entry, tmp_path / "exp" / PUBLISHED_DIR).artifact == str(old)
    assert (old / "model.onnx").read_bytes() == (tmp_path / "again" / "model.onnx").read_bytes()


def test_a_push_sends_data_then_records_then_the_family_file_last(s3, tmp_path):
    node = tmp_path / "node"
    publish_version(node, 1)
    m = Mirror(s3("order"), node)
    m.fs = spy = FlakyFS(m.fs)
    m.push()
    names = [p.split("/order/", 1)[1] for what, p in spy.written]
    assert names[-2:] == ["exp/family.json", "family.json"]
    ranks = [push_order(n)[0] for n in names]
    assert ranks == sorted(ranks)  # every data file before every record before the family files
    assert names.index("exp/runs/t1/best/model.safetensors") < names.index("exp/runs/t1/best/meta.json") \
        < names.index("exp/runs/t1/summary.json")


def test_a_push_that_fails_at_any_write_leaves_the_old_family_whole_and_a_retry_completes(s3, tmp_path):
    injected = 0
    for mode in ("open", "close"):
        n = 1
        while True:
            uri, node = s3(f"flaky-{mode}-{n}"), tmp_path / f"{mode}-{n}"
            publish_version(node, 1)
            m = Mirror(uri, node)
            m.push()
            real = m.fs
            publish_version(node, 2)  # t1 retrained: its best/ has no int8 file any more
            m.fs = flaky = FlakyFS(real, fail_at=n, mode=mode)
            try:
                m.push()
            except OSError as exc:
                assert "injected failure" in str(exc)
            m.fs = real
            if not flaky.injected:  # n passed the last write: every write has failed once
                break
            injected += flaky.injected
            deleting = ("upload", f"raykd/flaky-{mode}-{n}/family.json") in flaky.written  # all records up
            assert bucket_family(uri) == ("2" if deleting else "1"), (mode, n)
            assert bucket_family(uri, "exp/family.json") in ("1", "2")
            assert "exp/runs/t1/best/model_int8.onnx" in bucket_names(uri)  # deletions come last
            m.push()  # the retry
            assert bucket_family(uri) == bucket_family(uri, "exp/family.json") == "2"
            assert "exp/runs/t1/best/model_int8.onnx" not in bucket_names(uri)  # deleted, after the family
            n += 1
        assert n > 8, (mode, n)  # v2's uploads and its deletion: each one failed once
    print(f"\n{injected} injected write failures: the bucket's family stayed whole after each, every retry completed")


def test_a_family_file_rewritten_during_a_push_waits_for_the_next_push_with_its_models(s3, tmp_path):
    uri, node = s3("rewritten"), tmp_path / "node"
    publish_version(node, 1)
    m = Mirror(uri, node)
    m.push()
    publish_version(node, 2)
    again: list[int] = []

    def publish_again() -> None:  # a newer family is published while version 2 goes up
        if not again:
            again.append(3)
            publish_version(node, 3)

    real = m.fs
    m.fs = FlakyFS(real, after=publish_again)
    m.push()
    assert bucket_family(uri) == bucket_family(uri, "exp/family.json") == "1"  # not 3 without its models
    assert "exp/runs/t1/best/model_int8.onnx" in bucket_names(uri)  # an incomplete push deletes nothing
    m.fs = real
    m.push()
    assert bucket_family(uri) == "3" and "exp/runs/t1/best/model_int8.onnx" not in bucket_names(uri)


def test_readers_fetching_between_every_write_of_a_publish_see_the_old_family_or_the_new_one(
        s3, tmp_path, monkeypatch):
    uri, node = s3("readers"), tmp_path / "node"
    publish_version(node, 1)
    m = Mirror(uri, node)
    m.push()
    seen: list[str] = []
    by_file: dict[str, list[str]] = {}

    def reader() -> None:
        fresh = len(seen) % 2  # every other fetch on a node with an empty mirror
        monkeypatch.setenv("RAYKD_MIRROR_ROOT", str(tmp_path / (f"fresh{len(seen)}" if fresh else "reader")))
        name = ("family.json", "exp/family.json")[len(seen) // 2 % 2]  # the latest family, the experiment's
        local = fetch_family(s3(f"readers/{name}"))
        family = load_family(local)
        versions = {e.version for e in family.models}
        assert len(versions) == 1, versions
        for e in family.models:  # what is served is what the family records
            for rel, record in e.files.items():
                assert hashlib.sha256((local.parent / rel).read_bytes()).hexdigest() == record["sha256"], rel
        seen.append(versions.pop())
        by_file.setdefault(name, []).append(seen[-1])

    publish_version(node, 2)
    m.fs = FlakyFS(m.fs, after=reader)
    m.push()
    reader()
    assert seen[0] == "1" and seen[-1] == "2" and set(seen) == {"1", "2"}
    for versions in by_file.values():  # once a family file is seen new, never old again
        assert versions == sorted(versions) and set(versions) == {"1", "2"}, by_file
    print(f"\n{len(seen)} fetches during a publish, all consistent: {seen.count('1')} old, {seen.count('2')} new")


def test_a_reader_whose_family_file_was_replaced_under_it_starts_over_with_the_new_one(s3, tmp_path, monkeypatch,
                                                                                        caplog):
    """A family whose files are replaced in place (not content-addressed): the old family file's
    files no longer match, so the fetch reads the family file again and takes the new family."""
    uri, node = s3("inplace"), tmp_path / "node"
    best = model_folder(node / "runs" / "t1" / "best", "v1")

    def write(version: str) -> None:
        write_family(node / "family.json", [FamilyEntry("t1", version, str(best), str(best / "model.onnx"))],
                     winner="t1")

    write("1")
    writer = Mirror(uri, node)
    writer.push()
    monkeypatch.setenv("RAYKD_MIRROR_ROOT", str(tmp_path / "reader"))
    folder, _ = split_uri(s3("inplace/family.json"))
    reading = Mirror.get(folder, default_mirror_dir(folder))
    real = reading.fs

    class PublishesOnce:  # the publish lands right after the reader read the old family file
        def __getattr__(self, name):
            return getattr(real, name)

        def open_input_stream(self, path, *args, **kwargs):
            with real.open_input_stream(path, *args, **kwargs) as src:
                data = src.read()
            if path.endswith("family.json") and not hasattr(self, "done"):
                self.done = True
                model_folder(best, "v2")
                write("2")
                writer.push()
            return pa.BufferReader(data)

    reading.fs = PublishesOnce()
    caplog.set_level(logging.INFO, logger="raykd")
    family = load_family(s3("inplace/family.json"))
    assert family.get("t1").version == "2" and "was replaced while it was fetched" in caplog.text
    assert Path(family.get("t1").onnx).read_bytes() == (best / "model.onnx").read_bytes()


def test_a_file_changed_in_the_bucket_fails_the_fetch_naming_it_and_the_last_good_family_stays(
        s3, tmp_path, monkeypatch):
    uri, node = s3("tampered"), tmp_path / "node"
    publish_version(node, 1)
    m = Mirror(uri, node)
    m.push()
    family_uri = s3("tampered/family.json")
    monkeypatch.setenv("RAYKD_MIRROR_ROOT", str(tmp_path / "replica"))
    good = fetch_family(family_uri)
    kept = good.read_bytes()
    publish_version(node, 2)
    m.push()
    t1 = json.loads((node / "family.json").read_text())["models"][0]
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(f"{root}/{t1['onnx']}") as out:  # changed in the bucket after publishing
        out.write(b"not the published model")
    with pytest.raises(FamilyIntegrityError, match=rf"model 't1': {t1['onnx']} in the bucket is not the file the "
                                                   r"family records .* nothing of this family is served"):
        load_family(family_uri)  # what the Serve app calls, on the driver and in every replica
    assert good.read_bytes() == kept  # the family this node fetched before is still the local one
    assert {e.version for e in load_family(good).models} == {"1"}
    assert not list((tmp_path / "replica").rglob("*.raykd-part"))
    monkeypatch.setenv("RAYKD_MIRROR_ROOT", str(tmp_path / "fresh"))  # a node starting now fails too
    with pytest.raises(FamilyIntegrityError, match=t1["onnx"]):
        load_family(family_uri)
    fs.delete_file(f"{root}/{t1['onnx']}")
    with pytest.raises(FileNotFoundError, match=rf"names {t1['onnx']}, which is not in the bucket"):
        load_family(family_uri)


def test_a_family_file_without_hashes_still_loads_from_a_bucket_with_a_warning(s3, tmp_path, monkeypatch, caplog):
    node = tmp_path / "node"
    best = model_folder(node / "runs" / "t1" / "best", "old")
    (node / "family.json").write_text(json.dumps({"winner": "t1", "models": [
        {"name": "t1", "version": "1", "artifact": "runs/t1/best", "onnx": "runs/t1/best/model.onnx"}]}))
    Mirror(s3("legacy"), node).push()
    monkeypatch.setenv("RAYKD_MIRROR_ROOT", str(tmp_path / "replica"))
    caplog.set_level(logging.WARNING, logger="raykd")
    family = load_family(s3("legacy/family.json"))
    assert Path(family.get("t1").onnx).read_bytes() == (best / "model.onnx").read_bytes()
    assert "records no file hashes for t1" in caplog.text and "publish it again" in caplog.text
