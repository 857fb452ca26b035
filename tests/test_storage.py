"""Outputs in a bucket (raykd.storage): a mirror folder that pushes what changed and pulls
what is missing or newer, never copies a file being written, propagates deletions and never leaves
a partial download; a run and a search whose data and outputs live in a real S3 bucket (on moto's
S3 server on loopback, spoken to by pyarrow's S3 client as a cluster's bucket would be). Atomic,
verified publishing of a family: tests/test_publish_atomic.py."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from raykd.storage import ChecksumError, Mirror, default_mirror_dir, mirrored, resolve_output
from tests.conftest import s3_listing, s3_mtime


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bucket_files(bucket: Path) -> dict[str, str]:
    return {p.relative_to(bucket).as_posix(): p.read_text() for p in bucket.rglob("*") if p.is_file()}


@pytest.fixture
def pair(tmp_path):
    """A file:// bucket and two mirrors of it (two nodes' disks)."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    return f"file://{bucket}", bucket, tmp_path / "node_a", tmp_path / "node_b"


def test_a_push_uploads_what_is_new_or_changed_and_nothing_twice(pair):
    uri, bucket, a, _ = pair
    m = Mirror(uri, a)
    write(a / "exp/run1/metrics.json", "[1]")
    write(a / "exp/run1/summary.json", "{}")
    write(a / "exp/run1/metrics.json.tmp", "half")  # a writer's temporary file: never copied
    assert m.push() == 2
    assert bucket_files(bucket) == {"exp/run1/metrics.json": "[1]", "exp/run1/summary.json": "{}"}
    assert m.push() == 0
    time.sleep(0.01)
    write(a / "exp/run1/metrics.json", "[2]")  # same size, new content: pushed by what this process saw
    assert m.push() == 1 and (bucket / "exp/run1/metrics.json").read_text() == "[2]"
    assert Mirror(uri, a).push() == 0  # another process on this node: the bucket has every file


def test_a_pull_brings_what_other_nodes_wrote_but_not_their_resume_state(pair):
    uri, bucket, a, b = pair
    write(a / "exp/teacher/best/weights.safetensors", "w")
    write(a / "exp/teacher/checkpoint/state.pt", "resume state")
    write(a / "exp/run1/checkpoint/state.pt", "run1 state")
    write(a / "exp/run1/checkpoint_000001/x", "Ray Train's own")
    Mirror(uri, a).push()
    nb = Mirror(uri, b)
    assert nb.pull(b / "exp/teacher") == 1  # the weights; another run's checkpoint stays in the bucket
    assert (b / "exp/teacher/best/weights.safetensors").read_text() == "w"
    assert not (b / "exp/teacher/checkpoint").exists()
    assert nb.pull(b / "exp/run1", own=b / "exp/run1") == 1  # its own checkpoint, not Ray Train's
    assert (b / "exp/run1/checkpoint/state.pt").read_text() == "run1 state"
    assert not (b / "exp/run1/checkpoint_000001").exists()
    assert nb.pull(b / "exp") == 0 and nb.push() == 0  # pulled files are known: not sent back


def test_a_pull_takes_newer_files_from_the_bucket_and_keeps_newer_local_ones(pair):
    uri, bucket, a, b = pair
    write(a / "exp/shared.json", "old")
    write(a / "exp/mine.json", "v1")
    Mirror(uri, a).push()
    nb = Mirror(uri, b)
    nb.pull()
    write(bucket / "exp/shared.json", "new!")  # another node pushed a newer copy
    t = time.time() + 5
    os.utime(bucket / "exp/shared.json", (t, t))
    write(b / "exp/mine.json", "v2 not pushed yet")  # written here after the bucket's copy
    t = time.time() + 10
    os.utime(b / "exp/mine.json", (t, t))
    assert nb.pull() == 1
    assert (b / "exp/shared.json").read_text() == "new!"
    assert (b / "exp/mine.json").read_text() == "v2 not pushed yet"
    assert nb.push() == 1 and (bucket / "exp/mine.json").read_text() == "v2 not pushed yet"


