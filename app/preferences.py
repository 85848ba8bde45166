"""What a user's preferences say about one delivery: muted, or held back by quiet hours.

Plain functions of the user's settings and the time, so the rules are tested without a
clock or a database. The rules:
- a channel muted for the notification's category is skipped;
- email and webhook deliveries due inside the user's quiet hours (local time in their
  time zone) wait for the end of the window; in-app delivery never waits;
- a `priority: high` notification in a category the operator marks critical
  (CRITICAL_CATEGORIES) overrides both: a sender cannot wake users at night, or reach
  what they muted, by calling anything high priority.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from models import Channel, Priority

QUIET_CHANNELS = frozenset({Channel.EMAIL.value, Channel.WEBHOOK.value})


def valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def overrides(category: str | None, priority: str, critical: Collection[str]) -> bool:
    """Whether the notification passes the user's mutes and quiet hours."""
    return priority == Priority.HIGH.value and category in critical


def is_muted(
    muted: Mapping[str, Any] | None,
    category: str | None,
    channel: str,
    priority: str,
    critical: Collection[str],
) -> bool:
    if not muted or category is None or channel not in (muted.get(category) or ()):
        return False
    return not overrides(category, priority, critical)


def quiet_until(
    now: datetime, tz_name: str | None, start: time | None, end: time | None
) -> datetime | None:
    """The end (UTC) of the quiet window `now` falls in, or None when it falls in none."""
    if start is None or end is None or start == end:
        return None
    tz = ZoneInfo(tz_name) if tz_name else UTC
    local = now.astimezone(tz)
    t = local.time().replace(tzinfo=None)
    if start < end:
        if not start <= t < end:
            return None
        end_day = local.date()
    else:  # wraps past midnight, e.g. 22:00 to 07:00
        if end <= t < start:
            return None
        end_day = local.date() + timedelta(days=1) if t >= start else local.date()
    # A wall-clock time skipped by a DST change resolves with the offset before the change.
    until = datetime.combine(end_day, end, tzinfo=tz).astimezone(UTC)
    return until if until > now else None


def deferral(
    now: datetime,
    channel: str,
    tz_name: str | None,
    start: time | None,
    end: time | None,
    override: bool = False,
) -> datetime | None:
    """When an email or webhook delivery due `now` may go out, if not now."""
    if channel not in QUIET_CHANNELS or override:
        return None
    return quiet_until(now, tz_name, start, end)
