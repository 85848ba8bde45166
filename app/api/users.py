"""Users' addresses and preferences: PUT /users/{user_id} (x-api-key), GET /users/{user_id}."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import literal_column
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app.auth import require_api_key, require_user_or_api_key
from app.db import get_session
from app.errors import ApiError
from app.schemas import USER_ID, user_in
from models import User
from models.base import utcnow

bp = Blueprint("users", __name__)


def _as_json(u: Any) -> dict[str, Any]:
    quiet = None
    if u.quiet_start is not None and u.quiet_end is not None:
        quiet = {"start": u.quiet_start.isoformat(), "end": u.quiet_end.isoformat()}
    return {
        "user_id": u.id,
        "email": u.email,
        "webhook_url": u.webhook_url,
        "locale": u.locale,
        "timezone": u.timezone,
        "muted": u.muted or {},
        "quiet_hours": quiet,
        "created_at": u.created_at.isoformat(),
        "updated_at": u.updated_at.isoformat(),
    }


def _check_id(user_id: str) -> None:
    try:
        USER_ID(user_id)
    except Exception as exc:
        raise ApiError(
            422, "validation_error", "Invalid user id.", {"user_id": ["1 to 255 characters."]}
        ) from exc


@bp.put("/users/<user_id>")
@require_api_key("admin")
def put_user(user_id: str) -> tuple[Response, int]:
    _check_id(user_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_json", "Send a JSON object.", {"body": ["Expected an object."]}
        )
    data = user_in.load(body)
    if "quiet_hours" in data:
        quiet = data.pop("quiet_hours")
        data["quiet_start"] = quiet["start"] if quiet else None
        data["quiet_end"] = quiet["end"] if quiet else None
    if "muted" in data and data["muted"] is not None:
        # Kept as given, minus empty lists and repeated channels.
        data["muted"] = {c: sorted(set(chs)) for c, chs in data["muted"].items() if chs} or None
    now = utcnow()
    session = get_session()
    # An upsert: two concurrent PUTs of a new user cannot collide on the key.
    row = session.execute(
        pg_insert(User)
        .values(id=user_id, created_at=now, updated_at=now, **data)
        .on_conflict_do_update(index_elements=[User.id], set_={**data, "updated_at": now})
        .returning(*User.__table__.c, literal_column("(xmax = 0)").label("created"))
    ).one()
    session.commit()
    return jsonify(_as_json(row)), 201 if row.created else 200


@bp.get("/users/<user_id>")
@require_user_or_api_key
def get_user(user_id: str) -> Response:
    user = get_session().get(User, user_id)
    if user is None:
        raise ApiError(404, "not_found", "No such user.", {"user_id": ["Unknown user."]})
    return jsonify(_as_json(user))
