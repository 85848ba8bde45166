"""How far the reconciler has checked: kept in PostgreSQL, which outlives Redis."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class ReconcilerMark(Base):
    __tablename__ = "reconciler_marks"

    # One row per pass of the reconciler; `value` is that pass's position (an id or a time).
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=text("now()"))
