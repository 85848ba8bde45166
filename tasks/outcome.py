"""What one try of an external channel came to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retryable: bool = False
    error: str | None = None
    retry_after: float | None = None

    @classmethod
    def success(cls) -> Outcome:
        return cls(ok=True)

    @classmethod
    def retry(cls, error: str, retry_after: float | None = None) -> Outcome:
        return cls(ok=False, retryable=True, error=error, retry_after=retry_after)

    @classmethod
    def permanent(cls, error: str) -> Outcome:
        return cls(ok=False, retryable=False, error=error)
