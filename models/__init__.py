"""SQLAlchemy models: one module per aggregate, all registered on `Base.metadata`."""

from models.api_key import ApiKey
from models.base import Base
from models.dead_letter import DeadLetter
from models.delivery import Delivery, DeliveryStatus
from models.delivery_attempt import AttemptOutcome, DeliveryAttempt
from models.idempotency import IdempotencyKey
from models.notification import Channel, Notification, NotificationStatus, Priority
from models.reconciler_mark import ReconcilerMark
from models.template import Template
from models.user import User

__all__ = [
    "ApiKey",
    "AttemptOutcome",
    "Base",
    "Channel",
    "DeadLetter",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryStatus",
    "IdempotencyKey",
    "Notification",
    "NotificationStatus",
    "Priority",
    "ReconcilerMark",
    "Template",
    "User",
]
