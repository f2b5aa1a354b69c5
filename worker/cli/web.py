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

    from worker import audit
    from worker.api.app import create_app
    from worker.api.serving import serves_tls, server_config

    app = create_app(settings)
    if not is_loopback(settings.api_host) and not serves_tls(settings):
        log.warning("the API serves plain HTTP on %s: the token crosses the network in the clear unless a "
                    "TLS-terminating proxy stands in front (or set PNEUMOSCREEN_API_TLS_CERT and _KEY)",
                    settings.api_host)
    audit.start(settings, "api")
    config = server_config(settings, app)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise click.ClickException(f"could not serve on {settings.api_host}:{settings.api_port} (see the log above)")
    audit.stop()
