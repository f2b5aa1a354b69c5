"""The MLLP listener for the RIS's final reports (``PNEUMOSCREEN_HL7_LISTEN_PORT``; unset = off), on
python-hl7's asyncio MLLP server, in a thread of the service (``pneumoscreen run`` and ``listen``).

Each message is read (:mod:`worker.hl7.report`), kept and committed before its acknowledgement goes back;
when the database cannot take it, no ACK is sent and the connection is closed, so the RIS sends it again.
A connection silent for ``PNEUMOSCREEN_NETWORK_TIMEOUT`` seconds, or a block over
``PNEUMOSCREEN_HL7_MAX_MESSAGE_KB``, is closed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import dataclass

from hl7.mllp import InvalidBlockError, start_hl7_server
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.hl7.report import CodeMap, receive_report
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedConfig:
    host: str
    port: int
    codes: CodeMap
    allowed_senders: frozenset[str]
    application: str
    facility: str
    idle_timeout: float
    limit: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedConfig:
        return cls(settings.hl7_listen_host, settings.hl7_listen_port,
                   CodeMap.parse(settings.hl7_pneumonia_codes, settings.hl7_normal_codes),
                   frozenset(s.strip().upper() for s in settings.hl7_allowed_senders.split(",") if s.strip()),
                   settings.hl7_sending_application, settings.hl7_sending_facility, settings.network_timeout,
                   settings.hl7_max_message_kb * 1024)


class ReportListener:
    """The running listener: its event loop in a daemon thread; :meth:`stop` ends it."""

    def __init__(self, config: FeedConfig, sessions: sessionmaker[Session]) -> None:
        self.config, self.sessions = config, sessions
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pneumoscreen-hl7-reports", daemon=True)

    def start(self) -> ReportListener:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise self._error
        log.info("HL7 report listener (MLLP) on %s:%d", self.config.host, self.config.port)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(start_hl7_server(
                self._connected, self.config.host, self.config.port, limit=self.config.limit))
        except OSError as exc:
            self._error = OSError(f"cannot listen for HL7 reports on {self.config.host}:{self.config.port}: "
                                  f"{exc.strerror or exc}")
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _connected(self, reader, writer) -> None:
        config = self.config
        handle = functools.partial(receive_report, self.sessions, codes=config.codes,
                                   allowed_senders=config.allowed_senders, application=config.application,
                                   facility=config.facility)
        try:
            while True:
                block = await asyncio.wait_for(reader.readblock(), config.idle_timeout)
                answer = await self._loop.run_in_executor(None, handle, block)
                writer.writeblock(answer.ack.encode("ascii", errors="replace"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass  # the RIS closed the connection, or left it silent
        except (InvalidBlockError, ValueError) as exc:
            log.warning("closing an HL7 report connection: %s", exc)
        except SQLAlchemyError as exc:
            log.error("a report could not be stored (%s); not acknowledged, the RIS sends it again",
                      type(exc).__name__)
        finally:
            writer.close()

    def stop(self) -> None:
        if self._server is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def start_report_listener(settings: Settings, sessions: sessionmaker[Session]) -> ReportListener | None:
    """The report listener the settings ask for, started; None when ``PNEUMOSCREEN_HL7_LISTEN_PORT`` is unset."""
    if settings.hl7_listen_port is None:
        return None
    return ReportListener(FeedConfig.from_settings(settings), sessions).start()
