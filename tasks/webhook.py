"""The webhook channel: POST the notification as JSON, signed, to the user's URL.

Receivers verify `X-Signature: sha256=<hex>`, an HMAC-SHA256 of the raw body with the
signing secret of the API key that sent the notification, and dedupe on `Idempotency-Key`
(the same for every try of one delivery).
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import time
from typing import Any

import orjson
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import ENV_CLIENT
from app.config import Config
from models import ApiKey
from tasks.outcome import Outcome

RETRYABLE_STATUS = {408, 429}
USER_AGENT = "notifier-webhook/1"
_session = requests.Session()


def env_signing_secret(cfg: Config) -> str:
    """The secret for notifications sent with API_KEY: set explicitly, or derived from it."""
    if cfg.WEBHOOK_SIGNING_SECRET:
        return cfg.WEBHOOK_SIGNING_SECRET
    return hmac.new(cfg.API_KEY.encode(), b"notifier webhook signing", hashlib.sha256).hexdigest()


def signing_secret(db: Session, cfg: Config, api_key_name: str | None) -> str:
    if api_key_name and api_key_name != ENV_CLIENT:
        secret = db.scalar(select(ApiKey.signing_secret).where(ApiKey.name == api_key_name))
        if secret:
            return secret
    return env_signing_secret(cfg)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def post_webhook(
    url: str,
    payload: dict[str, Any],
    secret: str,
    idempotency_key: str,
    attempt: int,
    timeout: float,
) -> Outcome:
    body = orjson.dumps(payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Idempotency-Key": idempotency_key,
        "X-Notification-Id": str(payload["id"]),
        "X-Attempt": str(attempt),
        "X-Signature": sign(secret, body),
    }
    try:
        resp = _session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        )
    except requests.Timeout:
        return Outcome.retry(f"timed out after {timeout:g}s")
    except requests.RequestException as exc:
        return Outcome.retry(f"connection failed: {type(exc).__name__}: {exc}"[:500])
    if 200 <= resp.status_code < 300:
        return Outcome.success()
    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
    if resp.status_code in RETRYABLE_STATUS or resp.status_code >= 500:
        return Outcome.retry(error, parse_retry_after(resp.headers.get("Retry-After")))
    return Outcome.permanent(error)