def test_mirrored_work_pushes_while_it_runs_and_when_it_fails(pair):
    uri, bucket, a, _ = pair
    m = Mirror(uri, a)
    own = a / "exp/run1"
    with pytest.raises(RuntimeError):
        with mirrored(m, own=own, every_s=0.1):
            write(own / "metrics.json", "[1]")
            deadline = time.time() + 10
            while not (bucket / "exp/run1/metrics.json").exists() and time.time() < deadline:
                time.sleep(0.05)
            assert (bucket / "exp/run1/metrics.json").exists()  # pushed while the work ran
            write(own / "summary.json", "{}")
            raise RuntimeError("the work failed")
    assert (bucket / "exp/run1/summary.json").read_text() == "{}"  # the last push ran anyway


def test_a_nested_unit_leaves_the_periodic_push_to_the_enclosing_one_but_ends_synced(pair):
    import threading

    uri, bucket, a, _ = pair
    m = Mirror(uri, a)

    def pushers() -> int:
        return sum(t.name == "raykd-mirror-push" for t in threading.enumerate())

    with mirrored(m, own=a / "exp/trial1", every_s=60):
        with mirrored(m, own=a / "exp/trial1", every_s=60):  # the trial's run, in the same folder
            assert pushers() == 1
            write(a / "exp/trial1/metrics.json", "[1]")
        assert (bucket / "exp/trial1/metrics.json").read_text() == "[1]"  # pushed when the run ended
        with mirrored(m, own=a / "exp/trial2", every_s=60):  # not inside trial1: its own pusher
            assert pushers() == 2
    assert pushers() == 0 and not m.syncing


def test_an_sqlite_study_is_pushed_as_a_consistent_snapshot_without_its_journal(pair):
    import sqlite3

    uri, bucket, a, _ = pair
    m = Mirror(uri, a)
    (a / "exp").mkdir(parents=True)
    db = sqlite3.connect(a / "exp/optuna.db", isolation_level=None)
    db.execute("CREATE TABLE trials (id INTEGER)")
    db.execute("INSERT INTO trials VALUES (1)")
    db.execute("BEGIN IMMEDIATE")  # a write in flight, as when the study records a trial
    db.execute("INSERT INTO trials VALUES (2)")
    assert (a / "exp/optuna.db-journal").exists()
    assert m.push() == 1

    def stored_rows() -> list:
        copy = sqlite3.connect(bucket / "exp/optuna.db")
        try:
            return [r[0] for r in copy.execute("SELECT id FROM trials ORDER BY id")]
        finally:
            copy.close()

    assert stored_rows() == [1] and not (bucket / "exp/optuna.db-journal").exists()
    db.execute("COMMIT")
    assert m.push() == 1 and stored_rows() == [1, 2]
    db.close()


def test_a_uri_output_dir_resolves_to_a_mirror_named_after_it(tmp_path):
    local, uri, mirror_dir = resolve_output("file:///data/runs", None)
    assert uri == "file:///data/runs" and local == mirror_dir == default_mirror_dir(uri)
    assert "data-runs-" in Path(local).name and local.startswith(str(Path.home()))
    assert resolve_output("file:///data/runs", str(tmp_path / "m"))[0] == str(tmp_path / "m")
    assert resolve_output("runs", None) == (str(Path("runs").resolve()), None, None)
    with pytest.raises(ValueError, match="cannot open output location nosuch://x"):
        resolve_output("nosuch://x", None)


def test_the_uri_of_a_mirrored_path_keeps_the_buckets_options(tmp_path):
    m = Mirror.get("s3://bkt/out?endpoint_override=127.0.0.1:1&scheme=http", tmp_path)
    assert m.uri_of(tmp_path / "exp" / "run1") == "s3://bkt/out/exp/run1?endpoint_override=127.0.0.1:1&scheme=http"
    assert m.remote(tmp_path / "exp") == "bkt/out/exp"


# --------------------------------------------------------------------------------------------------
# A real S3 protocol: moto's server on loopback (fixtures s3 and s3_dataset in conftest.py)
# --------------------------------------------------------------------------------------------------


