"""API keys for backend services. Only a SHA-256 of the key is stored."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # First characters of the key, so an operator can tell keys apart in `keys list`.
    prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=text("now()"))
    revoked_at: Mapped[datetime | None]
    # Signs the webhooks of this key's notifications (X-Signature); receivers hold a copy,
    # so it is kept as is, unlike the key.
    signing_secret: Mapped[str | None] = mapped_column(String(64))
    # What the key may do: send (notifications), read (status, inboxes, users), admin
    # (templates, preferences, dead letters, tokens). Keys made before scopes have all three.
    scopes: Mapped[list[str]] = mapped_column(
        ARRAY(String(20)), server_default=text("'{send,read,admin}'")
    )
