"""An MLLP RIS peer in its own process, on python-hl7's asyncio MLLP server and client.

``serve``: receives HL7 messages, writes each one (as received, with the acknowledgement it answers) as a
JSON line to a log file, then answers, in turn, the codes of ``--answers`` (the last one repeats),
holding the first ``--hold-count`` answers for ``--hold`` seconds (time to kill the sender).

``send``: sends the messages in the given files (one each, segments ended by CR) to an MLLP listener as a
RIS sends its final reports, and prints the acknowledgements it got back as a JSON list (``null`` when
the connection was closed without one).

Used as ``python -m tests.helpers.ris serve|send ...``; :class:`RisPeer` starts ``serve`` for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hl7
from hl7.mllp import open_hl7_connection, start_hl7_server

from tests.helpers.processes import free_port, wait_for_port

REFUSAL = "RIS busy: order locked by another user, try again"


class _Serve:
    def __init__(self, log: Path, answers: list[str], hold: float, hold_count: int) -> None:
        self.log, self.answers, self.hold, self.hold_count = log, answers, hold, hold_count
        self.received = 0

    def _record(self, text: str, answer: str) -> None:
        with open(self.log, "a", encoding="utf-8") as out:
            out.write(json.dumps({"at": time.time(), "answered": answer, "message": text}) + "\n")
            out.flush()
            os.fsync(out.fileno())

    async def connected(self, reader, writer) -> None:
        try:
            while not reader.at_eof():
                block = await reader.readblock()
                text = block.decode("utf-8")
                number, self.received = self.received, self.received + 1
                answer = self.answers[min(number, len(self.answers) - 1)]
                self._record(text, answer)
                if number < self.hold_count:
                    await asyncio.sleep(self.hold)
                ack = hl7.parse(text).create_ack(answer, message_id=f"ACK{number}", application="RIS")
                if answer != "AA":
                    ack.segment("MSA").assign_field(ack.escape(REFUSAL), 3)
                writer.writeblock(str(ack).encode("utf-8"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _serve(args) -> None:
    serve = _Serve(Path(args.log), args.answers.split(","), args.hold, args.hold_count)
    server = await start_hl7_server(serve.connected, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


async def _send(args) -> list[str | None]:
    acks: list[str | None] = []
    for path in args.files:
        reader, writer = await open_hl7_connection("127.0.0.1", args.port)
        try:
            writer.writeblock(Path(path).read_bytes())
            await writer.drain()
            acks.append((await asyncio.wait_for(reader.readblock(), args.timeout)).decode("utf-8"))
        except (asyncio.IncompleteReadError, ConnectionError):
            acks.append(None)
        finally:
            writer.close()
    return acks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ris")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--log", required=True)
    serve.add_argument("--answers", default="AA")
    serve.add_argument("--hold", type=float, default=0.0)
    serve.add_argument("--hold-count", type=int, default=0)
    send = commands.add_parser("send")
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args))
    else:
        print(json.dumps(asyncio.run(_send(args))))


class RisPeer:
    """``serve`` in its own process on a free port, for one test; :meth:`messages` reads what it received."""

    def __init__(self, workdir: Path, *, answers: str = "AA", hold: float = 0.0, hold_count: int = 0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.log_path = free_port(), workdir / "ris-received.jsonl"
        self._out = open(workdir / "ris.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.ris", "serve", "--port", str(self.port), "--log",
             str(self.log_path), "--answers", answers, "--hold", str(hold), "--hold-count", str(hold_count)],
            stdout=self._out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, timeout=30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def messages(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text(encoding="utf-8").splitlines() if line]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()


def send_reports(port: int, *files: Path, timeout: float = 30.0) -> list[str | None]:
    """``send`` in its own process: the acknowledgements of each message, in order."""
    result = subprocess.run([sys.executable, "-m", "tests.helpers.ris", "send", "--port", str(port),
                             "--timeout", str(timeout), *map(str, files)],
                            capture_output=True, text=True, timeout=timeout * len(files) + 30, check=True)
    return json.loads(result.stdout)


if __name__ == "__main__":
    main()
