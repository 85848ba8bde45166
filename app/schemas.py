"""marshmallow schemas for request bodies; instances at module top are reused by every request."""

from __future__ import annotations

import re
from datetime import UTC
from typing import Any

import orjson
from flask import current_app
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from models import Channel, Priority

# A BCP 47 tag, loosely: language, then subtags of 1-8 alphanumerics ("en", "pt-BR", "zh-Hant-TW").
BCP47 = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")


def _no_nul(value: Any) -> None:
    # PostgreSQL text and JSONB reject NUL; catching it here keeps one bad request
    # from failing the ingest batch it would have been committed with.
    if b"\\u0000" in orjson.dumps(value):
        raise ValidationError("Must not contain NUL characters.")


class Text(fields.String):
    """A string that PostgreSQL can store."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        result = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in result:
            raise ValidationError("Must not contain NUL characters.")
        return result


def _data_size(value: dict[str, Any]) -> None:
    limit = current_app.config["NOTIFIER"].MAX_DATA_BYTES
    size = len(orjson.dumps(value))
    if size > limit:
        raise ValidationError(f"Must be at most {limit} bytes when JSON-encoded (got {size}).")
    _no_nul(value)


class UserIdList(fields.List):
    """1..MAX_RECIPIENTS user ids, checked against the configured bound."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        limit = current_app.config["NOTIFIER"].MAX_RECIPIENTS
        if isinstance(value, list) and len(value) > limit:
            raise ValidationError(f"At most {limit} recipients (got {len(value)}).")
        return super()._deserialize(value, attr, data, **kwargs)


USER_ID = validate.Length(min=1, max=255)
WEBHOOK_URL = validate.URL(schemes={"http", "https"}, require_tld=False)


class NotificationIn(Schema):
    user_id = Text(validate=USER_ID)
    user_ids = UserIdList(Text(validate=USER_ID), validate=validate.Length(min=1))
    title = Text(validate=validate.Length(max=1000))
    body = Text(validate=validate.Length(max=20_000))
    template = Text(validate=validate.Length(min=1, max=200))
    params = fields.Dict(keys=fields.String(), validate=_no_nul)
    data = fields.Dict(keys=fields.String(), validate=_data_size)
    priority = fields.String(
        load_default=Priority.NORMAL.value, validate=validate.OneOf([p.value for p in Priority])
    )
    lang = fields.String(
        validate=validate.Regexp(BCP47, error="Must be a BCP 47 language tag such as 'pt-BR'.")
    )
    category = Text(validate=validate.Length(min=1, max=100))
    channels = fields.List(
        fields.String(validate=validate.OneOf([c.value for c in Channel])),
        load_default=lambda: [Channel.WEBSOCKET.value],
        validate=validate.Length(min=1),
    )
    send_at = fields.AwareDateTime(default_timezone=UTC)
    expires_at = fields.AwareDateTime(default_timezone=UTC)
    webhook_url = Text(validate=[validate.Length(max=2000), WEBHOOK_URL])
    fallback_after_seconds = fields.Integer(
        strict=True, validate=validate.Range(min=1, max=30 * 24 * 3600)
    )

    @validates_schema
    def _recipients_and_content(self, data: dict[str, Any], **_kwargs: Any) -> None:
        errors: dict[str, list[str]] = {}
        if ("user_id" in data) == ("user_ids" in data):
            errors["user_ids"] = ["Give exactly one of 'user_id' or 'user_ids'."]
        if "template" in data:
            if "title" in data or "body" in data:
                errors["template"] = ["Give either 'template' or 'title' and 'body', not both."]
        else:
            for name in ("title", "body"):
                if name not in data:
                    errors[name] = ["Missing data for required field (or give 'template')."]
        if "params" in data and "template" not in data:
            errors["params"] = ["'params' needs a 'template'."]
        if "fallback_after_seconds" in data and Channel.WEBSOCKET.value not in data["channels"]:
            errors["fallback_after_seconds"] = ["Needs the 'websocket' channel to fall back from."]
        send_at, expires_at = data.get("send_at"), data.get("expires_at")
        if send_at and expires_at and expires_at <= send_at:
            errors["expires_at"] = ["Must be later than 'send_at'."]
        if errors:
            raise ValidationError(errors)


notification_in = NotificationIn()


def recipients_of(data: dict[str, Any]) -> list[str]:
    """The recipients named in a validated body, duplicates dropped, first-seen order kept."""
    if "user_id" in data:
        return [data["user_id"]]
    return list(dict.fromkeys(data["user_ids"]))


class UserIn(Schema):
    """PUT /users/{id}: the fields given are set, null clears one, the others are kept."""

    email = fields.Email(allow_none=True, validate=validate.Length(max=320))
    webhook_url = Text(allow_none=True, validate=[validate.Length(max=2000), WEBHOOK_URL])


user_in = UserIn()


class DeadLetterFilter(Schema):
    channel = fields.String(validate=validate.OneOf(["stream", *[c.value for c in Channel]]))
    user_id = Text(validate=USER_ID)
    since = fields.AwareDateTime(default_timezone=UTC)
    until = fields.AwareDateTime(default_timezone=UTC)
    include_redriven = fields.Boolean(load_default=True)


class DeadLetterQuery(DeadLetterFilter):
    before = fields.Integer(validate=validate.Range(min=1))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))


class DeadLetterRedrive(DeadLetterFilter):
    limit = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=10_000))


dead_letter_filter = DeadLetterFilter()
dead_letter_query = DeadLetterQuery()
dead_letter_redrive = DeadLetterRedrive()
