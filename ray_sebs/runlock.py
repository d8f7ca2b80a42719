"""One driver per run directory: a lock file that a second driver with the same ``--name`` sees.

Two drivers training into one run directory would interleave their checkpoints and overwrite each
other's run record, and Ray Train would resume each from the other's checkpoints. So a driver
writes ``<run_dir>/.lock`` (host, pid, start time, heartbeat time) before any worker starts,
refreshes the heartbeat every :data:`HEARTBEAT_S` seconds from a daemon thread, and deletes the
file when the run ends, whatever the outcome. A second driver that finds a live lock is refused
with a :class:`~ray_sebs.errors.ConfigError` on ``--name``.

A driver that died cannot delete its lock. Its lock is taken over, with a warning, when its pid is
gone on this host (known at once) or when its heartbeat is older than :data:`STALE_AFTER_S` (a
driver on another host; clocks of hosts are assumed to agree within seconds).

The file goes through :mod:`ray_sebs.storage`, so it works on shared storage too. Object storage
has no create-if-absent, so two drivers starting within the same instant could both write it: the
lock reads its file back after writing and refuses when another driver's write won, which leaves
only writes that land in the same few milliseconds undetected.

An interrupted driver (:mod:`ray_sebs.interrupt`) releases its locks from the main thread with
:func:`release_held_locks` when the command's own clean-up did not get to it in time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from types import TracebackType

from ray_sebs.errors import ConfigError
from ray_sebs.storage import delete_file, read_json, write_bytes

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0

_held: set[RunLock] = set()
"""The locks this process holds; guarded by ``_held_guard``."""
_held_guard = threading.Lock()


def release_held_locks() -> int:
    """Release every lock this process still holds; how many there were. For the main thread of
    an interrupted driver whose command thread is stuck in its clean-up: the process is about to
    end, and a lock left behind would refuse the same command for a minute."""
    with _held_guard:
        locks = list(_held)
    for lock in locks:
        lock.release()
    return len(locks)


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the driver that holds it."""

    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    token: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on {self.host}, started {started}"

    def is_dead_here(self) -> bool:
        """Its pid is gone and it ran on this host."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a live process of another user
            return False
        return False


class RunLock:
    """The lock of one run (or sweep) directory; a context manager.

    Args:
        directory: The run directory (a local path or a URI).
        name: The ``--name`` that names it, for the refusal.
        what: ``"run"`` or ``"sweep"``, for the messages.
    """

    def __init__(self, directory: str, *, name: str, what: str = "run",
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = f"{directory.rstrip('/')}/{LOCK_FILE}"
        self.name = name
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.holder: LockHolder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`ConfigError` on ``name`` when a live driver holds it."""
        current = self.read()
        if current is not None:
            age = time.time() - current.heartbeat_at
            if not current.is_dead_here() and age < self.stale_after_s:
                raise self._refusal(current, age)
            logger.warning("taking over the lock %s of a driver that stopped (%s; %s)", self.path,
                           current.describe(), "its process is gone" if current.is_dead_here()
                           else f"no heartbeat for {age:.0f} s")
        now = time.time()
        self.holder = LockHolder(host=socket.gethostname(), pid=os.getpid(), started_at=now,
                                 heartbeat_at=now, token=uuid.uuid4().hex)
        self._write(self.holder)
        winner = self.read()
        if winner is None or winner.token != self.holder.token:
            self.holder = None
            raise self._refusal(winner, 0.0) if winner else ConfigError(
                "name", self.name, f"lost its lock file {self.path} while starting",
                "check that the storage path is writable, then run the command again")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="ray-sebs-run-lock", daemon=True)
        self._thread.start()
        with _held_guard:
            _held.add(self)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still this driver's. Safe to call
        again and from two threads at once: only the first call deletes."""
        with _held_guard:
            if self not in _held:
                return
            _held.discard(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s)
            self._thread = None
        holder, self.holder = self.holder, None
        if holder is None:
            return
        current = self.read()
        if current is not None and current.token == holder.token:
            delete_file(self.path)

    def read(self) -> LockHolder | None:
        """The holder the lock file names, ``None`` without a (readable) lock file."""
        try:
            document = read_json(self.path)
            return None if document is None else LockHolder(**document)
        except (ValueError, TypeError):  # cut off mid-write or of another format: no lock
            return None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()

    def _refusal(self, holder: LockHolder, age: float) -> ConfigError:
        return ConfigError(
            "name", self.name,
            f"is in use by another {self.what} ({holder.describe()}, last heartbeat {age:.0f} s ago)",
            f"wait for it to end, or use another --name; a lock whose driver died is taken over "
            f"{self.stale_after_s:g} s after its last heartbeat (lock file {self.path})")

    def _write(self, holder: LockHolder) -> None:
        write_bytes(self.path, json.dumps(asdict(holder)).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self.holder
            if holder is None:
                return
            current = self.read()
            if current is not None and current.token != holder.token:
                logger.warning("the lock %s was taken over by %s; this driver no longer holds it",
                               self.path, current.describe())
                return
            self.holder = LockHolder(**{**asdict(holder), "heartbeat_at": time.time()})
            try:
                self._write(self.holder)
            except OSError as error:  # storage briefly unreachable: try again at the next beat
                logger.warning("could not refresh the lock %s: %s", self.path, error)
