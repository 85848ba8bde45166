"""Work that could not be done after every allowed try, kept for an operator to inspect."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class DeadLetter(Base):
    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=text("now()"), index=True
    )
    # "stream" for an entry the consumer could not process; a channel name for a delivery.
    source: Mapped[str] = mapped_column(String(20))
    # Indexed: the reconciler leaves a notification whose stream entry was dead-lettered.
    notification_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    delivery_id: Mapped[int | None] = mapped_column(BigInteger)
    user_id: Mapped[str | None] = mapped_column(String(255))
    stream_entry_id: Mapped[str | None] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    # The tries behind it: [{attempt, started_at, finished_at, outcome, error}, ...].
    history: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    redriven_at: Mapped[datetime | None]
