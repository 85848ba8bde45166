"""One try of one delivery through an external channel (webhook, email)."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow, value_enum


class AttemptOutcome(enum.StrEnum):
    SUCCESS = "success"
    RETRY = "retry"  # failed, another try is scheduled
    FAILED = "failed"  # failed for good: permanent error or the last allowed try
    LOST = "lost"  # its worker died mid-try; the next try number takes over


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("deliveries.id", ondelete="CASCADE")
    )
    channel: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[AttemptOutcome | None] = mapped_column(
        value_enum(AttemptOutcome, "attempt_outcome")
    )
    error: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None]

    # A task replayed by the broker or the sweeper finds its try already taken.
    __table_args__ = (UniqueConstraint("delivery_id", "channel", "attempt"),)
