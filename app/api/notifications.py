"""POST /notifications (ingest) and GET /notifications/<id> (status and per-recipient state)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import func, select

from app import rendering, template_store
from app.auth import require_api_key
from app.db import get_session
from app.errors import ApiError
from app.ids import uuid7
from app.ingest import IdempotencyRequest, IngestUnavailable
from app.schemas import notification_batch_in, notification_in, recipients_of
from models import Delivery, DeliveryStatus, Notification, NotificationStatus, Priority
from models.base import utcnow

bp = Blueprint("notifications", __name__)

DELIVERIES_PAGE_MAX = 1000


def _json_body() -> Any:
    if not request.is_json:
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with 'Content-Type: application/json'.",
            {"Content-Type": [f"Expected application/json, got {request.mimetype or 'none'}."]},
        )
    raw = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, "invalid_json", "The body is not valid JSON.", {"body": [str(exc)]}
        ) from exc


def _idempotency(body: Any) -> IdempotencyRequest | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise ApiError(
            422,
            "validation_error",
            "Idempotency-Key must be 1 to 255 characters.",
            {"Idempotency-Key": ["Must be 1 to 255 characters."]},
        )
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return IdempotencyRequest(client=g.client, key=key, request_hash=digest)


def _check_backpressure() -> None:
    cfg = current_app.config["NOTIFIER"]
    try:
        waiting = current_app.extensions["stream.backlog"].current()
    except Exception:
        # Redis unreachable: PostgreSQL still records the notification and the outbox
        # sweeper streams it once Redis is back, so accepting loses nothing.
        current_app.logger.warning("backlog unknown (Redis unreachable); accepting")
        return
    if waiting >= cfg.STREAM_BACKLOG_LIMIT:
        raise ApiError(
            503,
            "backlog_full",
            f"{waiting} notifications are waiting to be processed; retry later.",
            headers={"Retry-After": str(cfg.RETRY_AFTER_SECONDS)},
        )


@bp.post("/notifications")
@require_api_key("send")
def create_notification() -> tuple[Response, int] | Response:
    body = _json_body()
    data = notification_in.load(body) if isinstance(body, dict) else _not_an_object(body)
    idem = _idempotency(body)
    _check_backpressure()
    row, answer = _prepare(data)
    return _submit([row], answer, idem)


@bp.post("/notifications/batch")
@require_api_key("send")
def create_notifications() -> tuple[Response, int] | Response:
    """Several notifications in one request, accepted all together or not at all.

    A sender with many distinct notifications at once (a digest run, an event that
    concerns many users differently) saves a request per notification, which is most of
    what ingest costs per notification.
    """
    body = _json_body()
    data = notification_batch_in.load(body) if isinstance(body, dict) else _not_an_object(body)
    idem = _idempotency(body)
    _check_backpressure()
    prepared: list[tuple[dict[str, Any], dict[str, Any]]] = []
    errors: dict[str, Any] = {}
    for i, item in enumerate(data["notifications"]):
        try:
            prepared.append(_prepare(item))
        except ApiError as exc:
            errors[str(i)] = exc.fields
    if errors:
        raise ApiError(
            422,
            "validation_error",
            f"Invalid notifications at positions {', '.join(errors)}; none was accepted.",
            {"notifications": errors},
        )
    answer = {"notifications": [a for _, a in prepared]}
    return _submit([row for row, _ in prepared], answer, idem)


def _prepare(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The row to record for a validated notification, and its part of the answer."""
    notification_id = uuid7()
    recipients = recipients_of(data)
    now = utcnow()
    if data.get("expires_at") and data["expires_at"] <= now:
        raise ApiError(
            422, "validation_error", "'expires_at' is already past.",
            {"expires_at": ["Must be in the future."]},
        )  # fmt: skip
    renditions = _render(data) if "template" in data else None
    scheduled = bool(data.get("send_at")) and data["send_at"] > now
    row = {
        "id": notification_id,
        "status": NotificationStatus.QUEUED,
        "recipients": recipients,
        "title": data.get("title") or _default_part(renditions, "title"),
        "body": data.get("body") or _default_part(renditions, "body"),
        "template": data.get("template"),
        "renditions": renditions,
        "params": data.get("params"),
        "data": data.get("data"),
        "priority": Priority(data["priority"]),
        "lang": data.get("lang"),
        "category": data.get("category"),
        "channels": list(dict.fromkeys(data["channels"])),
        "send_at": data.get("send_at"),
        # A send_at already past is streamed by ingest now; the scheduler must not stream
        # it again. Rows without one need no mark (see models/notification.py).
        "streamed_at": now if data.get("send_at") and not scheduled else None,
        "expires_at": data.get("expires_at"),
        "api_key_name": g.client,
        "webhook_url": data.get("webhook_url"),
        "fallback_after_seconds": data.get("fallback_after_seconds"),
    }
    answer = {
        "id": str(notification_id),
        "status": "scheduled" if scheduled else "queued",
        "recipients": len(recipients),
    }
    return row, answer


