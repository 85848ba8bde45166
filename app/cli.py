"""Operator commands: `flask --app wsgi keys create|list|revoke`, `db upgrade`,
`dlq list|show|redrive`."""

from __future__ import annotations

import json
import secrets
from datetime import UTC

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import select

from app import db, dead_letters
from app.auth import SCOPES, generate_key, hash_key
from models import ApiKey, DeadLetter
from models.base import utcnow

keys = AppGroup("keys", help="Create, list and revoke API keys.")
database = AppGroup("db", help="Create the database and apply migrations.")
dlq = AppGroup("dlq", help="Inspect and redrive dead letters.")


@keys.command("create")
@click.argument("name")
@click.option(
    "--scopes",
    default=",".join(SCOPES),
    show_default=True,
    help="Comma-separated: send (notifications), read (status, inboxes, users), admin.",
)
def create_key(name: str, scopes: str) -> None:
    """Create an API key called NAME and print it (it is shown only once)."""
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SCOPES))
    if unknown or not wanted:
        raise click.BadParameter(
            f"unknown scopes {unknown}; choose from {', '.join(SCOPES)}", param_hint="--scopes"
        )
    key = generate_key()
    with current_app.extensions["db.sessionmaker"]() as session:
        if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
            raise click.ClickException(f"an API key named {name!r} already exists")
        signing_secret = secrets.token_hex(32)
        session.add(
            ApiKey(
                name=name,
                key_hash=hash_key(key),
                prefix=key[:10],
                signing_secret=signing_secret,
                scopes=list(dict.fromkeys(wanted)),
            )
        )
        session.commit()
    click.echo(key)
    # On stderr, so scripts that capture the key from stdout keep working.
    click.echo(f"webhook signing secret: {signing_secret}", err=True)


@keys.command("list")
def list_keys() -> None:
    """List API keys: name, prefix, scopes, created, revoked."""
    with current_app.extensions["db.sessionmaker"]() as session:
        for k in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            revoked = k.revoked_at.isoformat() if k.revoked_at else "-"
            click.echo(
                f"{k.name}\t{k.prefix}…\t{','.join(k.scopes)}\tcreated "
                f"{k.created_at.isoformat()}\trevoked {revoked}"
            )


@keys.command("revoke")
@click.argument("name")
def revoke_key(name: str) -> None:
    """Revoke the API key called NAME."""
    with current_app.extensions["db.sessionmaker"]() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.name == name))
        if key is None:
            raise click.ClickException(f"no API key named {name!r}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            session.commit()
    click.echo(f"revoked {name}")


@database.command("upgrade")
def upgrade() -> None:
    """Create the database if it is missing and apply all migrations."""
    db.upgrade(current_app.config["NOTIFIER"].DATABASE_URL)
    click.echo("database is up to date")


def _dlq_filter(f):
    f = click.option("--channel", help="stream, websocket, webhook or email")(f)
    f = click.option("--user", "user_id", help="Only this user's")(f)
    f = click.option("--since", type=click.DateTime(), help="Created at or after (UTC)")(f)
    return click.option("--until", type=click.DateTime(), help="Created before (UTC)")(f)


def _criteria(**options: object) -> dict[str, object]:
    out = {k: v for k, v in options.items() if v is not None}
    for name in ("since", "until"):
        if name in out:
            out[name] = out[name].replace(tzinfo=UTC)  # type: ignore[union-attr]
    return out


@dlq.command("list")
@_dlq_filter
@click.option("--limit", default=50, show_default=True)
def dlq_list(limit: int, **options: object) -> None:
    """List dead letters, newest first."""
    with current_app.extensions["db.sessionmaker"]() as session:
        q = dead_letters.filtered(_criteria(**options)).order_by(DeadLetter.id.desc()).limit(limit)
        for d in session.execute(q).scalars():
            redriven = d.redriven_at.isoformat() if d.redriven_at else "-"
            click.echo(
                f"{d.id}\t{d.created_at.isoformat()}\t{d.source}\t{d.user_id or '-'}\t"
                f"tries {d.attempts}\tredriven {redriven}\t{d.error[:80]}"
            )


@dlq.command("show")
@click.argument("letter_id", type=int)
def dlq_show(letter_id: int) -> None:
    """Print one dead letter with its payload and tries, as JSON."""
    with current_app.extensions["db.sessionmaker"]() as session:
        d = session.get(DeadLetter, letter_id)
        if d is None:
            raise click.ClickException(f"no dead letter {letter_id}")
        click.echo(json.dumps(dead_letters.as_json(d, full=True), indent=2))


@dlq.command("redrive")
@click.argument("letter_ids", type=int, nargs=-1)
@_dlq_filter
@click.option("--limit", default=1000, show_default=True, help="Most redriven by a filter")
def dlq_redrive(letter_ids: tuple[int, ...], limit: int, **options: object) -> None:
    """Redrive the given dead letters, or every one matching the filter options."""
    criteria = _criteria(**options)
    if not letter_ids and not criteria:
        raise click.UsageError("give dead letter ids or at least one filter option")
    ids = list(letter_ids)
    if not ids:
        with current_app.extensions["db.sessionmaker"]() as session:
            ids = dead_letters.matching_ids(session, criteria, limit)
    cfg = current_app.config["NOTIFIER"]
    results = dead_letters.redrive(
        current_app.extensions["db.engine"], current_app.extensions["redis"], cfg.STREAM_KEY, ids
    )
    for r in results:
        click.echo(f"{r.id}\t{'redriven' if r.redriven else 'skipped: ' + str(r.reason)}")


def init_app(app: Flask) -> None:
    app.cli.add_command(keys)
    app.cli.add_command(database)
    app.cli.add_command(dlq)