def test_files_being_written_are_never_uploaded_nor_downloaded(s3, tmp_path):
    uri, a = s3("temporary"), tmp_path / "a"
    real = ["exp/run1/best/model.safetensors", "exp/run1/best/meta.json", "exp/teacher_outputs/k1/outputs/0.parquet"]
    being_written = [
        "exp/run1/metrics.json.tmp",  # rundir's tmp + os.replace
        "exp/run1/best/.meta.json.tmp-123",  # write_meta's
        "exp/run1/.best.tmp-abc12/model.safetensors",  # save_artifact's folder before its swap
        "exp/run1/.best.old-77/meta.json",  # ... and the old one it sets aside
        "exp/teacher_outputs/k2.tmp/outputs/0.parquet",  # teacher outputs' folder before its rename
        "exp/run1/best/model.onnx.raw",  # the ONNX exporter's raw trace
        "exp/run1/checkpoint/state.pt.tmp",
        "exp/run1/best/model.onnx.12-34.raykd-part",  # the mirror's own download in progress
        "exp/optuna.db-journal",
        "data/ds.tmp-9/shards/0.parquet", "data/ds.old-9/manifest.json",  # an ingest's staging and old folders
    ]
    for name in real + being_written:
        write(a / name, name)
    assert Mirror(uri, a).push() == len(real)
    assert s3_listing(uri) == sorted(real)
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    for name in being_written[:3]:  # in the bucket too (another writer's): a pull leaves them there
        with fs.open_output_stream(f"{root}/{name}") as out:
            out.write(b"half")
    b = tmp_path / "b"
    assert Mirror(uri, b).pull() == len(real)
    assert sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) == sorted(real)


def test_deletions_propagate_only_for_what_this_mirror_copied_under_the_pushed_folder(s3, tmp_path):
    uri, a, b = s3("deletions"), tmp_path / "a", tmp_path / "b"
    for name in ("run1/best/model.safetensors", "run1/best/meta.json", "run1/best/model_int8.onnx",
                 "run1/summary.json", "run2/metrics.json"):
        write(a / "exp" / name, name)
    m = Mirror(uri, a)
    m.push()
    write(tmp_path / "c/exp/run3/metrics.json", "another node's run")
    Mirror(uri, tmp_path / "c").push()
    write(tmp_path / "s/exp/run1/best/model_int8.onnx", "a sibling prefix")
    Mirror(s3("deletions-sibling"), tmp_path / "s").push()
    nb = Mirror(uri, b)
    nb.pull(b / "exp/run1")  # a node that read run1 before it was retrained

    shutil.rmtree(a / "exp/run1/best")  # retrained: best/ replaced without the int8 variant
    write(a / "exp/run1/best/model.safetensors", "new weights")
    write(a / "exp/run1/best/meta.json", "new meta")
    shutil.rmtree(a / "exp/run2")  # a folder gone as a whole: the mirror is a cache, not a deletion
    assert m.push() == 2
    stored = s3_listing(uri)
    assert "exp/run1/best/model_int8.onnx" not in stored
    assert {"exp/run2/metrics.json", "exp/run3/metrics.json"} <= set(stored)
    assert s3_listing(s3("deletions-sibling")) == ["exp/run1/best/model_int8.onnx"]  # outside the prefix
    assert nb.push() == 0 and "exp/run1/best/model_int8.onnx" not in s3_listing(uri)  # an old copy: not back
    assert Mirror(uri, tmp_path / "fresh").pull() == len(s3_listing(uri))  # so a pull cannot bring it back
    assert not (tmp_path / "fresh/exp/run1/best/model_int8.onnx").exists()

    (a / "exp/run1/summary.json").unlink()
    m.push(a / "exp/run1/best")  # a push of a folder deletes nothing outside it
    assert "exp/run1/summary.json" in s3_listing(uri)
    m.push(a / "exp/run1")
    assert "exp/run1/summary.json" not in s3_listing(uri)


