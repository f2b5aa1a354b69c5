"""More than one listener process on the one DICOM port.

A Python listener receives on one core at a time. With
``PNEUMOSCREEN_LISTENER_PROCESSES=N`` (N > 1), ``pneumoscreen listen`` binds
the port with SO_REUSEPORT and starts N - 1 receivers (``pneumoscreen listen
--receiver``) bound the same way; the kernel spreads new associations across
the N processes. Each stores and records what it receives exactly as the
first one does; the study dispatcher and the reconciler run in the first
only. A receiver that dies is started again, and receivers die with the
process that started them (on Linux, even when it is killed with SIGKILL).

Only the process holding the data directory's listener lock starts receivers,
so a second ``listen`` on the same data directory stops with a clear message
instead of joining the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ListenerLockedError(RuntimeError):
    """Another listener runs on this data directory."""


def hold_listener_lock(data_dir: Path) -> IO[str]:
    """Lock ``<data_dir>/listener.lock`` for this process; closing the returned file (or exiting) releases it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "listener.lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ListenerLockedError(f"another pneumoscreen listener is running on {data_dir} ({path} is locked)") \
            from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Receivers:
    """The extra listener processes: started, restarted when they die, stopped."""

    def __init__(self, count: int, argv: list[str], *, restart_delay: float = 1.0) -> None:
        self.count = count
        self.argv = argv
        self.restart_delay = restart_delay
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._last_start = [0.0] * count

    @classmethod
    def for_listen(cls, count: int, *, data_dir: Path, host: str, port: int, ae_title: str) -> "Receivers":
        argv = [sys.executable, "-m", "worker.cli", "listen", "--receiver", "--data-dir", str(data_dir),
                "--host", host, "--port", str(port), "--ae-title", ae_title]
        return cls(count, argv)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _start(self, index: int) -> None:
        self._last_start[index] = time.monotonic()
        self._procs[index] = subprocess.Popen(self.argv, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
        log.info("receiver %d started (pid %d)", index + 1, self._procs[index].pid)

    def start(self) -> None:
        for index in range(self.count):
            self._start(index)

    def check(self) -> bool:
        """Start again any receiver that has exited (at most once per ``restart_delay``); True if one was."""
        restarted = False
        for index, proc in enumerate(self._procs):
            if proc is None or proc.poll() is None:
                continue
            if time.monotonic() - self._last_start[index] < self.restart_delay:
                continue
            log.error("receiver %d (pid %d) exited with status %s; starting it again", index + 1, proc.pid,
                      proc.returncode)
            self._start(index)
            restarted = True
        return restarted

    def stop(self, timeout: float = 30.0) -> None:
        running = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_until_orphaned_or_stopped(stopping, parent_pid: int) -> None:
    """A receiver's main loop: until SIGTERM (``stopping`` set) or its parent is gone."""
    while not stopping.wait(0.5):
        if os.getppid() != parent_pid:
            log.error("the listener that started this receiver is gone; stopping")
            return
