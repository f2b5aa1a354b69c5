"""The audit messages on their way to the repository: a bounded folder on disk and one thread that
sends them in order, retrying with backoff while the repository is away.

- Each process takes a slot of its own, ``<data dir>/audit/<n>/`` (held by a lock; the slot of a
  process that died is taken over, with what it left, by the next one to start).
- A message is a file (written aside, renamed in); it is removed once the repository has taken it.
- At ``max_messages`` the newest are dropped: counted (``pneumoscreen_audit_messages_dropped_total``,
  and in the slot's ``dropped`` file, which the API's metrics read) and, once the repository takes
  messages again, reported by an audit message of their own (``report_drops``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

DROPPED = Counter("pneumoscreen_audit_messages_dropped", "audit messages dropped because the spool was full")
_SUFFIX = ".msg"


def _claim_slot(root: Path) -> tuple[Path, IO[str]]:
    root.mkdir(parents=True, exist_ok=True)
    for index in itertools.count():
        folder = root / str(index)
        folder.mkdir(exist_ok=True)
        handle = open(folder / "lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return folder, handle
    raise AssertionError("unreachable")


def _read_counts(folder: Path) -> tuple[int, int]:
    """(dropped in all, dropped and not yet reported) from the slot's ``dropped`` file."""
    try:
        total, unreported = (folder / "dropped").read_text().split()
        return int(total), int(unreported)
    except (OSError, ValueError):
        return 0, 0


class AuditSpool:
    """``put`` a syslog message; a thread hands them to ``send`` oldest first.

    ``send(message)`` raises ``OSError`` when the repository did not take it (tried again later) or
    ``ValueError`` when it never will (dropped and counted). ``report_drops(n)`` builds the message
    that says ``n`` messages were dropped.
    """

    def __init__(self, root: Path, *, max_messages: int, send: Callable[[bytes], None],
                 report_drops: Callable[[int], bytes], min_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        self.folder, self._lock_file = _claim_slot(root)
        self.max_messages = max_messages
        self._send, self._report_drops = send, report_drops
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._lock = threading.Condition()
        self._count = len(list(self.folder.glob(f"*{_SUFFIX}")))
        self._dropped_total, self._unreported = _read_counts(self.folder)
        self._sequence = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-sender", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._count

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped_total

    def put(self, message: bytes) -> bool:
        """Keep ``message`` until the repository takes it; False when the spool is full (dropped, counted)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the audit spool is closed")
            if self._count >= self.max_messages:
                self._drop(1)
                return False
            name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):08d}"
            self._count += 1
        tmp = self.folder / f"{name}.tmp"
        try:
            tmp.write_bytes(message)
            os.replace(tmp, self.folder / f"{name}{_SUFFIX}")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("an audit message could not be kept on disk: %s", exc)
            with self._lock:
                self._count -= 1
                self._drop(1)
            return False
        with self._lock:
            self._lock.notify_all()
        return True

    def _drop(self, n: int) -> None:
        """Under the lock."""
        self._dropped_total += n
        self._unreported += n
        DROPPED.inc(n)
        with contextlib.suppress(OSError):
            (self.folder / "dropped").write_text(f"{self._dropped_total} {self._unreported}\n")
        if self._unreported == n:
            log.error("the audit spool is full (%d messages): audit messages are being dropped", self.max_messages)

    def flush(self, timeout: float) -> bool:
        """Wait until every message has been sent (True) or ``timeout`` seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._count or self._unreported:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def close(self, timeout: float = 2.0) -> None:
        """Send what can be sent within ``timeout`` seconds; the rest stays on disk for the next start."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=self.max_backoff + 5)
        self._lock_file.close()

    def _oldest(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{_SUFFIX}"))

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._lock:
                if backoff:
                    self._lock.wait(backoff)
                while not self._closed and not self._count and not self._unreported:
                    self._lock.wait(1.0)
                if self._closed:
                    return
            backoff = self._send_all(backoff)

    def _send_all(self, backoff: float) -> float:
        """Send every message on disk, then the report of any dropped; the backoff to wait before the next try."""
        for path in self._oldest():
            try:
                self._send(path.read_bytes())
            except ValueError as exc:  # never sendable: dropped, counted
                log.error("an audit message is dropped: %s", exc)
                self._remove(path, dropped=True)
                continue
            except OSError as exc:
                return self._failed(exc, backoff)
            self._remove(path)
        with self._lock:
            unreported = self._unreported
        if unreported:
            try:
                self._send(self._report_drops(unreported))
            except OSError as exc:
                return self._failed(exc, backoff)
            with self._lock:
                self._unreported -= unreported
                with contextlib.suppress(OSError):
                    (self.folder / "dropped").write_text(f"{self._dropped_total} {self._unreported}\n")
                self._lock.notify_all()
            log.warning("reported %d dropped audit message(s) to the repository", unreported)
        if backoff:
            log.info("the audit repository takes messages again")
        return 0.0

    def _failed(self, exc: OSError, backoff: float) -> float:
        if not backoff:
            log.warning("the audit repository does not take messages (%s); %d kept on disk, retrying", exc,
                        self.pending)
        return min(self.max_backoff, max(self.min_backoff, backoff * 2))

    def _remove(self, path: Path, *, dropped: bool = False) -> None:
        path.unlink(missing_ok=True)
        with self._lock:
            self._count -= 1
            if dropped:
                self._drop(1)
            self._lock.notify_all()


class AuditSpoolCollector:
    """Prometheus metrics of every process's audit spool under ``root`` (for the API's /metrics)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def collect(self):
        dropped = CounterMetricFamily("pneumoscreen_audit_messages_dropped",
                                      "audit messages dropped because the spool was full (every process)")
        pending = GaugeMetricFamily("pneumoscreen_audit_messages_pending",
                                    "audit messages on disk, not yet taken by the repository (every process)")
        folders = [f for f in self.root.iterdir() if f.is_dir()] if self.root.is_dir() else []
        dropped.add_metric([], sum(_read_counts(f)[0] for f in folders))
        pending.add_metric([], sum(len(list(f.glob(f"*{_SUFFIX}"))) for f in folders))
        yield dropped
        yield pending
