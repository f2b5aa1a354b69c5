"""`pneumoscreen api`: the HTTP API (worklist, studies, instances, healthz, metrics)."""

from __future__ import annotations

import click

from worker.cli.context import cli, load_settings, log, require_current_schema
from worker.settings import is_loopback

NO_TOKEN = "set PNEUMOSCREEN_API_TOKEN to a secret of at least 16 characters, e.g. `openssl rand -hex 32`"


@cli.command()
@click.option("--host", help="address to serve on [PNEUMOSCREEN_API_HOST, 127.0.0.1]")
@click.option("--port", type=int, help="HTTP port [PNEUMOSCREEN_API_PORT, 8080]")
def api(host: str | None, port: int | None) -> None:
    """The HTTP API; every endpoint but /healthz needs `Authorization: Bearer $PNEUMOSCREEN_API_TOKEN`."""
    settings = load_settings(api_host=host, api_port=port)
    if settings.api_token is None:
        raise click.ClickException(NO_TOKEN)
    require_current_schema(settings)
    import uvicorn

    from worker.api.app import MAX_CONNECTIONS, MAX_HEADER_BYTES, create_app

    app = create_app(settings)
    if not is_loopback(settings.api_host):
        log.warning("the API serves plain HTTP on %s: the token crosses the network in the clear unless a "
                    "TLS-terminating proxy stands in front", settings.api_host)
    # logging stays as the CLI set it up; no access log (the audit log records every query)
    config = uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None,
                            access_log=False, server_header=False, lifespan="off",
                            limit_concurrency=MAX_CONNECTIONS, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            timeout_keep_alive=5, http="h11")
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise click.ClickException(f"could not serve on {settings.api_host}:{settings.api_port} (see the log above)")
