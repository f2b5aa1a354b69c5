"""What every command shares, below the commands: the click group, logging, the settings
(validated once, installed process-wide), the session factory and the schema check."""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime

import click
from pydantic import ValidationError

from worker.settings import Settings

log = logging.getLogger("pneumoscreen")


class WithheldValues(logging.Filter):
    """pydicom's own warnings quote the offending value (``Invalid value for VR AS: '51'``), which may be a
    patient's name, ID or birth date: the quoted text is withheld, the rest of the message kept (Python
    warnings go through logging too, so that the same warning printed by ``warnings`` is withheld as well)."""

    _QUOTED = re.compile(r"(['\"]).*?\1")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in ("pydicom", "py.warnings") or record.name.startswith("pydicom."):
            record.msg, record.args = self._QUOTED.sub("<value withheld>", record.getMessage()), None
        return True


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    for noisy in ("pynetdicom", "absl", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dicom_io.wire import PynetdicomNoise

    quiet, withheld = PynetdicomNoise(), WithheldValues()
    for handler in logging.getLogger().handlers:  # a filter on the handler sees pynetdicom's child loggers too
        handler.addFilter(quiet)
        handler.addFilter(withheld)


def load_settings(**overrides) -> Settings:
    """Settings from the environment, flags on top; a bad value stops here with a clear message."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
        raise click.UsageError("invalid settings:\n" + "\n".join(lines)) from None
    from worker import runtime

    runtime.configure(settings)
    return settings


def sessions():
    from worker import runtime

    return runtime.sessions()


def require_current_schema(settings: Settings) -> None:
    from db.migrate import is_current

    if not is_current(settings.effective_database_url):
        raise click.ClickException(
            "the database schema is not at the current version: run `pneumoscreen db upgrade` first"
        )


DATE = click.DateTime(["%Y-%m-%d"])


def day_bounds(since: datetime | None, until: datetime | None,
               timezone: str) -> tuple[datetime | None, datetime | None]:
    """``--since``/``--until`` days (in ``timezone``) -> the database's UTC bounds."""
    from db.results import received_window

    try:
        return received_window(since and since.date(), until and until.date(), timezone)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--until") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, envvar="PNEUMOSCREEN_LOG_LEVEL")
@click.version_option(package_name="pneumoscreen")
def cli(log_level: str) -> None:
    """pneumoscreen: DICOM/PACS-integrated pneumonia screening for chest X-rays."""
    setup_logging(log_level)
