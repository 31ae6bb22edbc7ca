"""Searches whose results live in an object store (`--storage s3://bucket/prefix`, `gs://...`),
for clusters whose nodes share nothing but the network.

    remote = Remote.parse("s3://bucket/runs")        # pyarrow filesystem + path
    local = remote.staging("search-1")                # the driver's working copy of the folder
    mirror = Mirror(local, remote, "search-1")
    mirror.push()                                     # tune_age's own files that changed, whole objects
    exp_dir = local_copy("s3://bucket/runs/search-1") # for trials, report, export: a fresh copy

Ray writes its experiment state and every trial's results and checkpoints to the store
itself (RunConfig's storage_path and storage_filesystem; trial workers upload their own
checkpoints). tune_age's own files (tune_age.json, trials.jsonl, split.csv, the SQLite study
when there is no --study-storage, and driver.lock, the driver's heartbeat) are written in a
local working copy, as on a disk, and uploaded from it as whole objects by `Mirror.push`
on every heartbeat of the driver and at its end, so an object is never rewritten in place
and a reader never sees half a file. A driver on another machine starts from `pull`: the
same files, downloaded into its own working copy.

S3-compatible stores take the usual AWS variables: AWS_ENDPOINT_URL (e.g.
http://127.0.0.1:9000), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigError, TuneAgeError

log = logging.getLogger(__name__)

OWN_FILES = ("tune_age.json", "trials.jsonl", "split.csv", "study.db", "driver.lock", "rerun.json")
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION")


def is_remote(uri: str | os.PathLike | None) -> bool:
    """An object store or another pyarrow filesystem URI (s3://, gs://, local://...); a plain
    path and file:// are not."""
    return bool(uri) and "://" in str(uri) and urlparse(str(uri)).scheme not in ("", "file")


def aws_env() -> dict[str, str]:
    """The AWS variables set here, for trial workers on other nodes (Ray's runtime_env)."""
    return {k: os.environ[k] for k in AWS_VARS if os.environ.get(k)}


@dataclass
class Remote:
    uri: str  # s3://bucket/prefix, without a trailing slash
    fs: Any  # a pyarrow.fs.FileSystem
    path: str  # bucket/prefix: the uri without its scheme, as pyarrow and Ray take it

    @classmethod
    def parse(cls, uri: str) -> "Remote":
        """A ConfigError naming the URI when it cannot be reached."""
        import pyarrow.fs as pafs

        uri = uri.rstrip("/")
        parsed = urlparse(uri)
        if parsed.scheme in ("s3", "gs", "gcs") and not parsed.netloc:
            raise ConfigError(f"{uri}: no bucket; give {parsed.scheme}://BUCKET/PREFIX")
        try:
            if parsed.scheme == "s3":
                endpoint = os.environ.get("AWS_ENDPOINT_URL")
                # allow_delayed_open: an object smaller than a part goes up in one PutObject, not
                # a multipart upload (three requests, the last of which S3 may fail in a 200 OK)
                options: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                                           "allow_delayed_open": True}
                if endpoint:
                    ep = urlparse(endpoint)
                    options.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
                fs, path = pafs.S3FileSystem(**options), (parsed.netloc + parsed.path).rstrip("/")
            elif parsed.scheme in ("gs", "gcs"):
                fs, path = pafs.GcsFileSystem(), (parsed.netloc + parsed.path).rstrip("/")
            else:  # any other filesystem pyarrow knows (local://, hdfs://, ...)
                fs, path = pafs.FileSystem.from_uri(uri)
                path = path.rstrip("/")
            bucket = fs.get_file_info(path.split("/")[0])  # reaches the store: endpoint, credentials
        except Exception as exc:  # OSError from Arrow: refused connection, access denied, no bucket
            why = " ".join(str(exc).split())[:240]
            raise ConfigError(f"{uri}: the object store could not be reached ({why}); check "
                              "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket") from None
        if parsed.scheme in ("s3", "gs", "gcs") and bucket.type != pafs.FileType.Directory:
            raise ConfigError(f"{uri}: there is no bucket {bucket.path!r} at "
                              f"{os.environ.get('AWS_ENDPOINT_URL') or 'the store'}; create it first")
        return cls(uri, fs, path)

    def child(self, name: str) -> str:
        return f"{self.path}/{name}"

    def staging(self, name: str) -> Path:
        """The driver's working copy of experiment `name`, under the cache folder."""
        from ..data.decode import cache_root

        key = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        return cache_root() / "remote" / key / name

    def exists(self, name: str, file: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.child(name)}/{file}").type == pafs.FileType.File


