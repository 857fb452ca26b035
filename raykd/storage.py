"""Outputs in a bucket: a run or search whose ``output_dir`` is a URI (``s3://``, ``gs://``,
``file://``, read and written through pyarrow's filesystems) works in a local folder on each node,
its *mirror*, and copies files between the two.

Every process writes its outputs as files into the mirror, exactly as with a local ``output_dir``
(the same path on every node: ``mirror_dir``, by default ``~/.cache/raykd/mirror/<bucket-path>``),
and :func:`mirrored` around a unit of work moves them:

- on entry it *pulls* what the work reads that other nodes wrote (its own run folder, when it
  continues one, and the teacher's run folder or teacher prep file its config names);
- while it runs, a thread *pushes* what it wrote every ``every_s`` seconds (so a node that dies
  loses at most that much), and once more on exit, failed or not.

Only files that changed are copied: a push uploads a file that is new or changed on this node
since this process last copied it, a pull downloads a file that is missing here or newer in the
bucket. Downloads are atomic (a reader never sees half a file). Ray Train's own checkpoints do not
pass through the mirror: its ``storage_path`` is the URI itself (:func:`train_storage`).

A URI may carry pyarrow's options, e.g. ``s3://bucket/out?endpoint_override=host:9000&scheme=http``
for a bucket on an S3-compatible server; credentials come from the usual environment (``AWS_*``, GCP's
application default credentials), never from the config.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from raykd.data.manifest import filesystem, is_uri

log = logging.getLogger(__name__)

#: Files never copied: writers' half-written files and the mirror's own downloads in progress.
_PARTIAL = (".tmp", ".raykd-part", "-journal", "-wal", "-shm")  # the last three: SQLite's side files
_SQLITE_HEADER = b"SQLite format 3\x00"
#: Folders a pull skips unless they belong to the caller: other runs' resume state, which only
#: the run that wrote it reads again (Ray Train keeps its checkpoints in the bucket itself).
_RESUME_STATE = ("checkpoint",)
#: Ray Train's checkpoint folders: Train reads them from the bucket itself, never from the mirror.
_TRAIN_CHECKPOINTS = "checkpoint_"


def default_mirror_dir(uri: str) -> str:
    """``$RAYKD_MIRROR_ROOT`` (default ``~/.cache/raykd/mirror``) ``/<bucket and path>-<hash>``: the
    same path on nodes that share a home layout (cluster images do); set ``mirror_dir`` where they
    do not."""
    parts = urlsplit(uri)
    readable = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{parts.netloc}{parts.path}").strip("-")
    digest = hashlib.sha1(uri.encode()).hexdigest()[:8]
    root = os.environ.get("RAYKD_MIRROR_ROOT") or "~/.cache/raykd/mirror"
    return str(Path(root).expanduser() / f"{readable[:80]}-{digest}")


def split_uri(uri: str) -> tuple[str, str]:
    """``(folder URI, file name)`` of a file's URI, the bucket's options kept on the folder."""
    parts = urlsplit(uri)
    folder, _, name = parts.path.rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"{uri} names no file")
    return urlunsplit(parts._replace(path=folder)), name


class Mirror:
    """The local folder ``local`` holding a copy of the bucket location ``uri``."""

    _open: dict[tuple[str, str], Mirror] = {}
    _open_lock = threading.Lock()

    def __init__(self, uri: str, local: str | os.PathLike) -> None:
        self.uri, self.local = uri, Path(local)
        try:
            self.fs, self.root = filesystem(uri)
        except ValueError as exc:
            raise ValueError(f"cannot open output location {uri}: {exc}") from None
        self.root = self.root.rstrip("/")
        # what this process last copied, per relative path: the local (size, mtime_ns) then
        self._copied: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        #: The folders (relative, "" for all) that a periodic push of this process keeps in sync.
        self.syncing: set[str] = set()

    @classmethod
    def get(cls, uri: str, local: str | os.PathLike) -> Mirror:
        """The process-wide mirror of ``(uri, local)`` (nested units of work share what was copied)."""
        key = (uri, str(Path(local)))
        with cls._open_lock:
            if key not in cls._open:
                cls._open[key] = cls(uri, local)
            return cls._open[key]

    @classmethod
    def of(cls, cfg) -> Mirror | None:
        """The mirror of a run config (``mirror_uri``/``mirror_dir``), or None for local outputs."""
        uri, local = getattr(cfg, "mirror_uri", None), getattr(cfg, "mirror_dir", None)
        return cls.get(uri, local) if uri and local else None

    def __repr__(self) -> str:
        return f"Mirror({self.uri!r} <-> {str(self.local)!r})"

    # paths
    def rel(self, path: str | os.PathLike) -> str | None:
        """``path``'s place inside the mirror (posix, "" for the root), or None outside it."""
        try:
            rel = Path(path).resolve().relative_to(self.local.resolve())
        except ValueError:
            return None
        return "" if str(rel) == "." else rel.as_posix()

    def _inside(self, path: str | os.PathLike) -> str:
        rel = self.rel(path)
        if rel is None:
            raise ValueError(f"{path} is not inside the output mirror {self.local}")
        return rel

    def synced_by_enclosing(self, rel: str) -> bool:
        """Whether a periodic push of this process already covers the folder ``rel``."""
        return any(a == "" or rel == a or rel.startswith(a + "/") for a in list(self.syncing))

    def remote(self, path: str | os.PathLike) -> str:
        """The bucket path (inside :attr:`fs`) of a local path in the mirror."""
        rel = self._inside(path)
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, path: str | os.PathLike) -> str:
        """The URI of a local path in the mirror (the bucket's options kept)."""
        rel = self._inside(path)
        parts = urlsplit(self.uri)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + (f"/{rel}" if rel else "")))

    # listings
    def _remote_files(self, rel: str) -> dict[str, tuple[int, float]]:
        """Files under ``rel`` in the bucket: relative path -> (size, mtime seconds)."""
        import pyarrow.fs as pafs  # lazy: pyarrow is heavy

        base = f"{self.root}/{rel}" if rel else self.root
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return {rel: (info.size, info.mtime.timestamp() if info.mtime else 0.0)}
        if info.type != pafs.FileType.Directory:
            return {}
        out = {}
        for f in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if f.type == pafs.FileType.File:
                out[f.path[len(self.root) + 1:]] = (f.size, f.mtime.timestamp() if f.mtime else 0.0)
        return out

    def _local_files(self, rel: str) -> dict[str, os.stat_result]:
        base = self.local / rel if rel else self.local
        if base.is_file():
            return {rel: base.stat()}
        out = {}
        for dirpath, _, files in os.walk(base):
            for name in files:
                p = Path(dirpath) / name
                try:
                    out[p.relative_to(self.local).as_posix()] = p.stat()
                except OSError:  # removed while we walked (a writer's temporary file)
                    continue
        return out

    # copies
    def pull(self, path: str | os.PathLike | None = None, *, own: str | os.PathLike | None = None) -> int:
        """Download the files under ``path`` (default: everything) that are missing here or newer in
        the bucket; other runs' ``checkpoint/`` folders are skipped unless they lie under ``own``.
        Returns the number of files downloaded."""
        rel = "" if path is None else self.rel(path)
        if rel is None:
            return 0
        own_rel = self.rel(own) if own is not None else None
        here = self._local_files(rel)
        copied = 0
        for name, (size, mtime) in sorted(self._remote_files(rel).items()):
            if name.endswith(_PARTIAL) or self._skipped(name, own_rel):
                continue
            st = here.get(name)
            if st is not None and mtime <= st.st_mtime + 1.0:  # not newer than the copy here
                if st.st_size == size:
                    self._note(name, st)
                continue  # else written here after the bucket's copy: the next push sends it
            self._download(name, mtime)
            copied += 1
        if copied:
            log.info("pulled %d file(s) of %s from %s", copied, rel or "the outputs", self.uri)
        return copied

    def push(self, path: str | os.PathLike | None = None) -> int:
        """Upload the files under ``path`` (default: everything) that are new or changed here since
        this process last copied them, or missing or of another size in the bucket. Returns the
        number of files uploaded."""
        rel = "" if path is None else self.rel(path)
        if rel is None:
            return 0
        with self._lock:  # the sync thread and an explicit push never upload the same file twice
            there = self._remote_files(rel)
            uploaded = 0
            for name, st in sorted(self._local_files(rel).items()):
                if name.endswith(_PARTIAL):
                    continue
                seen = self._copied.get(name)
                remote = there.get(name)
                if seen == (st.st_size, st.st_mtime_ns) and remote is not None:
                    continue
                if seen is None and remote is not None and remote[0] == st.st_size and remote[1] + 1.0 >= st.st_mtime:
                    self._note(name, st)  # the bucket has it (pulled, or pushed by an earlier process)
                    continue
                if self._upload(name):
                    uploaded += 1
        return uploaded

    def _skipped(self, name: str, own_rel: str | None) -> bool:
        parts = PurePosixPath(name).parts[:-1]
        if any(p.startswith(_TRAIN_CHECKPOINTS) for p in parts):
            return True
        if not any(p in _RESUME_STATE for p in parts):
            return False
        return own_rel is None or not (own_rel == "" or name == own_rel or name.startswith(own_rel + "/"))

    def _note(self, name: str, st: os.stat_result) -> None:
        self._copied[name] = (st.st_size, st.st_mtime_ns)

    def _download(self, name: str, mtime: float) -> None:
        dest = self.local / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.{os.getpid()}.raykd-part")
        with self.fs.open_input_stream(f"{self.root}/{name}") as src, part.open("wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        os.utime(part, (mtime, mtime))  # newer-than checks compare the bucket's clock with itself
        os.replace(part, dest)
        self._note(name, dest.stat())

    def _upload(self, name: str) -> bool:
        src = self.local / name
        try:
            st = src.stat()
            data = _sqlite_snapshot(src) or src.open("rb")
        except FileNotFoundError:  # replaced or removed since the listing
            return False
        except sqlite3.OperationalError as exc:  # a writer holds it: the next push takes it
            log.debug("not pushing %s this time: %s", src, exc)
            return False
        target = f"{self.root}/{name}"
        if self.fs.type_name == "local":  # buckets have no folders to make
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with data, self.fs.open_output_stream(target) as out:
            while chunk := data.read(8 << 20):
                out.write(chunk)
        self._note(name, st)  # the state read, not a later one: a write during the upload is pushed next time
        return True


def _sqlite_snapshot(path: Path):
    """An SQLite database (the Optuna study) as a consistent copy, made with SQLite's backup API
    (a plain copy taken during a write could be torn); None for any other file."""
    with path.open("rb") as fh:
        if fh.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
            return None
    snapshot = tempfile.TemporaryFile()
    with tempfile.TemporaryDirectory(prefix="raykd-sqlite-") as tmp:
        copy = Path(tmp) / "snapshot.db"
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            target = sqlite3.connect(copy)
            with target:
                source.backup(target)
            target.close()
        finally:
            source.close()
        snapshot.write(copy.read_bytes())
    snapshot.seek(0)
    return snapshot


@contextlib.contextmanager
def mirrored(mirror: Mirror | None, *, own: str | os.PathLike | None = None,
             reads: tuple | list = (), push: bool = True, every_s: float = 10.0) -> Iterator[Mirror | None]:
    """Around a unit of work on mirrored outputs (nothing to do when ``mirror`` is None): pull
    ``own`` (the run folder it continues, checkpoints included) and ``reads`` (what else it reads:
    a teacher's run folder, a teacher prep file); with ``push``, upload what changed under ``own`` (or the
    whole mirror) every ``every_s`` seconds while it runs and once more at the end, failed or not."""
    if mirror is None:
        yield None
        return
    if own is not None:
        mirror.pull(own, own=own)
    for path in reads:
        if path is not None:
            mirror.pull(path)
    if not push:
        yield mirror
        return
    # a unit inside another of this process (a trial's run) leaves the periodic push to the outer one
    stop = threading.Event()
    target = mirror.rel(own) if own is not None else ""
    thread = None
    if not mirror.synced_by_enclosing(target):

        def sync() -> None:
            while not stop.wait(every_s):
                try:
                    mirror.push(own)
                except Exception as exc:  # noqa: BLE001 - the bucket may hiccup; the next round retries
                    log.warning("pushing outputs to %s failed (retried in %.0f s): %s", mirror.uri, every_s, exc)

        thread = threading.Thread(target=sync, name="raykd-mirror-push", daemon=True)
        thread.start()
        mirror.syncing.add(target)
    try:
        yield mirror
    finally:
        if thread is not None:
            stop.set()
            thread.join()
            mirror.syncing.discard(target)
        mirror.push(own)  # every unit ends synced, nested or not


def run_reads(cfg) -> list[str]:
    """What a run reads from other runs' outputs: its teacher's and student's checkpoints and its
    teacher prep file (those inside the mirror are pulled; others are left alone)."""
    paths = [getattr(m, "checkpoint", None) for m in (cfg.teacher, cfg.student) if m is not None]
    return [p for p in (*paths, cfg.distill.teacher_prep_file) if p]


def resolve_output(output_dir: str, mirror_dir: str | None) -> tuple[str, str | None, str | None]:
    """``(local output folder, mirror_uri, mirror_dir)`` of an ``output_dir`` as given: a URI is
    mirrored (into ``mirror_dir`` or :func:`default_mirror_dir`), a path is made absolute."""
    if not is_uri(output_dir):
        return str(Path(output_dir).expanduser().resolve()), None, None
    local = str(Path(mirror_dir or default_mirror_dir(output_dir)).expanduser().resolve())
    Mirror.get(output_dir, local)  # a bad URI fails here, before any work
    return local, output_dir, local


def train_storage(mirror: Mirror | None, local_folder: Path) -> dict:
    """``ray.train.RunConfig`` storage arguments for a Train run whose folder is ``local_folder``:
    the bucket itself when outputs are mirrored (every node reaches it), else the folder."""
    if mirror is None:
        return {"storage_path": str(local_folder)}
    return {"storage_path": mirror.remote(local_folder), "storage_filesystem": mirror.fs}
