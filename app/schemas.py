"""marshmallow schemas for request bodies; instances at module top are reused by every request."""

from __future__ import annotations

from datetime import UTC, time
from typing import Any

import orjson
from flask import current_app
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app import locales, outbound, preferences, rendering
from models import Channel, Priority


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


# Deeper JSON is refused at validation: the encoder stops at 255 levels, past which a
# body would pass validation and fail at the writer.
MAX_JSON_DEPTH = 32


def _depth(value: Any) -> int:
    """How deeply `value` nests objects and arrays (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            todo.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, level + 1) for v in item)
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > MAX_JSON_DEPTH:
            break
    return deepest


def _shallow(value: Any) -> None:
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValidationError(f"Must not nest objects and arrays more than {MAX_JSON_DEPTH} deep.")


def _data_size(value: dict[str, Any]) -> None:
    _shallow(value)
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
        if isinstance(value, list) and _all_user_ids(value):
            # Every id already passes the item field: marshmallow's per-item deserialisation
            # costs 34 ms for a 10,000-recipient fan-out, this check about 1 ms.
            return value.copy()
        # Something is wrong: the item field finds it and names it by position.
        return super()._deserialize(value, attr, data, **kwargs)


def _all_user_ids(values: list[Any]) -> bool:
    """True when every value is a str that USER_ID and Text would accept unchanged."""
    shortest, longest = USER_ID_LENGTH.min, USER_ID_LENGTH.max
    return all(
        type(v) is str
        and shortest <= len(v) <= longest
        and "\x00" not in v  # type: ignore[operator]
        and not v.isspace()
        for v in values
    )


class LocaleTag(fields.String):
    """A locale tag Babel knows, normalised to BCP 47 form ("pt_br" -> "pt-BR")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        raw = super()._deserialize(value, attr, data, **kwargs)
        try:
            return locales.normalize(raw)
        except locales.InvalidLocale:
            raise ValidationError(
                f"Unknown locale {raw!r}; give a tag such as 'en', 'de' or 'pt-BR'."
            ) from None


USER_ID_LENGTH = validate.Length(min=1, max=255)


def USER_ID(value: str) -> None:
    """1 to 255 characters, not all white space."""
    USER_ID_LENGTH(value)
    if not value.strip():
        raise ValidationError("Must not be blank.")


_URL = validate.URL(schemes={"http", "https"}, require_tld=False)


def WEBHOOK_URL(value: str) -> None:
    """An http(s) URL whose host resolves only to addresses the platform may send to."""
    _URL(value)
    try:
        outbound.check_url(value, current_app.config["NOTIFIER"].webhook_networks)
    except outbound.RefusedAddress as exc:
        raise ValidationError(f"Not allowed: the URL {exc}.") from None


class NotificationIn(Schema):
    user_id = Text(validate=USER_ID)
    user_ids = UserIdList(Text(validate=USER_ID), validate=validate.Length(min=1))
    title = Text(validate=validate.Length(max=1000))
    body = Text(validate=validate.Length(max=20_000))
    template = Text(validate=validate.Length(min=1, max=200))
    params = fields.Dict(keys=fields.String(), validate=[_shallow, _no_nul])
    data = fields.Dict(keys=fields.String(), validate=_data_size)
    priority = fields.String(
        load_default=Priority.NORMAL.value, validate=validate.OneOf([p.value for p in Priority])
    )
    lang = LocaleTag()
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

# Most notifications in one POST /notifications/batch: all of them are written in one
# ingest transaction, whatever INGEST_BATCH_MAX says.
BATCH_MAX = 500


class NotificationBatchIn(Schema):
    notifications = fields.List(
        fields.Nested(NotificationIn),
        required=True,
        validate=validate.Length(min=1, max=BATCH_MAX),
    )


notification_batch_in = NotificationBatchIn()


def recipients_of(data: dict[str, Any]) -> list[str]:
    """The recipients named in a validated body, duplicates dropped, first-seen order kept."""
    if "user_id" in data:
        return [data["user_id"]]
    return list(dict.fromkeys(data["user_ids"]))


def _timezone(value: str) -> None:
    if not preferences.valid_timezone(value):
        raise ValidationError(
            f"Unknown time zone {value!r}; give an IANA name such as 'Europe/Berlin'."
        )


def _muted(value: dict[str, list[str]]) -> None:
    known = {c.value for c in Channel}
    for category, channels in value.items():
        unknown = sorted(set(channels) - known)
        if unknown:
            raise ValidationError(
                f"Category {category!r}: unknown channels {unknown}; known: {sorted(known)}."
            )


class QuietHours(Schema):
    """Local times in the user's time zone; the window may wrap past midnight."""

    start = fields.Time(required=True)
    end = fields.Time(required=True)

    @validates_schema
    def _not_empty(self, data: dict[str, time], **_kwargs: Any) -> None:
        if data["start"] == data["end"]:
            raise ValidationError({"end": ["Must differ from 'start'."]})


class UserIn(Schema):
    """PUT /users/{id}: the fields given are set, null clears one, the others are kept."""

    email = fields.Email(allow_none=True, validate=validate.Length(max=320))
    webhook_url = Text(allow_none=True, validate=[validate.Length(max=2000), WEBHOOK_URL])
    locale = LocaleTag(allow_none=True)
    timezone = fields.String(allow_none=True, validate=[validate.Length(max=64), _timezone])
    muted = fields.Dict(
        keys=Text(validate=validate.Length(min=1, max=100)),
        values=fields.List(fields.String()),
        allow_none=True,
        validate=_muted,
    )
    quiet_hours = fields.Nested(QuietHours, allow_none=True)


user_in = UserIn()


class TemplateIn(Schema):
    """PUT /templates/{key}: every locale variant, and the one used when none fits."""

    locales = fields.Dict(
        keys=LocaleTag(),
        values=fields.Dict(
            keys=fields.String(), values=Text(validate=validate.Length(max=100_000))
        ),
        required=True,
        validate=validate.Length(min=1, max=200),
    )
    default_locale = LocaleTag(required=True)

    @validates_schema
    def _variants(self, data: dict[str, Any], **_kwargs: Any) -> None:
        errors: dict[str, Any] = {}
        for tag, parts in data.get("locales", {}).items():
            for part in sorted(set(parts) - set(rendering.PARTS)):
                errors[f"locales.{tag}.{part}"] = [f"Unknown part; known: {list(rendering.PARTS)}."]
            for part in ("title", "body"):
                if not parts.get(part):
                    errors[f"locales.{tag}.{part}"] = ["Missing data for required field."]
            for part, source in parts.items():
                problem = rendering.check_source(part, source) if part in rendering.PARTS else None
                if problem:
                    errors[f"locales.{tag}.{part}"] = [problem]
        if "default_locale" in data and data["default_locale"] not in data.get("locales", {}):
            errors["default_locale"] = ["Must be one of the template's locales."]
        if errors:
            raise ValidationError(errors)


template_in = TemplateIn()


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