def _submit(
    rows: list[dict[str, Any]], answer: dict[str, Any], idem: IdempotencyRequest | None
) -> tuple[Response, int] | Response:
    try:
        outcome = current_app.extensions["ingest.writer"].submit_many(rows, answer, idem)
    except IngestUnavailable as exc:
        raise ApiError(
            503,
            "unavailable",
            "Nothing was recorded, so nothing was accepted. Retry later.",
            headers={"Retry-After": str(current_app.config["NOTIFIER"].RETRY_AFTER_SECONDS)},
        ) from exc
    if outcome.kind == "conflict":
        raise ApiError(
            422,
            "idempotency_conflict",
            "This Idempotency-Key was already used with a different body.",
            {"Idempotency-Key": [f"Already used for {_what(outcome.response)}."]},
        )
    response = jsonify(outcome.response)
    if outcome.kind == "replayed":
        response.headers["Idempotent-Replayed"] = "true"
    return response, 202


def _what(answer: dict[str, Any]) -> str:
    if "notifications" in answer:
        return f"a batch of {len(answer['notifications'])} notifications"
    return f"notification {answer.get('id')}"


def _render(data: dict[str, Any]) -> dict[str, Any]:
    """Every locale of the named template, rendered with the notification's params."""
    template = current_app.extensions["templates"].get(data["template"])
    if template is None:
        raise ApiError(
            422, "validation_error", f"No template {data['template']!r}.",
            {"template": ["Unknown template; create it with PUT /templates/{key}."]},
        )  # fmt: skip
    if g.get("template_render_timed_out"):
        # A batch of 500 notifications that each run to the deadline would hold this
        # process (and every socket it serves) for 500 deadlines.
        raise ApiError(
            422, "validation_error", "Not rendered: an earlier one in this request timed out.",
            {"template": ["Not rendered: an earlier notification in this request timed out."]},
        )  # fmt: skip
    seconds = current_app.config["NOTIFIER"].TEMPLATE_RENDER_SECONDS
    try:
        rendered = rendering.render_all(template.locales, data.get("params") or {}, seconds)
    except rendering.RenderError as exc:
        if exc.timed_out:
            g.template_render_timed_out = True
        raise ApiError(422, "validation_error", exc.message, {exc.field: [exc.message]}) from None
    return template_store.renditions(template, rendered)


def _default_part(renditions: dict[str, Any] | None, part: str) -> str | None:
    if renditions is None:
        return None
    return renditions["locales"][renditions["default"]].get(part)


def _not_an_object(body: Any) -> dict[str, Any]:
    raise ApiError(
        422,
        "validation_error",
        "The body must be a JSON object.",
        {"_schema": [f"Expected an object, got {type(body).__name__}."]},
    )


