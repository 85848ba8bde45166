"""SQLAlchemy models: one module per aggregate, all registered on `Base.metadata`."""

from models.api_key import ApiKey
from models.base import Base
from models.dead_letter import DeadLetter
from models.delivery import Delivery, DeliveryStatus
from models.idempotency import IdempotencyKey
from models.notification import Channel, Notification, NotificationStatus, Priority

__all__ = [
    "ApiKey",
    "Base",
    "Channel",
    "DeadLetter",
    "Delivery",
    "DeliveryStatus",
    "IdempotencyKey",
    "Notification",
    "NotificationStatus",
    "Priority",
]