class Mirror:
    """tune_age's own files of one experiment: a local working copy and the store."""

    def __init__(self, local: Path, remote: Remote, name: str):
        self.local, self.remote, self.name = local, remote, name
        self._pushed: dict[str, tuple[float, int]] = {}

    def pull(self, files: tuple[str, ...] = OWN_FILES) -> list[str]:
        """Downloads those of tune_age's files of the experiment that the store holds; their
        names. Each keeps the object's modification time (driver.lock's tells whether its
        driver lives)."""
        import pyarrow.fs as pafs

        self.local.mkdir(parents=True, exist_ok=True)
        got = []
        for file in files:
            info = self.remote.fs.get_file_info(f"{self.remote.child(self.name)}/{file}")
            if info.type != pafs.FileType.File:
                continue
            target = self.local / file
            tmp = target.with_name(f".{file}.download")
            with self.remote.fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if file == "study.db":  # no journal of an earlier local copy may roll it back
                for leftover in ("study.db-journal", "study.db-wal", "study.db-shm"):
                    (self.local / leftover).unlink(missing_ok=True)
            os.replace(tmp, target)
            if info.mtime is not None:
                stamp = info.mtime.timestamp()
                os.utime(target, (stamp, stamp))
            self._pushed[file] = self._stamp(target)
            got.append(file)
        return got

    @staticmethod
    def _stamp(path: Path) -> tuple[float, int]:
        st = path.stat()
        return st.st_mtime, st.st_size

    def remote_driver(self) -> tuple[bool, str] | None:
        """The store's driver.lock: (alive, who) where one is there, alive when its heartbeat
        is fresh and it is another process; None when there is none."""
        import json
        import socket

        from .lock import STALE_S, _alive

        probe = self.local.parent / f".{self.name}.probe.{os.getpid()}"
        try:
            if "driver.lock" not in Mirror(probe, self.remote, self.name).pull(("driver.lock",)):
                return None
            lock = probe / "driver.lock"
            info, age = json.loads(lock.read_text() or "{}"), time.time() - lock.stat().st_mtime
        except ValueError:
            return None
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        here = info.get("host") == socket.gethostname()
        alive = age < STALE_S and not (here and (info.get("pid") == os.getpid() or not _alive(info)))
        return alive, (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
                       f"{info.get('started', '?')}, its heartbeat {age:.0f} s old")

    def push(self, force: bool = False) -> list[str]:
        """Uploads each of tune_age's files that changed since it was last pushed, as a whole
        object (the SQLite study as a consistent snapshot, never a file mid-commit)."""
        sent = []
        for file in OWN_FILES:
            path = self.local / file
            try:
                stamp = self._stamp(path)
                if not force and self._pushed.get(file) == stamp:
                    continue
                data = _sqlite_snapshot(path) if file == "study.db" else path.read_bytes()
            except FileNotFoundError:
                continue
            with self.remote.fs.open_output_stream(f"{self.remote.child(self.name)}/{file}") as out:
                out.write(data)
            self._pushed[file] = stamp
            sent.append(file)
        return sent

    def fetch_all(self) -> None:
        """Everything the store holds of the experiment (Ray's trial folders, checkpoints)
        into the working copy, for the driver's summary when the search ends."""
        import pyarrow.fs as pafs

        pafs.copy_files(self.remote.child(self.name), str(self.local), source_filesystem=self.remote.fs,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)

    def drop_lock(self) -> None:
        """The driver is gone: its heartbeat object too, so no reader waits for it."""
        try:
            self.remote.fs.delete_file(f"{self.remote.child(self.name)}/driver.lock")
        except (FileNotFoundError, OSError):
            pass


