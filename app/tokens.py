"""User tokens: HS256 JWTs whose `sub` is the user id and whose `exp` is required."""

from __future__ import annotations

import time

import jwt

from app.errors import has_control_character


class InvalidToken(Exception):
    """The token is missing, malformed, expired, unsigned or signed with another key."""


def mint(secret: str, user_id: str, ttl_seconds: int) -> tuple[str, int]:
    """A token for `user_id` and its expiry (Unix seconds)."""
    now = int(time.time())
    exp = now + ttl_seconds
    return jwt.encode({"sub": user_id, "iat": now, "exp": exp}, secret, algorithm="HS256"), exp


def verify(secret: str, token: str | None) -> str:
    """The user id a valid token speaks for; InvalidToken otherwise."""
    if not token:
        raise InvalidToken("missing token")
    try:
        # Only HS256 is accepted, which also rules out "alg": "none".
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub.strip():
        raise InvalidToken("'sub' must be a non-empty string")
    if has_control_character(sub):
        raise InvalidToken("'sub' must not contain control characters")
    return sub
