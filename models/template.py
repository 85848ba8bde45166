"""A notification template: per-locale variants of title, body and email parts (Jinja2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class Template(Base):
    __tablename__ = "templates"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    # {"en": {"title": ..., "body": ..., "email_subject": ..., "email_html": ...}, "pt-BR": ...}
    locales: Mapped[dict[str, Any]] = mapped_column(JSONB)
    default_locale: Mapped[str] = mapped_column(String(35))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=text("now()")
    )
