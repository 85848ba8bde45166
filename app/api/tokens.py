"""POST /auth/token: a trusted backend mints a user token for the gateway and inbox."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import Schema, fields

from app.auth import require_api_key
from app.errors import ApiError
from app.schemas import USER_ID, Text
from app.tokens import mint

bp = Blueprint("tokens", __name__)


class TokenIn(Schema):
    user_id = Text(required=True, validate=USER_ID)
    ttl_seconds = fields.Integer(load_default=3600, strict=True)


token_in = TokenIn()


@bp.post("/auth/token")
@require_api_key("admin")
def create_token() -> tuple[Response, int]:
    cfg = current_app.config["NOTIFIER"]
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_json", "Send a JSON object.", {"body": ["Expected an object."]}
        )
    data = token_in.load(body)
    ttl = data["ttl_seconds"]
    if not 1 <= ttl <= cfg.TOKEN_MAX_TTL_SECONDS:
        raise ApiError(
            422,
            "validation_error",
            "ttl_seconds is out of range.",
            {"ttl_seconds": [f"Must be between 1 and {cfg.TOKEN_MAX_TTL_SECONDS}."]},
        )
    token, exp = mint(cfg.JWT_SECRET, data["user_id"], ttl)
    return jsonify({"token": token, "user_id": data["user_id"], "expires_at": exp}), 201
