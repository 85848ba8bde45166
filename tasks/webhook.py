"""The webhook channel: POST the notification as JSON, signed, to the user's URL.

Receivers verify `X-Signature: sha256=<hex>`, an HMAC-SHA256 of the raw body with the
signing secret of the API key that sent the notification, and dedupe on `Idempotency-Key`
(the same for every try of one delivery).
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import hmac
import socket
import time
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from app import outbound
from app.auth import ENV_CLIENT
from app.config import Config
from models import ApiKey
from tasks.outcome import Outcome

RETRYABLE_STATUS = {408, 429}
USER_AGENT = "notifier-webhook/1"
REFUSED = "not sent: the URL points at an address the platform does not send to"


class _Checked:
    """Refuses the connection when the address it reached is not allowed (DNS rebinding:
    the name may have resolved elsewhere when it was validated)."""

    networks: tuple[outbound.Network, ...] = ()

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        if not outbound.allowed(sock.getpeername()[0], self.networks):
            sock.close()
            raise outbound.RefusedAddress(REFUSED)
        return sock


class _Adapter(HTTPAdapter):
    def __init__(self, networks: tuple[outbound.Network, ...]) -> None:
        self._networks = networks
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        attrs = {"networks": self._networks}
        http = type("CheckedHTTPConnection", (_Checked, HTTPConnection), attrs)
        https = type("CheckedHTTPSConnection", (_Checked, HTTPSConnection), attrs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("CheckedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("CheckedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }


@functools.cache
def _session(networks: tuple[outbound.Network, ...]) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment between the check and the receiver
    adapter = _Adapter(networks)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _connection_error(exc: requests.ConnectionError) -> str:
    """What failed, without the receiver's address or port (no map of the network)."""
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return "connection failed: TLS handshake failed"
    if "NameResolutionError" in text or "Name or service not known" in text:
        return "connection failed: the host name did not resolve"
    if "Connection refused" in text:
        return "connection failed: connection refused"
    if "reset" in text.lower():
        return "connection failed: connection reset"
    return "connection failed"


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
    networks: tuple[outbound.Network, ...] = (),
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
        # Redirects are not followed: a receiver must not point the platform elsewhere.
        resp = _session(networks).post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        )
    except outbound.RefusedAddress:
        return Outcome.permanent(REFUSED)
    except requests.Timeout:
        return Outcome.retry(f"timed out after {timeout:g}s")
    except requests.ConnectionError as exc:
        return Outcome.retry(_connection_error(exc))
    except requests.RequestException as exc:
        return Outcome.retry(f"request failed: {type(exc).__name__}")
    if 200 <= resp.status_code < 300:
        return Outcome.success()
    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
    if resp.status_code in RETRYABLE_STATUS or resp.status_code >= 500:
        return Outcome.retry(error, parse_retry_after(resp.headers.get("Retry-After")))
    return Outcome.permanent(error)