@bp.get("/notifications/<notification_id>")
@require_api_key("read")
def get_notification(notification_id: str) -> Response:
    """The notification, its status, and a page of its recipients' delivery states."""
    try:
        nid = uuid.UUID(notification_id)
    except ValueError:
        raise ApiError(
            404, "not_found", "No such notification.", {"id": ["Not a notification id."]}
        ) from None
    session = get_session()
    n = session.get(Notification, nid)
    if n is None:
        raise ApiError(404, "not_found", "No such notification.", {"id": ["Unknown id."]})

    offset = _int_arg("offset", 0, 0, len(n.recipients))
    limit = _int_arg("limit", 100, 1, DELIVERIES_PAGE_MAX)
    page = n.recipients[offset : offset + limit]
    states: dict[tuple[str, str], Delivery] = {}
    if page:
        rows = session.scalars(
            select(Delivery).where(Delivery.notification_id == nid, Delivery.user_id.in_(page))
        )
        states = {(d.user_id, d.channel): d for d in rows}
    counts = dict(
        session.execute(
            select(Delivery.status, func.count())
            .where(Delivery.notification_id == nid)
            .group_by(Delivery.status)
        ).all()
    )
    recorded = sum(counts.values())
    summary = {str(status): count for status, count in counts.items()}
    # Fallback deliveries (escalation) are recorded on top of the requested channels.
    summary["queued"] = max(0, len(n.recipients) * len(n.channels) - recorded)
    channels = list(dict.fromkeys([*n.channels, *sorted(c for _, c in states)]))

    deliveries = []
    for user_id in page:
        for channel in channels:
            d = states.get((user_id, channel))
            if d is None and channel not in n.channels:
                continue
            deliveries.append(
                {
                    "user_id": user_id,
                    "channel": channel,
                    "state": _state(n, d),
                    "lang": d.lang if d else None,
                    "deferred_until": _iso(d.deferred_until) if d else None,
                    "sent_at": _iso(d.sent_at) if d else None,
                    "acked_at": _iso(d.acked_at) if d else None,
                    "read_at": _iso(d.read_at) if d else None,
                    "last_error": d.last_error if d else None,
                }
            )
    next_offset = offset + limit if offset + limit < len(n.recipients) else None
    return jsonify(
        {
            "id": str(n.id),
            "status": _status(n, summary, recorded),
            "created_at": _iso(n.created_at),
            # Ingest streams every notification but those waiting for their send_at.
            "streamed": n.send_at is None or n.streamed_at is not None,
            "recipients": len(n.recipients),
            "title": n.title,
            "body": n.body,
            "template": n.template,
            "params": n.params,
            "data": n.data,
            "priority": str(n.priority),
            "lang": n.lang,
            "category": n.category,
            "channels": n.channels,
            "send_at": _iso(n.send_at),
            "expires_at": _iso(n.expires_at),
            "webhook_url": n.webhook_url,
            "fallback_after_seconds": n.fallback_after_seconds,
            "delivery_summary": summary,
            "deliveries": deliveries,
            "next_offset": next_offset,
        }
    )


def _status(n: Notification, summary: dict[str, int], recorded: int) -> str:
    """The stored status, or one derived from the deliveries once the consumer made them.

    The consumer does not write the notification row (that would contend with ingest's
    own writes to fresh rows), so progress is read from the deliveries.
    """
    now = utcnow()
    if n.status == NotificationStatus.QUEUED and n.send_at and n.send_at > now and not recorded:
        return "scheduled"
    unfinished = summary["queued"] > 0 or summary.get("pending", 0) > 0
    if n.expires_at and n.expires_at <= now and unfinished:
        return NotificationStatus.EXPIRED.value
    if n.status != NotificationStatus.QUEUED or recorded == 0:
        return str(n.status)
    if unfinished:
        return NotificationStatus.DELIVERING.value
    if summary.get("sent", 0) or summary.get("acked", 0):
        return NotificationStatus.DELIVERED.value
    # Nothing reached anyone: say why.
    for status in (NotificationStatus.FAILED.value, NotificationStatus.EXPIRED.value):
        if summary.get(status, 0):
            return status
    return "skipped"  # every copy muted, or no address to send to


def _state(n: Notification, d: Delivery | None) -> str:
    expired = n.expires_at is not None and n.expires_at <= utcnow()
    if d is None:
        return "expired" if expired else "queued"
    if d.status == DeliveryStatus.PENDING and expired:
        return DeliveryStatus.EXPIRED.value
    return str(d.status)


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        if not raw.isascii():
            raise ValueError(raw)  # int() reads '²' as nothing, but '٣' as 3
        value = int(raw)
    except ValueError:
        raise ApiError(
            422, "validation_error", f"'{name}' must be an integer.", {name: ["Not an integer."]}
        ) from None
    if not low <= value <= max(low, high):
        raise ApiError(
            422,
            "validation_error",
            f"'{name}' must be between {low} and {high}.",
            {name: [f"Must be between {low} and {high}."]},
        )
    return value


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
