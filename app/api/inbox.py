"""A user's inbox over HTTP: the offline queue, history, unread count, acks and read marks.

Auth: x-api-key, or the user's own token (`Authorization: Bearer`); a token never opens
another user's inbox.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request

from app import inbox, presence
from app.auth import require_user_or_api_key
from app.db import engine
from app.errors import ApiError

bp = Blueprint("inbox", __name__)

PAGE_MAX = 500
IDS_MAX = 1000


def _limit(default: int = 100) -> int:
    raw = request.args.get("limit", str(default))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= PAGE_MAX:
        raise ApiError(
            422,
            "validation_error",
            f"'limit' must be 1 to {PAGE_MAX}.",
            {"limit": [f"Must be an integer from 1 to {PAGE_MAX}."]},
        )
    return int(raw)


def _cursor(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(
            422,
            "validation_error",
            f"'{name}' must be a seq number.",
            {name: ["Must be a non-negative integer."]},
        )
    return int(raw)


def _ids_body(allow_all: bool = False) -> list[uuid.UUID] | None:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_json", "Send a JSON object.", {"body": ["Expected an object."]}
        )
    if allow_all and body.get("all") is True and "ids" not in body:
        return None
    raw = body.get("ids")
    if not isinstance(raw, list) or not 1 <= len(raw) <= IDS_MAX:
        hint = ' or {"all": true}' if allow_all else ""
        raise ApiError(
            422,
            "validation_error",
            f"Send 'ids': 1 to {IDS_MAX} notification ids{hint}.",
            {"ids": [f"Must be a list of 1 to {IDS_MAX} notification ids."]},
        )
    try:
        return [uuid.UUID(x) for x in raw]
    except (ValueError, TypeError, AttributeError):
        raise ApiError(
            422,
            "validation_error",
            "Every id must be a notification id.",
            {"ids": ["Every item must be a notification id (UUID)."]},
        ) from None


def _page(rows: list[Any]) -> list[dict[str, Any]]:
    items = []
    for row in rows:
        item = inbox.message(row)
        del item["type"]
        item["read"] = row.read_at is not None
        item["acked"] = str(row.status) == "acked"
        items.append(item)
    return items


@bp.get("/notifications/offline/<user_id>")
@require_user_or_api_key
def offline(user_id: str) -> Response:
    """Un-acked notifications, oldest first; page on with ?after=<seq of the last one>."""
    limit = _limit()
    with engine().connect() as conn:
        rows = inbox.unacked(conn, user_id, after_seq=_cursor("after") or 0, limit=limit)
    items = _page(rows)
    return jsonify(
        {
            "user_id": user_id,
            "notifications": items,
            "next_after": items[-1]["seq"] if len(items) == limit else None,
        }
    )


@bp.post("/notifications/offline/<user_id>/ack")
@require_user_or_api_key
def ack(user_id: str) -> Response:
    ids = _ids_body()
    with engine().begin() as conn:
        changed = inbox.ack(conn, user_id, ids or [])
    return jsonify({"acked": changed})


@bp.get("/users/<user_id>/notifications")
@require_user_or_api_key
def history(user_id: str) -> Response:
    """Newest first; page on with ?cursor=<next_cursor>; ?unread_only=true for unread."""
    limit = _limit()
    unread_only = request.args.get("unread_only", "false").lower() in {"1", "true", "yes"}
    with engine().connect() as conn:
        rows = inbox.history(conn, user_id, _cursor("cursor"), limit, unread_only)
    items = _page(rows)
    return jsonify(
        {
            "user_id": user_id,
            "notifications": items,
            "next_cursor": items[-1]["seq"] if len(items) == limit else None,
        }
    )


@bp.get("/users/<user_id>/unread-count")
@require_user_or_api_key
def unread(user_id: str) -> Response:
    with engine().connect() as conn:
        return jsonify({"user_id": user_id, "unread": inbox.unread_count(conn, user_id)})


@bp.post("/users/<user_id>/notifications/read")
@require_user_or_api_key
def read(user_id: str) -> Response:
    ids = _ids_body(allow_all=True)
    with engine().begin() as conn:
        changed = inbox.mark_read(conn, user_id, ids)
    if changed:
        try:
            presence.publish_event(
                current_app.extensions["redis"],
                user_id,
                {"type": "read", "ids": changed},
                current_app.config["NOTIFIER"].PRESENCE_TTL_SECONDS,
            )
        except redis.RedisError:
            current_app.logger.warning("could not push read marks for %s", user_id)
    return jsonify({"read": changed})
