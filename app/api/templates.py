"""Notification templates: PUT/GET/DELETE /templates/{key}, GET /templates (x-api-key)."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import delete, literal_column, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app import rendering
from app.auth import require_api_key
from app.db import get_session
from app.errors import ApiError
from app.schemas import template_in
from models import Template
from models.base import utcnow

bp = Blueprint("templates", __name__)

KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
PAGE_MAX = 500


def _check_key(key: str) -> None:
    if not KEY.match(key):
        raise ApiError(
            422,
            "validation_error",
            "Invalid template key.",
            {"key": ["1 to 200 of letters, digits and _ . : - (starting with a letter or digit)."]},
        )


def _as_json(t: Any, full: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": t.key,
        "default_locale": t.default_locale,
        "locale_tags": sorted(t.locales),
        "created_at": t.created_at.isoformat(),
        "updated_at": t.updated_at.isoformat(),
    }
    if full:
        out["locales"] = t.locales
    return out


def _not_found(key: str) -> ApiError:
    return ApiError(404, "not_found", "No such template.", {"key": [f"No template {key!r}."]})


@bp.put("/templates/<key>")
@require_api_key("admin")
def put_template(key: str) -> tuple[Response, int]:
    _check_key(key)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_json", "Send a JSON object.", {"body": ["Expected an object."]}
        )
    data = template_in.load(body)
    try:
        # What breaks a limit with no parameters breaks it for every notification.
        rendering.check_limits(
            data["locales"], current_app.config["NOTIFIER"].TEMPLATE_RENDER_SECONDS
        )
    except rendering.RenderError as exc:
        raise ApiError(
            422, "validation_error", f"{exc.field}: {exc.message}", {exc.field: [exc.message]}
        ) from None
    now = utcnow()
    session = get_session()
    row = session.execute(
        pg_insert(Template)
        .values(key=key, created_at=now, updated_at=now, **data)
        .on_conflict_do_update(index_elements=[Template.key], set_={**data, "updated_at": now})
        .returning(*Template.__table__.c, literal_column("(xmax = 0)").label("created"))
    ).one()
    session.commit()
    current_app.extensions["templates"].forget(key)
    return jsonify(_as_json(row)), 201 if row.created else 200


@bp.get("/templates")
@require_api_key("admin")
def list_templates() -> Response:
    """By key; page on with ?after=<next_after>."""
    raw = request.args.get("limit", "100")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= PAGE_MAX:
        raise ApiError(
            422, "validation_error", f"'limit' must be 1 to {PAGE_MAX}.",
            {"limit": [f"Must be an integer from 1 to {PAGE_MAX}."]},
        )  # fmt: skip
    limit = int(raw)
    query = select(Template).order_by(Template.key).limit(limit)
    after = request.args.get("after")
    if after:
        query = query.where(Template.key > after)
    rows = get_session().scalars(query).all()
    items = [_as_json(t, full=False) for t in rows]
    return jsonify(
        {"templates": items, "next_after": items[-1]["key"] if len(items) == limit else None}
    )


@bp.get("/templates/<key>")
@require_api_key("admin")
def get_template(key: str) -> Response:
    t = get_session().get(Template, key)
    if t is None:
        raise _not_found(key)
    return jsonify(_as_json(t))


@bp.delete("/templates/<key>")
@require_api_key("admin")
def delete_template(key: str) -> Response:
    """Notifications already accepted keep their rendering; new ones naming it get a 422."""
    session = get_session()
    gone = session.execute(delete(Template).where(Template.key == key)).rowcount
    session.commit()
    current_app.extensions["templates"].forget(key)
    if not gone:
        raise _not_found(key)
    return Response(status=204)
