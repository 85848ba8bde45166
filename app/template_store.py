"""Templates as ingest reads them: from PostgreSQL, cached per process for a few seconds.

A templated POST /notifications renders at ingest, so reading the template must not cost
a query per request. A PUT or DELETE clears the entry in the process that served it; other
processes see the change within TEMPLATE_CACHE_SECONDS.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from models import Template


@dataclass(frozen=True)
class LoadedTemplate:
    key: str
    locales: dict[str, dict[str, str]]
    default_locale: str


class TemplateStore:
    def __init__(self, engine: Engine, ttl: float) -> None:
        self._engine = engine
        self._ttl = ttl
        self._cache: dict[str, tuple[float, LoadedTemplate | None]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> LoadedTemplate | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        with self._engine.connect() as conn:
            row = conn.execute(
                select(Template.key, Template.locales, Template.default_locale).where(
                    Template.key == key
                )
            ).first()
        found = LoadedTemplate(row.key, row.locales, row.default_locale) if row else None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now, found)
        return found

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)


def renditions(template: LoadedTemplate, rendered: dict[str, Any]) -> dict[str, Any]:
    """What a notification keeps: every locale's rendering and which one is the default."""
    return {"default": template.default_locale, "locales": rendered}
