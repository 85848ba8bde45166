"""One JSON shape for every error: {"error": code, "message": ..., "fields": {...}}."""

from __future__ import annotations

import logging
import unicodedata
from typing import Any

from flask import Flask, Response, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as it is."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers or {}


def error_response(
    status: int,
    code: str,
    message: str,
    fields: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = jsonify({"error": code, "message": message, "fields": fields or {}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def has_control_character(text: str) -> bool:
    """NUL and the other C0/C1 controls: PostgreSQL refuses NUL in text, and none of them
    belongs in an id, a key or a query value."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


class AsciiIntConverter(IntegerConverter):
    """`<int:...>` for ASCII digits only: `\\d` also matches digits like '²', which int()
    cannot read."""

    regex = r"[0-9]+"


def _refuse_unusable_input() -> None:
    """Path and query values PostgreSQL cannot store or an id cannot be: a 4xx, never a 500."""
    if has_control_character(request.path):
        raise ApiError(
            400, "bad_request", "The path contains a control character.",
            {"path": ["Must not contain control characters (NUL included)."]},
        )  # fmt: skip
    for name, value in request.args.items(multi=True):
        if has_control_character(name) or has_control_character(value):
            raise ApiError(
                400, "bad_request", f"The query parameter {name!r} contains a control character.",
                {name: ["Must not contain control characters (NUL included)."]},
            )  # fmt: skip
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and not value.strip():
            raise ApiError(422, "validation_error", f"'{name}' is blank.",
                           {name: ["Must not be blank."]})  # fmt: skip


def init_app(app: Flask) -> None:
    app.url_map.converters["int"] = AsciiIntConverter
    app.before_request(_refuse_unusable_input)

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return error_response(err.status, err.code, err.message, err.fields, err.headers)

    @app.errorhandler(ValidationError)
    def _validation_error(err: ValidationError) -> Response:
        fields = err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}
        return error_response(422, "validation_error", "The request body is invalid.", fields)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        fields = {"body": [err.description]} if status == 413 else None
        response = error_response(
            status, _HTTP_CODES.get(status, "http_error"), err.description or err.name, fields
        )
        if status == 405 and err.get_response().headers.get("Allow"):
            response.headers["Allow"] = err.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "An unexpected error occurred.")
