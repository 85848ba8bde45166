"""One recipient's copy of a notification on one channel.

The delivery id doubles as the `seq` a client sees: it increases with every delivery, so
it increases per user too, and clients can order by it and resume after it.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow, value_enum


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    ACKED = "acked"
    FAILED = "failed"
    SKIPPED = "skipped"
    EXPIRED = "expired"


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    notification_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE")
    )
    user_id: Mapped[str] = mapped_column(String(255))
    channel: Mapped[str] = mapped_column(String(20))
    status: Mapped[DeliveryStatus] = mapped_column(
        value_enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=text("now()"))
    sent_at: Mapped[datetime | None]
    acked_at: Mapped[datetime | None]
    read_at: Mapped[datetime | None]
    # Redriving from dead letters starts a new series of tries numbered on from here.
    series_start: Mapped[int] = mapped_column(default=1, server_default=text("1"))
    last_error: Mapped[str | None] = mapped_column(Text)
    # In-app copies of notifications with a fallback: when to escalate if still un-acked.
    escalate_at: Mapped[datetime | None]
    # The locale of the rendition this recipient gets (templated notifications).
    lang: Mapped[str | None] = mapped_column(String(35))
    # An email or webhook held back by the user's quiet hours until then.
    deferred_until: Mapped[datetime | None]

    __table_args__ = (
        # A replayed stream entry must not create a second copy.
        UniqueConstraint("notification_id", "user_id", "channel"),
        # The inbox and the offline queue read one user's deliveries in id (= seq) order.
        Index("ix_deliveries_user_inbox", "user_id", "channel", "id"),
        Index(
            "ix_deliveries_user_unacked",
            "user_id",
            "id",
            postgresql_where=text("acked_at IS NULL AND channel = 'websocket'"),
        ),
        # Webhook and email deliveries still in flight: the reconciler checks each has a try
        # on its way.
        Index(
            "ix_deliveries_external_inflight",
            "id",
            postgresql_where=text("status = 'pending' AND channel <> 'websocket'"),
        ),
        Index(
            "ix_deliveries_escalate_at",
            "escalate_at",
            postgresql_where=text("escalate_at IS NOT NULL"),
        ),
        # Room on each page for the updates that follow every insert (pending -> sent),
        # which then stay HOT: no index entries are written for them.
        {"postgresql_with": {"fillfactor": 70}},
    )
