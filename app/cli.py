"""Operator commands: `flask --app wsgi keys create|list|revoke`, `flask --app wsgi db upgrade`."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import select

from app import db
from app.auth import generate_key, hash_key
from models import ApiKey
from models.base import utcnow

keys = AppGroup("keys", help="Create, list and revoke API keys.")
database = AppGroup("db", help="Create the database and apply migrations.")


@keys.command("create")
@click.argument("name")
def create_key(name: str) -> None:
    """Create an API key called NAME and print it (it is shown only once)."""
    key = generate_key()
    with current_app.extensions["db.sessionmaker"]() as session:
        if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
            raise click.ClickException(f"an API key named {name!r} already exists")
        session.add(ApiKey(name=name, key_hash=hash_key(key), prefix=key[:10]))
        session.commit()
    click.echo(key)


@keys.command("list")
def list_keys() -> None:
    """List API keys: name, prefix, created, revoked."""
    with current_app.extensions["db.sessionmaker"]() as session:
        for k in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            revoked = k.revoked_at.isoformat() if k.revoked_at else "-"
            click.echo(
                f"{k.name}\t{k.prefix}…\tcreated {k.created_at.isoformat()}\trevoked {revoked}"
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


def init_app(app: Flask) -> None:
    app.cli.add_command(keys)
    app.cli.add_command(database)
