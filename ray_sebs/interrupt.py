"""Ctrl-C (SIGINT) and SIGTERM of ``ray-sebs train`` and ``ray-sebs tune``: stop the run, end
the local Ray, exit 130 or 143, and say how to resume.

Why the command runs in a thread: on the main thread, Ray installs its own handlers. Ray Train's
``TorchTrainer.fit()`` sets a SIGINT handler that aborts the run's controller and calls
``sys.exit(0)``, and leaves it installed after the fit; ``ray.init`` sets a SIGTERM handler that
calls ``sys.exit(15)`` from inside a blocking ``ray.get``. Through them Ctrl-C ended ``ray-sebs
train`` with status 1 and SIGTERM with status 134 and a C++ stack dump. Neither handler is
installed off the main thread (Ray Tune's SIGINT handler neither), so the main thread keeps both
signals and only waits. Ray's core worker also installs a C++ SIGTERM handler when it connects,
from whichever thread; the waiting main thread installs its own again every poll.

On a signal the main thread shuts Ray down: a local Ray started by the command takes its
processes (workers included) with it; on a cluster (``--address``) the driver disconnects and Ray
ends the job's actors, the Train controller and through it the workers. The command's thread then
fails out of its ``ray.get`` and runs its clean-up (the run lock is released, TensorBoard files are
closed or uploaded) while the main thread waits for it, at most :data:`CLEANUP_WAIT_S`. A run lock
that clean-up did not get to is then released by the main thread, so the same command can resume
at once. Registered checkpoints stay, so the same command resumes the run.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ray_sebs.runlock import release_held_locks

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLEANUP_WAIT_S = 60.0
"""How long the command's thread may take to clean up after Ray is shut down."""
POLL_S = 0.2

_stopping = threading.Event()
"""Set from the first stop signal until :func:`run_interruptible` returns."""


@dataclass(frozen=True)
class Interruption:
    """A command ended by a signal."""

    signum: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class _NoSigtermWarning(logging.Filter):
    """Drops ``ray.init``'s warning that it set no SIGTERM handler off the main thread: the main
    thread handles SIGTERM here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def run_interruptible(command: Callable[[], int]) -> int | Interruption:
    """``command()``'s exit status, or the :class:`Interruption` when SIGINT or SIGTERM came first.

    Exceptions of ``command`` are raised here. Off the main thread (where Python allows no signal
    handler) ``command`` just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return command()
    received: list[int] = []
    outcome: dict[str, object] = {}

    def target() -> None:
        ray_was_up = ray_initialized()
        try:
            outcome["status"] = command()
        except BaseException as error:  # handed to the main thread as it is
            outcome["error"] = error
        finally:
            # A Ray the command started ends here, in the thread that started it: measured on a
            # 2-CPU machine, ray.shutdown() from another thread took 15 s, from this one 1.4 s.
            if not ray_was_up and not received:
                shutdown_ray()

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)  # a second signal during the clean-up is only recorded
        _stopping.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    ray_worker_log = logging.getLogger("ray._private.worker")
    quiet = _NoSigtermWarning()
    ray_worker_log.addFilter(quiet)
    thread = threading.Thread(target=target, name="ray-sebs-command", daemon=True)
    try:
        thread.start()
        while thread.is_alive() and not received:
            thread.join(POLL_S)
            # Ray's core worker, created by ray.init in the command's thread, installs a C++
            # SIGTERM handler that prints a stack dump and aborts the process (status 134);
            # installing ours again takes the signal back.
            for signum in STOP_SIGNALS:
                signal.signal(signum, on_signal)
        if received:
            shutdown_ray()
            thread.join(CLEANUP_WAIT_S)
            if thread.is_alive():
                logger.warning("the interrupted command did not finish its clean-up within %g s; "
                               "ending it", CLEANUP_WAIT_S)
            release_held_locks()
            # A Ray call in the command's clean-up makes Ray start a new local instance when its
            # auto-init is on (the CLI turns it off); that one must not outlive the command.
            shutdown_ray()
            return Interruption(received[0])
    finally:
        _stopping.clear()
        ray_worker_log.removeFilter(quiet)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return int(outcome["status"])  # type: ignore[call-overload]


def ray_usable() -> bool:
    """Whether a clean-up may still call Ray: connected, and no stop signal came. After one, the
    main thread is shutting Ray down, and a call made while the connection is half closed can
    wait on it for a minute."""
    return ray_initialized() and not _stopping.is_set()


def ray_initialized() -> bool:
    """Whether this process is connected to Ray (without importing Ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def shutdown_ray() -> None:
    """``ray.shutdown()`` when this process is connected to Ray (not importing Ray otherwise)."""
    if ray_initialized():
        sys.modules["ray"].shutdown()
