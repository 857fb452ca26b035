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
bucket. Ray Train's own checkpoints do not pass through the mirror: its ``storage_path`` is the URI
itself (:func:`train_storage`).

What a reader of the bucket can rely on:

- **Data before the files that name it.** A push uploads in one order (:func:`push_order`): data
  files first, then JSON records (an artifact's ``meta.json``, a dataset's ``manifest.json``, a
  run's ``summary.json``: the files that say others are complete), and the family file
  (``family.json``) last. A record is uploaded only as the version that was listed with its data
  (one rewritten during the push waits for the next one).
- **No half-written files.** Files being written are never uploaded (:func:`is_temporary`: the
  ``*.tmp`` files and ``*.tmp-<pid>``/``*.old-<pid>`` folders the writers rename into place, the
  exporter's ``*.raw``, SQLite's journals; the Optuna study goes up as a consistent snapshot).
  An object appears whole (on a ``file://`` bucket it is written beside and renamed), and a
  download goes to a ``.raykd-part`` file renamed into place, removed if anything fails.
- **Deletions follow, after the records.** A file this process copied (uploaded, downloaded or
  found equal) that is gone from a folder still here (a replaced ``best/`` without the last
  export's files) is deleted in the bucket under the pushed folder only, and only once every record
  of the push is up, records first. A folder gone as a whole is not a deletion: the mirror is a
  cache, and emptying a cache never empties the bucket. A file deleted in the bucket by another
  node is not uploaded again by a node that merely holds an old copy.
- **Verified fetches.** :meth:`Mirror.fetch` brings one file whose sha256 is known (a family
  file's members, :mod:`raykd.serve.family`) and checks it before it replaces anything
  (:class:`ChecksumError` otherwise).

A URI may carry pyarrow's options, e.g. ``s3://bucket/out?endpoint_override=host:9000&scheme=http``
for a bucket on an S3-compatible server; credentials come from the usual environment (``AWS_*``, GCP's
application default credentials), never from the config.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, ClassVar
from urllib.parse import urlsplit, urlunsplit

from raykd.artifact.rundir import FAMILY_FILE
from raykd.data.manifest import filesystem, is_uri

log = logging.getLogger(__name__)

#: The suffix of the mirror's own copies in progress (a download here, an upload to a ``file://``).
PART_SUFFIX = ".raykd-part"
#: A path with a part (file or folder name) ending so is being written and never copied: the
#: writers' ``x.tmp`` files and ``x.tmp`` folders renamed into place (:mod:`raykd.artifact.rundir`,
#: the checkpoint, the teacher outputs), the ONNX exporter's ``model.onnx.raw``, the mirror's parts.
_TEMP_SUFFIXES = (".tmp", ".raw", PART_SUFFIX)
#: ... or holding one of these: ``.meta.json.tmp-<pid>`` and the ``.best.tmp-*``/``.best.old-<pid>``
#: folders :func:`raykd.artifact.format.save_artifact` swaps, an ingest's ``<out>.tmp-<pid>``/``.old-<pid>``.
_TEMP_MARKS = (".tmp-", ".old-")
#: SQLite's side files of a database being written (the study itself goes up as a snapshot).
_SQLITE_SIDE = ("-journal", "-wal", "-shm")
_SQLITE_HEADER = b"SQLite format 3\x00"
_CHUNK = 8 << 20
#: Folders a pull skips unless they belong to the caller: other runs' resume state, which only
#: the run that wrote it reads again (Ray Train keeps its checkpoints in the bucket itself).
_RESUME_STATE = ("checkpoint",)
#: Ray Train's checkpoint folders: Train reads them from the bucket itself, never from the mirror.
_TRAIN_CHECKPOINTS = "checkpoint_"


def is_temporary(name: str) -> bool:
    """Whether the relative path ``name`` is a file still being written (or inside a folder that
    is): never uploaded, never downloaded, never deleted in the bucket."""
    parts = PurePosixPath(name).parts
    if parts and parts[-1].endswith(_SQLITE_SIDE):
        return True
    return any(p.endswith(_TEMP_SUFFIXES) or any(m in p for m in _TEMP_MARKS) for p in parts)


def push_order(name: str) -> tuple[int, int, str]:
    """Where the relative path ``name`` comes in a push: the one rule that keeps a reader of the
    bucket from finding a record before what it names. Data files first; then JSON files, the
    records that describe or vouch for data (``meta.json`` beside weights, ``manifest.json`` beside
    shards, ``summary.json`` of a finished run, ``outputs.json`` of teacher outputs); the family
    file, which names models and their hashes, last. Deeper files come first within each rank (a
    model's ``meta.json`` before its run's ``summary.json``). Deletions run in the reverse order."""
    path = PurePosixPath(name)
    rank = 2 if path.name == FAMILY_FILE else 1 if path.suffix == ".json" else 0
    return rank, -len(path.parts), name


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a local file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumError(ValueError):
    """A fetched file is not the one recorded for it: it was changed or damaged in the bucket."""

    def __init__(self, uri: str, *, sha256: str, size: int | None, found_sha256: str, found_size: int) -> None:
        self.uri, self.sha256, self.found_sha256 = uri, sha256, found_sha256
        want = f"sha256 {sha256}" + (f" ({size} bytes)" if size is not None else "")
        super().__init__(f"{uri} does not match its record: the bucket's copy has sha256 {found_sha256} "
                         f"({found_size} bytes), the record says {want}")


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


def _under(name: str, rel: str) -> bool:
    return rel == "" or name == rel or name.startswith(rel + "/")


class Mirror:
    """The local folder ``local`` holding a copy of the bucket location ``uri``."""

    _open: ClassVar[dict[tuple[str, str], Mirror]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

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

    def _bucket(self, name: str) -> str:
        """The bucket path of the relative path ``name``, which never leaves the mirror's prefix."""
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            raise ValueError(f"{name!r} is not a path inside {self.uri}")
        return f"{self.root}/{name}"

    def synced_by_enclosing(self, rel: str) -> bool:
        """Whether a periodic push of this process already covers the folder ``rel``."""
        return any(a == "" or rel == a or rel.startswith(a + "/") for a in list(self.syncing))

    def remote(self, path: str | os.PathLike) -> str:
        """The bucket path (inside :attr:`fs`) of a local path in the mirror."""
        rel = self._inside(path)
        return f"{self.root}/{rel}" if rel else self.root

    def _shown(self, name: str) -> str:
        """The URI of the relative path ``name`` for a message: without the bucket's options."""
        parts = urlsplit(self.uri)
        return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}", query=""))

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
        """Files under ``rel`` here, those being written (:func:`is_temporary`) left out."""
        base = self.local / rel if rel else self.local
        if base.is_file():
            return {} if is_temporary(rel) else {rel: base.stat()}
        out = {}
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if not is_temporary(d)]
            for name in files:
                p = Path(dirpath) / name
                key = p.relative_to(self.local).as_posix()
                if is_temporary(key):
                    continue
                try:
                    out[key] = p.stat()
                except OSError:  # removed while we walked
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
            if is_temporary(name) or self._skipped(name, own_rel):
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
        this process last copied them, or missing or of another size in the bucket, in
        :func:`push_order`; then, if every one went up, delete in the bucket what was removed here
        (:meth:`_propagate_deletions`). Returns the number of files uploaded."""
        rel = "" if path is None else self.rel(path)
        if rel is None:
            return 0
        with self._lock:  # the sync thread and an explicit push never upload the same file twice
            there = self._remote_files(rel)
            here = self._local_files(rel)
            todo = sorted((n for n, st in here.items() if self._changed(n, st, there.get(n))), key=push_order)
            uploaded = sum(self._upload(name, here[name]) for name in todo)
            if uploaded == len(todo):  # every record of this push is up: what it no longer names can go
                self._propagate_deletions(rel, here, there)
        return uploaded

    def _changed(self, name: str, st: os.stat_result, remote: tuple[int, float] | None) -> bool:
        """Whether the local file ``name`` (stat ``st``) must be uploaded, given the bucket's copy."""
        seen = self._copied.get(name)
        if seen == (st.st_size, st.st_mtime_ns):
            if remote is None:  # deleted in the bucket since: an old copy here does not bring it back
                log.debug("not restoring %s: removed from %s since this process copied it", name, self.uri)
            return False
        if seen is None and remote is not None and remote[0] == st.st_size and remote[1] + 1.0 >= st.st_mtime:
            self._note(name, st)  # the bucket has it (pulled, or pushed by an earlier process)
            return False
        return True

    def _propagate_deletions(self, rel: str, here: dict, there: dict) -> int:
        """Delete in the bucket the files under ``rel`` that this process copied and that are gone
        from a folder still here; records first (:func:`push_order`, reversed), so the bucket never
        holds a record naming a deleted file. Returns how many were deleted."""
        base = self.local / rel if rel else self.local
        if not base.is_dir():
            return 0
        gone = [n for n in self._copied if _under(n, rel) and n not in here and not is_temporary(n)]
        deleted = 0
        for name in sorted(gone, key=push_order, reverse=True):
            local = self.local / name
            if local.exists() or not local.parent.is_dir():
                continue  # back (swapped in while we listed), or its whole folder is gone: no deletion
            if name in there:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(self._bucket(name))
                deleted += 1
            del self._copied[name]
        if deleted:
            log.info("deleted %d file(s) of %s from %s (removed here)", deleted, rel or "the outputs", self.uri)
        return deleted

    def _skipped(self, name: str, own_rel: str | None) -> bool:
        parts = PurePosixPath(name).parts[:-1]
        if any(p.startswith(_TRAIN_CHECKPOINTS) for p in parts):
            return True
        if not any(p in _RESUME_STATE for p in parts):
            return False
        return own_rel is None or not (own_rel == "" or name == own_rel or name.startswith(own_rel + "/"))

    def _note(self, name: str, st: os.stat_result) -> None:
        self._copied[name] = (st.st_size, st.st_mtime_ns)

    def _part(self, dest: Path) -> Path:
        return dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}{PART_SUFFIX}")

    def _download(self, name: str, mtime: float, *, sha256: str | None = None, size: int | None = None) -> Path:
        """Copy the bucket's ``name`` here through a part file renamed into place; with ``sha256``,
        a copy of other content is refused (:class:`ChecksumError`) before it replaces anything.
        The part file never outlives the call."""
        dest = self.local / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = self._part(dest)
        digest, count = hashlib.sha256(), 0
        try:
            with self.fs.open_input_stream(self._bucket(name)) as src, part.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    count += len(chunk)
            if sha256 is not None and (digest.hexdigest() != sha256 or size not in (None, count)):
                raise ChecksumError(self._shown(name), sha256=sha256, size=size,
                                    found_sha256=digest.hexdigest(), found_size=count)
            os.utime(part, (mtime, mtime))  # newer-than checks compare the bucket's clock with itself
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        self._note(name, dest.stat())
        return dest

    def fetch(self, name: str, *, sha256: str, size: int | None = None) -> Path:
        """The file ``name`` here with exactly the content ``sha256`` (and ``size``): the local copy
        when it has it, else the bucket's, checked before it replaces the local one.

        Raises:
            FileNotFoundError: the bucket has no ``name``.
            ChecksumError: the bucket's copy has other content (nothing here is changed).
        """
        import pyarrow.fs as pafs  # lazy: pyarrow is heavy

        dest = self.local / name
        target = self._bucket(name)
        if dest.is_file() and size in (None, dest.stat().st_size) and file_sha256(dest) == sha256:
            self._note(name, dest.stat())
            return dest
        info = self.fs.get_file_info(target)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self._shown(name)} is not in the bucket")
        return self._download(name, info.mtime.timestamp() if info.mtime else 0.0, sha256=sha256, size=size)

    def read_remote(self, name: str) -> tuple[bytes, float]:
        """The bucket's ``name`` as bytes, and its mtime (FileNotFoundError when it has none)."""
        import pyarrow.fs as pafs  # lazy: pyarrow is heavy

        target = self._bucket(name)
        info = self.fs.get_file_info(target)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self._shown(name)} is not in the bucket")
        with self.fs.open_input_stream(target) as src:
            return src.read(), (info.mtime.timestamp() if info.mtime else 0.0)

    def place(self, name: str, data: bytes, mtime: float) -> Path:
        """Write ``data`` (read from the bucket's ``name``, mtime ``mtime``) here atomically."""
        dest = self.local / name
        self._bucket(name)  # checks the name
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = self._part(dest)
        try:
            part.write_bytes(data)
            os.utime(part, (mtime, mtime))
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        self._note(name, dest.stat())
        return dest

    def _upload(self, name: str, listed: os.stat_result) -> bool:
        """Upload the local ``name``; False when it is not sent this time (gone, an SQLite file a
        writer holds, or a record rewritten since the listing: the next push sends it)."""
        src = self.local / name
        try:
            opened = _open_for_upload(src, listed, record=push_order(name)[0] > 0)
        except FileNotFoundError:  # replaced or removed since the listing
            return False
        except sqlite3.OperationalError as exc:  # a writer holds it: the next push takes it
            log.debug("not pushing %s this time: %s", src, exc)
            return False
        if opened is None:
            log.debug("not pushing %s this time: rewritten since the listing", src)
            return False
        data, st = opened
        with data:
            self._write_remote(name, data)
        self._note(name, st)  # the state read, not a later one: a write during the upload is pushed next time
        return True

    def _write_remote(self, name: str, data: BinaryIO) -> None:
        """Copy ``data`` to the bucket's ``name``. An object appears whole when its stream closes;
        on a local filesystem (``file://``) it is written beside as a part file and renamed."""
        target = self._bucket(name)
        local_fs = self.fs.type_name == "local"
        dest = f"{target}.{os.getpid()}{PART_SUFFIX}" if local_fs else target
        if local_fs:  # buckets have no folders to make
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        try:
            with self.fs.open_output_stream(dest) as out:
                while chunk := data.read(_CHUNK):
                    out.write(chunk)
            if local_fs:
                self.fs.move(dest, target)
        except BaseException:
            if local_fs:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(dest)
            raise


def _open_for_upload(path: Path, listed: os.stat_result, *, record: bool) -> tuple[BinaryIO, os.stat_result] | None:
    """``(readable copy, its stat)`` of a file to upload: a record (:func:`push_order`) read whole,
    and None if it is no longer the version listed with its data; an SQLite database as a snapshot;
    anything else opened as it is."""
    fh = path.open("rb")
    st = os.fstat(fh.fileno())
    if record:
        with fh:
            if (st.st_size, st.st_mtime_ns) != (listed.st_size, listed.st_mtime_ns):
                return None
            return io.BytesIO(fh.read()), st
    if fh.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER:
        fh.close()
        return _sqlite_snapshot(path), st
    fh.seek(0)
    return fh, st


def _sqlite_snapshot(path: Path) -> BinaryIO:
    """An SQLite database (the Optuna study) as a consistent copy, made with SQLite's backup API
    (a plain copy taken during a write could be torn)."""
    snapshot = tempfile.TemporaryFile()  # noqa: SIM115 - returned open, for the upload to read
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
