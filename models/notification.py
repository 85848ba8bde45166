"""A notification as accepted by the API: one row, recipients kept as an array.

Per-recipient state lives in `deliveries`, written in bulk by the stream consumer;
keeping recipients on the notification row is what lets ingest take 10,000 of them
in one insert.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Index, String, Text, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow, value_enum


class Priority(enum.StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class Channel(enum.StrEnum):
    WEBSOCKET = "websocket"
    WEBHOOK = "webhook"
    EMAIL = "email"


class NotificationStatus(enum.StrEnum):
    QUEUED = "queued"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=text("now()"))
    status: Mapped[NotificationStatus] = mapped_column(
        value_enum(NotificationStatus, "notification_status"), default=NotificationStatus.QUEUED
    )
    recipients: Mapped[list[str]] = mapped_column(ARRAY(Text))
    title: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    template: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # A templated notification rendered at ingest in each of the template's locales:
    # {"pt-BR": {"title", "body", "email_subject", "email_html"}}; each delivery picks one.
    renditions: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    priority: Mapped[Priority] = mapped_column(
        value_enum(Priority, "notification_priority"), default=Priority.NORMAL
    )
    lang: Mapped[str | None] = mapped_column(String(35))
    category: Mapped[str | None] = mapped_column(String(100))
    channels: Mapped[list[str]] = mapped_column(ARRAY(String(20)))
    send_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    # When the scheduler (a due `send_at`) or the reconciler (a lost stream entry) last
    # streamed the row; NULL when only ingest did, or while it waits for its send_at.
    streamed_at: Mapped[datetime | None]
    api_key_name: Mapped[str | None] = mapped_column(String(100))
    # Overrides the recipients' own webhook_url for this notification.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    fallback_after_seconds: Mapped[int | None]

    __table_args__ = (
        # What the scheduler reads: notifications waiting for their send_at.
        Index(
            "ix_notifications_scheduled",
            "send_at",
            postgresql_where=text("streamed_at IS NULL AND send_at IS NOT NULL"),
        ),
        # What the reconciler reads besides the id range of new notifications: the few
        # streamed again later, by their time.
        Index(
            "ix_notifications_restreamed",
            "streamed_at",
            postgresql_where=text("streamed_at IS NOT NULL"),
        ),
    )
