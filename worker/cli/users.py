"""`pneumoscreen users`: named accounts (radiologist, operator, admin) for the API and the pages.

Run on the server, by whoever may reach its database: that is the admin's place. Each change is
written to the audit log (actor ``cli:<os user>``), never with a token or a password.
"""

from __future__ import annotations

import getpass
import json
import sys

import click

from worker.cli.context import cli, load_settings, require_current_schema, sessions


def _audit(session, action: str, params: dict) -> None:
    from db.audit import record_audit

    record_audit(session, actor=f"cli:{getpass.getuser()}", client=None, action=action, params=params, status=200,
                 result_count=None)


def _run(change, action: str, params: dict):
    """``change(session)`` and its audit row in one transaction; an account error is a clear message."""
    from db.accounts import AccountError

    settings = load_settings()
    require_current_schema(settings)
    try:
        with sessions().begin() as session:
            result = change(session)
            _audit(session, action, params)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None
    return result


@cli.group()
def users() -> None:
    """Named accounts: each person signs in with their own token or password."""


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["radiologist", "operator", "admin"]),
              help="radiologist: reads and records verdicts; operator: reads, runs the service; admin: everything")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout: name, role, token")
def add(name: str, role: str, as_json: bool) -> None:
    """Create an account and print its personal API token (shown this once; stored only hashed)."""
    from db.accounts import add_account

    token = _run(lambda s: add_account(s, name=name, role=role)[1], "users add", {"name": name, "role": role})
    if as_json:
        click.echo(json.dumps({"name": name, "role": role, "token": token}))
        return
    click.echo(f"account {name} ({role}) created. Its API token, shown only now:\n{token}")
    click.echo(f"Set a password for the web pages with: pneumoscreen users password {name}", err=True)


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def list_(as_json: bool) -> None:
    """Every account: name, role, whether it has a password, when created or disabled."""
    from db.accounts import list_accounts

    rows = _run(list_accounts, "users list", {})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = f"disabled {row['disabled_at']}" if row["disabled_at"] else "enabled"
        click.echo(f"{row['name']}\t{row['role']}\t{state}\t{'password set' if row['has_password'] else 'no password'}")


@users.command("disable")
@click.argument("name")
def disable(name: str) -> None:
    """Disable an account: its token, password and web sessions stop working at once."""
    from db.accounts import disable_account

    _run(lambda s: disable_account(s, name=name), "users disable", {"name": name})
    click.echo(f"account {name} disabled")


@users.command("token")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout: name, token")
def token(name: str, as_json: bool) -> None:
    """Issue a new personal API token for NAME; the old one stops working."""
    from db.accounts import new_token

    value = _run(lambda s: new_token(s, name=name), "users token", {"name": name})
    click.echo(json.dumps({"name": name, "token": value}) if as_json else value)


@users.command("password")
@click.argument("name")
def password(name: str) -> None:
    """Set NAME's password for the web sign-in: asked for at a terminal, else read from the first line of stdin."""
    from db.accounts import set_password

    if sys.stdin.isatty():
        value = click.prompt("password", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.readline().rstrip("\r\n")
    _run(lambda s: set_password(s, name=name, password=value), "users password", {"name": name})
    click.echo(f"password of {name} set; the account's web sessions signed in with the old one end")
