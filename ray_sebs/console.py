"""What a person sees while a run trains: one line per epoch, a live progress line, nothing else.

Ray's own INFO output (Ray Data's execution plans and progress, the Train controller's worker-group
messages, every worker's "Checkpoint successfully created" and "Reporting training result") is
written to Ray's log files; a driver started with :func:`ray_init_options` (``verbose=False``) does
not copy it to the console. What the run itself says reaches the driver through a small queue
actor instead: rank 0 of the worker group sends each finished epoch's record, a throttled progress
message within an epoch, and its warnings; :class:`RunConsole` in the driver prints them once.
``--verbose`` restores Ray's output as well.

The progress line is tqdm's: a live bar on a terminal; where the output is a file or a job's log
(no terminal), a plain line at most every :data:`PLAIN_PROGRESS_INTERVAL_S` seconds within long
epochs, so a log stays short.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ray_sebs.interrupt import ray_usable
from ray_sebs.report import format_epoch

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
"""Rank 0 sends at most one progress message per this many seconds: one small actor call."""

PLAIN_PROGRESS_INTERVAL_S = 30.0
"""Without a terminal, a progress line within an epoch at most this often."""

_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def ray_init_options(verbose: bool) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` that keep Ray's INFO output in its log files.

    ``log_to_driver=False`` stops every actor's and worker's output from being copied to this
    process (it stays in ``/tmp/ray/session_latest/logs``); the run's own lines arrive through
    :class:`RunConsole`.
    """
    if verbose:
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def quiet_ray_driver(verbose: bool) -> None:
    """Keep this process's Ray Data plans and progress bars out of the console (``verbose``
    keeps them). Call before any dataset is created: a dataset copies the current context."""
    if verbose:
        return
    import ray.data
    from ray.util.debug import log_once

    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data warns once per process that its progress bars are off; this is where they are
    # turned off on purpose, so its "once" is spent here.
    log_once("ray_data_progress_manager_disabled")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


class ProgressSender:
    """The worker side: rank 0 sends its epoch records, progress and warnings to the driver.

    Every send is a non-blocking actor call (``put_nowait``); a full or vanished queue drops the
    message rather than slow or fail training.
    """

    def __init__(self, queue: Any, *, rank: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.queue = queue if rank == 0 else None
        self.interval_s = interval_s
        self._last_progress = time.monotonic()

    def _send(self, message: dict[str, Any]) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(message)
        except Exception:  # the console is a nicety: never let it stop training
            logger.debug("progress message dropped", exc_info=True)

    def epoch(self, record: Mapping[str, Any]) -> None:
        self._send({"kind": "epoch", "record": dict(record)})

    def warning(self, text: str) -> None:
        self._send({"kind": "warning", "text": text})

    def due(self) -> bool:
        """Whether a progress message is due: rank 0, at most one per ``interval_s``. Cheap enough
        to ask after every update."""
        if self.queue is None:
            return False
        now = time.monotonic()
        if now - self._last_progress < self.interval_s:
            return False
        self._last_progress = now
        return True

    def send_progress(self, *, epoch: int, updates_done: int, updates_total: int, samples_done: int,
                      elapsed_s: float) -> None:
        """Within an epoch, after :meth:`due`; the epoch's end is sent by :meth:`epoch`."""
        self._send({"kind": "progress", "epoch": epoch, "updates_done": updates_done,
                    "updates_total": updates_total, "samples_done": samples_done,
                    "elapsed_s": elapsed_s})


class RunConsole:
    """The driver side: prints each epoch line once and a live progress line within epochs.

    Use as a context manager around ``fit()``; :attr:`queue` goes to the workers (in the loop's
    config). ``on_epoch`` callbacks see every epoch record as it arrives.
    """

    def __init__(self, *, print_lines: bool = True, stream: TextIO | None = None,
                 on_epoch: tuple[Callable[[Mapping[str, Any]], None], ...] = ()) -> None:
        self.print_lines = print_lines
        self.stream = stream or sys.stdout
        self.on_epoch = on_epoch
        self.queue: Any = None
        """The Ray queue actor the workers send to; made on entering (it needs a running Ray)."""
        self._interactive = self.stream.isatty()
        self._bar: Any = None
        self._last_plain = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="ray-sebs-console", daemon=True)

    def __enter__(self) -> RunConsole:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not ray_usable():
            # Ray is shut down under the run (Ctrl-C, SIGTERM): the queue goes with it, and a
            # call on it could wait a minute on the half-closed connection.
            self._close_bar()
            return
        self._handle_all()
        self._close_bar()
        try:
            self.queue.shutdown()
        except Exception:
            logger.debug("console queue already gone", exc_info=True)

    def _drain(self) -> None:
        import ray.util.queue

        while not self._stop.is_set():
            try:
                message = self.queue.get(timeout=0.5)
            except ray.util.queue.Empty:
                continue
            except Exception:  # Ray shutting down under us
                return
            try:
                self.handle(message)
            except Exception as error:  # one bad line must not stop the lines after it
                logger.warning("console: could not show a message (%s)", error)

    def _handle_all(self) -> None:
        try:
            while not self.queue.empty():
                self.handle(self.queue.get_nowait())
        except Exception:
            logger.debug("console queue drained with an error", exc_info=True)

    def handle(self, message: Mapping[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "epoch":
            for callback in self.on_epoch:
                callback(message["record"])
            if self.print_lines:
                self._close_bar()
                self._write(format_epoch(message["record"]))
        elif not self.print_lines:
            return
        elif kind == "warning":
            self._close_bar()
            self._write(f"warning: {message['text']}")
        elif kind == "progress":
            self._progress(message)

    def _progress(self, message: Mapping[str, Any]) -> None:
        from tqdm import tqdm

        done, total = message["updates_done"], message["updates_total"]
        elapsed = message["elapsed_s"]
        rate = message["samples_done"] / elapsed if elapsed > 0 else None
        description = f"epoch {message['epoch']}"
        if self._interactive:
            if self._bar is None or self._bar.desc != description:
                self._close_bar()
                self._bar = tqdm(total=total, desc=description, unit="update", file=self.stream,
                                 leave=False, dynamic_ncols=True)
            self._bar.n = done
            if rate is not None:
                self._bar.set_postfix_str(f"{rate:,.0f} samples/s", refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if elapsed < PLAIN_PROGRESS_INTERVAL_S or now - self._last_plain < PLAIN_PROGRESS_INTERVAL_S:
            return
        self._last_plain = now
        meter = tqdm.format_meter(done, total, elapsed, prefix=description, unit="update",
                                  postfix=f"{rate:,.0f} samples/s" if rate is not None else None,
                                  ncols=0)
        self._write(meter)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
