"""MLLP (HL7's Minimal Lower Layer Protocol) exchanges over python-hl7's asyncio streams: one message out,
its acknowledgement back, within a timeout."""

from __future__ import annotations

import asyncio

from hl7.mllp import InvalidBlockError, open_hl7_connection


class NoAnswer(OSError):
    """The peer could not be reached, closed the connection, or did not answer in time."""


async def _exchange(host: str, port: int, payload: bytes, timeout: float, limit: int) -> bytes:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, limit=limit), timeout)
    try:
        writer.writeblock(payload)
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readblock(), timeout)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError):
            pass


def exchange(host: str, port: int, payload: bytes, *, timeout: float, limit: int = 1 << 20) -> bytes:
    """Send ``payload`` in one MLLP block to ``host:port`` and return the block answered, or raise
    :class:`NoAnswer` saying what went wrong (refused, closed, no answer within ``timeout`` seconds)."""
    try:
        return asyncio.run(_exchange(host, port, payload, timeout, limit))
    except asyncio.TimeoutError:
        raise NoAnswer(f"no acknowledgement from {host}:{port} within {timeout:g} s") from None
    except asyncio.IncompleteReadError:
        raise NoAnswer(f"{host}:{port} closed the connection without an acknowledgement") from None
    except (ValueError, InvalidBlockError) as exc:  # an over-long block, or one without the start byte
        raise NoAnswer(f"{host}:{port} answered something that is not an MLLP block: {exc}") from None
    except OSError as exc:
        raise NoAnswer(f"no connection to {host}:{port}: {exc.strerror or exc}") from None
