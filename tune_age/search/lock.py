"""One live driver per experiment, and whether one is alive.

    with DriverLock(exp_dir) as lock:      # refuses a second driver with a one-line error
        ...                                # lock.took_over: a message when a dead driver's lock was taken
    driver_alive(exp_dir)                  # for `trials`, the report and `--follow`

`driver.lock` in the experiment folder holds the driver's host, pid and start time. The
driver holds an exclusive `flock` on it while it runs (the kernel drops it when the process
dies, however it dies) and touches it every HEARTBEAT_S seconds, so that a reader on another
host, where flock says nothing, can tell a live driver (a fresh file) from a dead one. The
heartbeat also adds the time this run has taken to `time_used_s` in `tune_age.json`, which is
what a time budget is measured against across resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import TuneAgeError

LOCK_FILE = "driver.lock"
HEARTBEAT_S = 5.0
STALE_S = 30.0  # a lock untouched this long belongs to a dead driver


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(info: dict) -> bool:
    """Whether the process a lock names (on this host) still runs."""
    pid = int(info.get("pid") or 0)
    return pid > 0 and _pid_alive(pid)


def driver_alive(exp_dir: str | Path) -> bool:
    """Whether a driver runs this experiment now: here, by its flock; elsewhere, by a lock
    file touched within STALE_S seconds."""
    path = Path(exp_dir) / LOCK_FILE
    info = _read(path)
    if not info:
        return False
    try:
        fresh = time.time() - path.stat().st_mtime < STALE_S
    except OSError:
        return False
    if info.get("host") == socket.gethostname():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        # Not held here: the driver is gone, unless this is a copy of its lock (an
        # experiment read from an object store) and it still beats.
        return fresh and _alive(info)
    return fresh


class DriverLock:
    """The experiment's driver lock, held from `__enter__` to `__exit__`; `on_beat(elapsed_s)`
    is called from the heartbeat thread with this run's time so far."""

    def __init__(self, exp_dir: str | Path, on_beat=None):
        self.path = Path(exp_dir) / LOCK_FILE
        self.on_beat = on_beat
        self.mirror = None  # storage.Mirror of an experiment in an object store, pushed on every beat
        self.took_over: str | None = None
        self.started = time.time()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "DriverLock":
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TuneAgeError(
                f"{self.path.parent.name!r} is being run by another driver ({_describe(_read(self.path))}); "
                "wait for it to end, or stop it (Ctrl-C) and resume"
            ) from None
        before = _read(self.path)
        here = before.get("host") == socket.gethostname()
        # Another host's driver, or one here whose lock reached this folder as a copy (from an
        # object store, where flock says nothing): alive while its lock is fresh.
        if before and (not here or (before.get("pid") != os.getpid() and _alive(before)))\
                and time.time() - self.path.stat().st_mtime < STALE_S:
            os.close(fd)
            raise TuneAgeError(
                f"{self.path.parent.name!r} is being run by another driver ({_describe(before)}, its lock "
                f"touched under {STALE_S:.0f} s ago); wait for it to end, or stop it and resume"
            )
        if before:
            self.took_over = f"took over the lock of a driver that is no longer running ({_describe(before)})"
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        self._thread = threading.Thread(target=self._beat, name="tune_age-heartbeat", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        os.utime(self.path)
        if self.on_beat is not None:
            self.on_beat(time.time() - self.started)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except OSError:
                pass  # a full or vanished disk: the driver's own writes will say so

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.beat()
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        if self._made_folder and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()  # a search that failed before writing anything leaves nothing
