"""``pneumoscreen``: the one command line entry point.

``context`` holds the click group and what every command shares; each other module adds its
commands to that group: ``service`` (run, listen, worker, beat, db), ``web`` (api),
``worklist`` (worklist, instances), ``archive`` (ingest, rescreen), ``training`` (train,
evaluate, predict, calibrate), ``users`` (accounts), ``drift``. Importing this package registers them all.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from worker.cli import archive, drift, service, training, users, web, worklist  # noqa: E402,F401  (register the commands)
from worker.cli.context import cli  # noqa: E402

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="pneumoscreen")