def _sqlite_snapshot(path: Path) -> bytes:
    """The database's bytes as of one moment, by SQLite's online backup."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        src, dst = sqlite3.connect(path), sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return copy.read_bytes()


class DeferredDeletes:
    """Ray deletes a checkpoint it no longer keeps at once, but uploads its own state (which
    names each trial's latest checkpoint) every few seconds: a driver killed in between
    leaves a state whose checkpoint is gone, and its trial cannot be resumed. On an object
    store, `install()` makes Ray's deletions wait DELAY_S seconds, longer than the state's
    uploads take; `run(due_only=False)` deletes what waits (the search's end)."""

    DELAY_S = 30.0

    def __init__(self) -> None:
        self._pending: list[tuple[float, Any, str]] = []
        self._lock = threading.Lock()
        self._delete = None

    def install(self) -> bool:
        try:
            from ray.train._internal import checkpoint_manager
        except ImportError:
            return False
        if not hasattr(checkpoint_manager, "_delete_fs_path"):  # a Ray whose internals moved
            log.warning("Ray's checkpoint deletion was not found; an object-store search killed mid-epoch "
                        "may not resume every trial")
            return False
        self._delete = checkpoint_manager._delete_fs_path
        checkpoint_manager._delete_fs_path = self._later
        return True

    def uninstall(self) -> None:
        """Ray deletes at once again (the search is over), after what still waits is deleted."""
        self.run(due_only=False)
        if self._delete is not None:
            from ray.train._internal import checkpoint_manager

            checkpoint_manager._delete_fs_path = self._delete

    def _later(self, fs: Any, fs_path: str) -> None:
        with self._lock:
            self._pending.append((time.time() + self.DELAY_S, fs, fs_path))

    def run(self, due_only: bool = True) -> int:
        now = time.time()
        with self._lock:
            due = [p for p in self._pending if not due_only or p[0] <= now]
            self._pending = [p for p in self._pending if p not in due]
        for _, fs, fs_path in due:
            try:
                self._delete(fs=fs, fs_path=fs_path)
            except Exception as exc:  # gone already, or the store briefly away: left behind
                log.debug("could not delete %s: %s", fs_path, exc)
        return len(due)


def local_copy(uri: str) -> Path:
    """A fresh local copy of the experiment at `uri` (tune_age's files, every trial's results
    and checkpoints), under the cache folder, for the commands that read one from disk."""
    import pyarrow.fs as pafs

    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or not is_remote(parent + "/"):
        raise TuneAgeError(f"{uri}: give the experiment's URI, {urlparse(uri).scheme}://BUCKET/PREFIX/NAME")
    remote = Remote.parse(parent)
    if not remote.exists(name, "tune_age.json"):
        raise TuneAgeError(f"{uri} is not a tune_age experiment folder (no tune_age.json there)")
    target = remote.staging(name).with_name(f"{name}.copy")
    fresh = target.with_name(f".{name}.copy.{os.getpid()}.{time.time_ns()}")
    pafs.copy_files(remote.child(name), str(fresh), source_filesystem=remote.fs,
                    destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
    lock = remote.fs.get_file_info(f"{remote.child(name)}/driver.lock")
    if lock.type == pafs.FileType.File and lock.mtime is not None:  # its age tells whether the driver lives
        os.utime(fresh / "driver.lock", (lock.mtime.timestamp(), lock.mtime.timestamp()))
    old = target.with_name(f".{name}.old.{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(fresh, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
