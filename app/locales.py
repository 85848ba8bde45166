"""Locale tags: parsed and normalised with Babel, and the fallback from one to another.

Tags are kept in BCP 47 form ("pt-BR", "zh-Hant-TW"); "pt_br" or "PT-br" mean the same.
"""

from __future__ import annotations

from collections.abc import Iterable

from babel import Locale, UnknownLocaleError


class InvalidLocale(ValueError):
    pass


def normalize(tag: str) -> str:
    """The canonical BCP 47 form of `tag`; InvalidLocale when Babel does not know it."""
    try:
        locale = Locale.parse(tag.replace("_", "-"), sep="-")
    except (UnknownLocaleError, ValueError, TypeError) as exc:
        raise InvalidLocale(f"Unknown locale {tag!r}.") from exc
    parts = [locale.language, locale.script, locale.territory, locale.variant]
    return "-".join(p for p in parts if p)


def fallbacks(tag: str) -> list[str]:
    """`tag`, then ever shorter prefixes: "zh-Hant-TW" -> ["zh-Hant-TW", "zh-Hant", "zh"]."""
    parts = tag.split("-")
    return ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]


def choose(wanted: Iterable[str | None], available: Iterable[str], default: str) -> str:
    """The first of `wanted` (or a shorter form of it) that is `available`, else `default`.

    `wanted` is in order of preference: the notification's `lang`, then the user's locale.
    """
    have = set(available)
    for tag in wanted:
        if not tag:
            continue
        for candidate in fallbacks(tag):
            if candidate in have:
                return candidate
    return default