def test_a_failed_download_leaves_no_part_file_and_the_old_copy_in_place(s3, tmp_path):
    uri, a, b = s3("downloads"), tmp_path / "a", tmp_path / "b"
    (a / "exp").mkdir(parents=True)
    (a / "exp/weights.bin").write_bytes(os.urandom(100_000))
    Mirror(uri, a).push()
    write(b / "exp/weights.bin", "old copy")
    os.utime(b / "exp/weights.bin", (0, 0))  # older than the bucket's
    nb = Mirror(uri, b)
    real = nb.fs

    class Drops:  # the connection drops after the first kilobyte
        def __init__(self, stream) -> None:
            self.stream, self.reads = stream, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def read(self, n=-1):
            self.reads += 1
            if self.reads > 1:
                raise OSError("connection reset by peer")
            return self.stream.read(1024)

    class DroppingFS:
        def __getattr__(self, name):
            return getattr(real, name)

        def open_input_stream(self, path, *args, **kwargs):
            return Drops(real.open_input_stream(path, *args, **kwargs))

    nb.fs = DroppingFS()
    with pytest.raises(OSError, match="connection reset"):
        nb.pull()
    assert not list(b.rglob("*.raykd-part"))
    assert (b / "exp/weights.bin").read_text() == "old copy"
    nb.fs = real
    with pytest.raises(ChecksumError, match="weights.bin does not match its record"):
        nb.fetch("exp/weights.bin", sha256="0" * 64)  # a verified fetch refuses other content
    assert not list(b.rglob("*.raykd-part")) and (b / "exp/weights.bin").read_text() == "old copy"
    assert nb.pull() == 1 and (b / "exp/weights.bin").read_bytes() == (a / "exp/weights.bin").read_bytes()
    assert not list(b.rglob("*.raykd-part"))


