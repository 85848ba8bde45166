"""API-key authentication for backend services.

Keys are stored as SHA-256 digests; a presented key is hashed, looked up, and compared
in constant time. Lookups are cached per process for API_KEY_CACHE_SECONDS so the hot
ingest path does not query PostgreSQL on every request.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from flask import current_app, g, request
from sqlalchemy import Engine, select

from app.errors import ApiError
from app.rate_limits import RateLimits, Verdict
from models import ApiKey

log = logging.getLogger(__name__)

ENV_CLIENT = "env"
KEY_PREFIX = "nk_"
# send: POST notifications and batches; read: notification status, inboxes, users, sockets
# for any user; admin: templates, preferences, dead letters and redrive, user tokens.
SCOPES = ("send", "read", "admin")
_CACHE_MAX = 10_000

F = TypeVar("F", bound=Callable[..., Any])


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Caller(NamedTuple):
    """Who presented an API key, and what the key may do."""

    name: str
    scopes: frozenset[str]


class ApiKeyAuthenticator:
    """Maps a presented key to its Caller, or None."""

    def __init__(self, engine: Engine, env_key: str, cache_seconds: float) -> None:
        self._engine = engine
        self._env_key = env_key
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[Caller | None, float]] = {}
        self._lock = threading.Lock()

    def authenticate(self, presented: str) -> Caller | None:
        if not presented:
            return None
        if self._env_key and hmac.compare_digest(presented.encode(), self._env_key.encode()):
            return Caller(ENV_CLIENT, frozenset(SCOPES))
        digest = hash_key(presented)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        client = self._lookup(digest)
        if self._cache_seconds > 0:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[digest] = (client, now + self._cache_seconds)
        return client

    def _lookup(self, digest: str) -> Caller | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(ApiKey.name, ApiKey.key_hash, ApiKey.scopes).where(
                    ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)
                )
            ).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return Caller(row.name, frozenset(row.scopes))


def init_app(app: Any) -> None:
    cfg = app.config["NOTIFIER"]
    app.extensions["auth.api_keys"] = ApiKeyAuthenticator(
        app.extensions["db.engine"], cfg.API_KEY, cfg.API_KEY_CACHE_SECONDS
    )
    app.extensions["auth.rate_limits"] = RateLimits(
        cfg.RATE_LIMIT_STORAGE_URL or cfg.REDIS_URL,
        cfg.RATE_LIMIT_PER_SECOND,
        cfg.RATE_LIMIT_BURST,
        cfg.AUTH_FAILURES_PER_MINUTE,
    )
    app.after_request(_rate_limit_headers)


def _rate_limits() -> RateLimits:
    return current_app.extensions["auth.rate_limits"]


def _too_many(seconds: int, message: str, verdict: Verdict | None = None) -> ApiError:
    headers = {"Retry-After": str(seconds)}
    if verdict is not None:
        headers.update(_headers_of(verdict))
    return ApiError(429, "too_many_requests", message, {"x-api-key": [message]}, headers)


def _headers_of(verdict: Verdict) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(verdict.limit),
        "RateLimit-Remaining": str(max(0, verdict.remaining)),
        "RateLimit-Reset": str(verdict.reset_seconds),
    }


def _rate_limit_headers(response: Any) -> Any:
    verdict = g.get("rate_limit")
    if verdict is not None:
        response.headers.update(_headers_of(verdict))
    return response


def _refuse_blocked_address() -> None:
    seconds = _rate_limits().blocked_for(request.remote_addr or "")
    if seconds:
        raise _too_many(seconds, "Too many failed authentications from this address.")


def _failed_authentication(error: ApiError) -> ApiError:
    """The error to answer a failed authentication with: 429 once the address is past its
    allowance of failures, the 401 before that."""
    try:
        seconds = _rate_limits().failed(request.remote_addr or "")
    except Exception:
        log.warning("failed authentication not counted: storage unreachable", exc_info=True)
        seconds = 0
    if seconds:
        return _too_many(seconds, "Too many failed authentications from this address.")
    return error


def authenticate_api_key() -> Caller | None:
    """The caller for the request's x-api-key header, or None."""
    presented = request.headers.get("x-api-key", "")
    return current_app.extensions["auth.api_keys"].authenticate(presented)


def require_api_key(scope: str) -> Callable[[F], F]:
    """Reject the request with 401 unless it carries a valid x-api-key, 403 unless the key
    has `scope`."""
    assert scope in SCOPES, scope

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _admit_api_key(scope)
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _admit_api_key(scope: str) -> None:
    """Set g.client from the x-api-key header, or answer 401 (429 past a rate limit, 403
    without `scope`)."""
    _refuse_blocked_address()
    caller = authenticate_api_key()
    if caller is None:
        missing = not request.headers.get("x-api-key")
        raise _failed_authentication(
            ApiError(
                401,
                "unauthorized",
                "Missing x-api-key header." if missing else "Invalid or revoked API key.",
                {"x-api-key": ["Missing." if missing else "Invalid or revoked."]},
            )
        )
    if scope not in caller.scopes:
        raise ApiError(
            403, "forbidden", f"This API key lacks the {scope!r} scope.",
            {"scope": [f"{scope!r} required; the key has {', '.join(sorted(caller.scopes))}."]},
        )  # fmt: skip
    client = caller.name
    limits = _rate_limits()
    if limits.enabled:
        try:
            verdict = limits.admit(client)
        except Exception:
            # Redis unreachable: ingest still records the notification in PostgreSQL, and
            # refusing every request would turn a Redis outage into an API outage.
            log.warning("rate limit not checked: its storage is unreachable", exc_info=True)
            g.client = client
            return
        if not verdict.allowed:
            raise _too_many(verdict.reset_seconds, "This API key is over its rate limit.", verdict)
        g.rate_limit = verdict
    g.client = client


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer` header, if there is one."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def require_user_or_api_key(view: F) -> F:
    """Let through a valid x-api-key, or a user token whose `sub` is the `user_id` in the URL."""
    from app.tokens import InvalidToken, verify

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("x-api-key"):
            _admit_api_key("read")
            return view(*args, **kwargs)
        _refuse_blocked_address()
        try:
            sub = verify(current_app.config["NOTIFIER"].JWT_SECRET, bearer_token())
        except InvalidToken as exc:
            raise _failed_authentication(
                ApiError(
                    401,
                    "unauthorized",
                    "Send x-api-key or 'Authorization: Bearer <token>'.",
                    {"Authorization": [str(exc)]},
                )
            ) from exc
        if sub != kwargs.get("user_id"):
            raise ApiError(
                403,
                "forbidden",
                "This token belongs to another user.",
                {"user_id": ["Does not match the token's subject."]},
            )
        g.user_id = sub
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
