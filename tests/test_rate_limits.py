from __future__ import annotations

import time

import pytest

from app.rate_limits import RESERVE

NOTE = {"user_id": "u1", "title": "t", "body": "b"}


def _create_key(flask_app, name: str) -> str:
    result = flask_app.test_cli_runner().invoke(args=["keys", "create", name])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture
def limited(make_app):
    """10 requests at once per key, 10 a second on average; a one-second window."""
    return make_app(RATE_LIMIT_PER_SECOND=10, RATE_LIMIT_BURST=10, AUTH_FAILURES_PER_MINUTE=5)


def test_a_key_past_its_limit_gets_429_with_retry_after_and_ratelimit_headers(limited, auth):
    client = limited.test_client()

    answers = [client.post("/notifications", json=NOTE, headers=auth) for _ in range(15)]

    assert [r.status_code for r in answers] == [202] * 10 + [429] * 5
    refused = answers[-1]
    assert refused.json["error"] == "too_many_requests"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Limit"] == "10"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert answers[0].headers["RateLimit-Limit"] == "10"
    assert "RateLimit-Reset" in answers[0].headers


def test_a_limited_key_recovers_once_its_window_has_passed(limited, auth):
    client = limited.test_client()
    while client.post("/notifications", json=NOTE, headers=auth).status_code != 429:
        pass

    time.sleep(2.2)  # the sliding window's previous second weighs nothing by then

    assert client.post("/notifications", json=NOTE, headers=auth).status_code == 202


def test_each_key_has_its_own_limit(limited, auth):
    client = limited.test_client()
    other = {"x-api-key": _create_key(limited, "other-service")}
    while client.post("/notifications", json=NOTE, headers=auth).status_code != 429:
        pass

    assert client.post("/notifications", json=NOTE, headers=other).status_code == 202


def test_repeated_failed_authentications_from_one_address_get_429_even_with_a_good_key(
    limited, auth
):
    client = limited.test_client()
    wrong = {"x-api-key": "guess"}

    codes = [client.get("/users/u1", headers=wrong).status_code for _ in range(7)]

    assert codes == [401] * 5 + [429] * 2
    blocked = client.get("/users/u1", headers=auth)
    assert blocked.status_code == 429
    assert int(blocked.headers["Retry-After"]) >= 1


def test_failed_user_tokens_count_as_failed_authentications(limited):
    client = limited.test_client()
    bad = {"Authorization": "Bearer not-a-token"}

    codes = [client.get("/notifications/offline/u1", headers=bad).status_code for _ in range(6)]

    assert codes == [401] * 5 + [429]


def test_rate_limits_can_be_turned_off(make_app, auth):
    client = make_app(RATE_LIMIT_PER_SECOND=0).test_client()

    answers = [client.post("/notifications", json=NOTE, headers=auth) for _ in range(30)]

    assert {r.status_code for r in answers} == {202}
    assert "RateLimit-Limit" not in answers[0].headers


def test_units_are_taken_from_redis_a_reserve_at_a_time(make_app, auth, rdb):
    client = make_app(RATE_LIMIT_PER_SECOND=1000, RATE_LIMIT_BURST=2000).test_client()

    client.post("/notifications", json=NOTE, headers=auth)
    client.post("/notifications", json=NOTE, headers=auth)

    counts = [int(v) for k in rdb.keys("LIMITS:*") if rdb.type(k) == "string"
              for v in [rdb.get(k)]]  # fmt: skip
    assert counts == [RESERVE]  # one reservation served both requests


def test_an_unreachable_rate_limit_store_lets_requests_through(make_app, auth, pg):
    client = make_app(RATE_LIMIT_STORAGE_URL="redis://127.0.0.1:1/0").test_client()

    assert client.post("/notifications", json=NOTE, headers=auth).status_code == 202
    assert client.get("/users/u1", headers={"x-api-key": "wrong"}).status_code == 401
