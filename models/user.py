"""A recipient's addresses and preferences, set by the product's backend through PUT /users/{id}.

Users need no row to receive in-app notifications; a row adds channels, a language, and
what reaches them when.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Any

from sqlalchemy import String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    locale: Mapped[str | None] = mapped_column(String(35))
    timezone: Mapped[str | None] = mapped_column(String(64))
    # {"marketing": ["email", "webhook"]}: channels the user opted out of, per category.
    muted: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Local times in `timezone` (UTC when unset); a window may wrap past midnight.
    quiet_start: Mapped[time | None]
    quiet_end: Mapped[time | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=text("now()")
    )
