from __future__ import annotations

from app.ids import uuid7


def test_uuid7_has_version_7_and_rfc_variant():
    u = uuid7()
    assert u.version == 7
    assert u.variant == "specified in RFC 4122"


def test_uuid7_orders_by_millisecond():
    earlier, later = uuid7(1_700_000_000_000), uuid7(1_700_000_000_001)
    assert earlier < later
    assert earlier.int >> 80 == 1_700_000_000_000


def test_uuid7_is_unique_within_a_millisecond():
    assert len({uuid7(1_700_000_000_000) for _ in range(10_000)}) == 10_000