def test_a_run_reads_its_data_from_s3_and_its_outputs_land_there_from_the_node_that_trained(
        ray_cluster, s3, s3_dataset, tmp_path):
    from raykd.config import RunConfig, load_config
    from raykd.train.driver import run_train

    mirror_dir = tmp_path / "mirror"
    cfg = load_config(RunConfig, None, [
        "name=s3run", f"output_dir={s3('runs')}", f"mirror_dir={mirror_dir}", f"data.path={s3_dataset}",
        "student.name=raykd_test_tiny_cnn", "student.image_size=32", "train.epochs=1", "train.batch_size=16",
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.5"])
    result = run_train(cfg)  # a Ray task trains it: it pulls what it reads and pushes what it writes
    assert result.epochs == 1 and result.test
    stored = s3_listing(s3("runs"))
    for name in ("config.yaml", "metrics.json", "summary.json", "timing.json", "best/model.safetensors",
                 "best/meta.json", "checkpoint/state.pt"):
        assert f"s3run/{name}" in stored, stored
    shutil.rmtree(mirror_dir)  # a fresh machine: the bucket still has the run, and says so
    with pytest.raises(FileExistsError, match="run folder .*s3run exists: pass --resume"):
        run_train(cfg)


def test_a_search_with_its_outputs_in_s3_resumes_on_a_machine_that_has_none_of_them(ray_cluster, s3, s3_dataset,
                                                                                  tmp_path, caplog):
    from raykd.tune.search import run_tune
    from raykd.tune.space_file import load_space

    doc = {
        "name": "s3search", "output_dir": s3("tune"), "mirror_dir": str(tmp_path / "mirror"),
        "base": {
            "data": {"path": s3_dataset},
            "student": {"image_size": 32},
            "optim": {"schedule": "constant"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
            "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64},
        },
        "students": ["raykd_test_tiny_cnn"],
        "methods": {"baseline": {}},
        "budget": {"num_samples": 2, "max_concurrent": 2, "trial_retries": 0},
        "confirm": {"seeds": 0},
        "search": {"seed": 0},
        "export": {"max_images": 16, "latency_reps": 2},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    first = run_tune(load_space(path))
    assert len(first.records) == 2 and all(r.status == "TERMINATED" for r in first.records)
    stored = s3_listing(s3("tune"))
    assert "s3search/leaderboard.json" in stored and "family.json" in stored
    for r in first.records:
        assert f"s3search/runs/{r.trial_id}/summary.json" in stored
    trained = {r.trial_id: s3_mtime(s3("tune"), f"s3search/runs/{r.trial_id}/metrics.json") for r in first.records}
    shutil.rmtree(tmp_path / "mirror")
    caplog.set_level(logging.INFO, logger="raykd")
    again = run_tune(load_space(path), resume=True)  # pulls the experiment, restores it, trains nothing
    assert "stage 2: resuming the search in" in caplog.text
    assert sorted(r.trial_id for r in again.records) == sorted(trained)
    scores = {r.run: r.value("bma") for r in first.leaderboard.ranked()}
    assert {r.run: r.value("bma") for r in again.leaderboard.ranked()} == scores  # read back, not retrained
    for trial_id, mtime in trained.items():  # no trial trained again: its metrics were not written again
        assert s3_mtime(s3("tune"), f"s3search/runs/{trial_id}/metrics.json") == mtime
        assert (tmp_path / "mirror/s3search/runs" / trial_id / "summary.json").is_file()


def test_a_ddp_run_keeps_ray_trains_checkpoints_in_s3_and_every_rank_scores_the_best_weights(
        ray_cluster, s3, s3_dataset, tmp_path):
    from raykd.config import RunConfig, load_config
    from raykd.train.driver import run_train

    cfg = load_config(RunConfig, None, [
        "name=s3ddp", f"output_dir={s3('ddp')}", f"mirror_dir={tmp_path / 'mirror'}", f"data.path={s3_dataset}",
        "student.name=raykd_test_tiny_cnn", "student.image_size=32", "train.epochs=2", "train.batch_size=16",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.executor=trainer"])
    result = run_train(cfg)
    assert result.epochs == 2 and result.test
    stored = s3_listing(s3("ddp"))
    assert any(name.startswith("s3ddp/checkpoint_") for name in stored), stored  # Ray Train's, in the bucket
    for name in ("metrics.json", "summary.json", "best/model.safetensors", "workers.json"):
        assert f"s3ddp/{name}" in stored
    # the test split was scored once on both ranks with the best epoch's weights (rank 1 pulled them)
    summary = yaml.safe_load((tmp_path / "mirror/s3ddp/summary.json").read_text())
    assert summary["test"] and summary["best_epoch"] in (1, 2) and summary["test_with_best_weights"] is True


def test_a_family_in_s3_is_served_over_http_by_a_replica_that_fetched_its_own_copy(ray_cluster, s3, tmp_path,
                                                                                   monkeypatch):
    import pyarrow.fs as pafs
    import requests
    from ray import serve

    from raykd.artifact.format import load_artifact
    from raykd.export.onnx import export_onnx
    from raykd.serve.__main__ import run_serve
    from raykd.serve.app import ServeArgs
    from raykd.serve.family import FamilyEntry, load_family, write_family
    from tests.export.helpers import encoded_image, make_artifact
    from tests.serve.test_replica_kill import _free_port

    local = tmp_path / "published"
    art = make_artifact(local / "exp/runs/t1/best", "raykd_test_tiny_cnn", {}, image_size=32, version="t1")
    onnx = export_onnx(*load_artifact(art), art / "model.onnx")
    write_family(local / "family.json", [FamilyEntry(name="t1", version="t1", artifact=str(art), onnx=str(onnx))],
                 winner="t1")
    fs, root = pafs.FileSystem.from_uri(s3("published"))
    pafs.copy_files(str(local), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    family_uri = s3("published/family.json")

    monkeypatch.setenv("RAYKD_MIRROR_ROOT", str(tmp_path / "driver"))
    family = load_family(family_uri)  # the driver's copy: what the app is checked against
    assert Path(family.get("t1").onnx).is_file() and str(tmp_path / "driver") in family.get("t1").onnx
    replica_root = tmp_path / "replica"  # the replica's node: its own copy, fetched in the replica
    port = _free_port()
    run_serve(ServeArgs(family=family_uri, num_cpus=0.25, max_batch_size=1), host="127.0.0.1", port=port,
              blocking=False, env_vars={"RAYKD_MIRROR_ROOT": str(replica_root)})
    try:
        r = requests.post(f"http://127.0.0.1:{port}/predict", data=encoded_image(1, ".jpg", (64, 64)),
                          headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "t1"
    finally:
        serve.shutdown()
    fetched = {p.name for p in replica_root.rglob("*") if p.is_file()}
    assert {"family.json", "model.onnx", "meta.json", "model.safetensors"} <= fetched
    with pytest.raises(FileNotFoundError, match="family file s3://raykd/nothing/family.json.* not found"):
        load_family(s3("nothing/family.json"))
