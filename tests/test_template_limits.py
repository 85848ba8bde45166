"""Bounded templates: no template, and no parameters, make rendering do unbounded work or
store unbounded text. Refused at PUT /templates when the template alone breaks a limit, at
POST /notifications when its params do; a 422 naming the field, nothing recorded."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from sqlalchemy import text

from app import rendering
from tests.helpers import count_rows

NESTED_MILLIONS = (
    "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)
DOUBLING = (
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}"
)
# Each grows without bound or past its cap when nothing stops it.
BOMBS = [
    "{{ 'x' * 10**7 }}",
    "{{ [0] * 10**7 }}",
    "{{ 10 ** 100000 }}",
    "{{ 9 ** 9 ** 9 ** 9 }}",
    "{% set x = 10**300 %}{% for i in range(20) %}{% set x = x * x %}{% endfor %}{{ x }}",
    "{% for i in range(3000000) %}{% endfor %}",
    NESTED_MILLIONS,
    "{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
    DOUBLING,
    DOUBLING.replace("ns.s ~ ns.s", "ns.s + ns.s"),
    "{% set s = 'x' * 900 %}{{ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s }}",
    "{{ 'x'|center(100000000) }}",
    "{{ 'x'.ljust(100000000) }}",
    "{{ ('x' * 900).replace('x', 'y' * 900) }}",
    "{{ '%100000000s' % 1 }}",
    "{{ '{:>100000000}'.format(1) }}",
    "{{ range(900)|map('string')|join('y' * 900) }}",
    "{% set s = 'x' * 900 %}{{ [s, s, s, s, s, s, s, s, s, s] }}",
    "{{ range(10)|batch(100000000, 0)|list }}",
    "{{ lipsum(n=100000) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% set s %}{% for i in range(1000) %}{% for j in range(1000) %}{{ 'x' * 900 }}"
    "{% endfor %}{% endfor %}{% endset %}{{ s|length }}",
]


def _assert_nothing_recorded(pg, rdb):
    assert count_rows(pg, "notifications") == 0
    assert not rdb.exists("notifications:stream")


def _template(title: str, body: str = "b") -> dict:
    return {"locales": {"en": {"title": title, "body": body}}, "default_locale": "en"}


@pytest.mark.parametrize("source", BOMBS)
def test_a_template_bomb_stops_at_a_limit_in_bounded_time_and_memory(source):
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(rendering.RenderError) as err:
            rendering.render_all({"en": {"title": source}}, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2  # the deadline is 50 ms; tracemalloc slows it
    assert peak < 32 * 1024 * 1024
    assert err.value.field == "template"
    assert err.value.message.startswith("locales.en.title: ")


@pytest.mark.parametrize("source", BOMBS)
def test_a_template_bomb_is_refused_when_saved_naming_the_part(client, auth, source):
    r = client.put("/templates/bomb", json=_template(source), headers=auth)
    assert r.status_code == 422, r.json
    assert r.json["error"] == "validation_error"
    assert list(r.json["fields"]) == ["locales.en.title"]
    assert client.get("/templates/bomb", headers=auth).status_code == 404


def test_the_part_named_is_the_one_that_breaks_the_limit(client, auth):
    body = _template("Hi {{ name }}", "Hello")
    body["locales"]["de"] = {"title": "{{ 'x' * 1001 }}", "body": "Hallo"}
    r = client.put("/templates/t", json=body, headers=auth)
    assert r.status_code == 422
    assert r.json["fields"] == {
        "locales.de.title": ["a repeated value would be over 1,000 characters."]
    }


def test_output_is_capped_as_a_direct_notification_is(client, auth):
    title = "{{ 'x' * 1000 }}"
    assert client.put("/templates/t", json=_template(title), headers=auth).status_code == 201
    r = client.put("/templates/t", json=_template(title + "!"), headers=auth)
    assert r.status_code == 422
    assert r.json["fields"] == {"locales.en.title": ["the output would be over 1,000 characters."]}


@pytest.mark.parametrize(
    "source",
    [
        "{{ " + "(" * 100 + "1" + ")" * 100 + " }}",  # deeper than Jinja2's parser recurses
        "{{ x" + "|e" * 300 + " }}",  # deeper than Python compiles
        "{{ x|no_such_filter }}",
        "{{ " + "1" * 5000 + " }}",
    ],
)
def test_a_template_that_cannot_compile_is_a_quick_422_when_saved_not_a_500(client, auth, source):
    started = time.monotonic()
    r = client.put("/templates/t", json=_template(source), headers=auth)
    assert time.monotonic() - started < 2  # 300 nested filters took Jinja2 15 s to compile
    assert r.status_code == 422, r.json
    assert "locales.en.title" in r.json["fields"]


@pytest.mark.parametrize(
    ("title", "params"),
    [
        ("{{ word * times }}", {"word": "x", "times": 10**7}),
        ("{{ base ** exp }}", {"base": 10, "exp": 100000}),
        ("{{ name }}", {"name": "x" * 1001}),
        (
            "{% set ns = namespace(s=word) %}{% for i in range(n) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            {"word": "x", "n": 40},
        ),
        (
            "{% for a in items %}{% for b in items %}{% for c in items %}"
            "{% endfor %}{% endfor %}{% endfor %}",
            {"items": list(range(1000))},
        ),
        ("{% for i in range(n) %}{% endfor %}", {"n": 10**6}),
    ],
)
def test_limits_broken_only_by_the_params_are_a_422_at_ingest_recording_nothing(
    client, auth, pg, rdb, title, params
):
    assert client.put("/templates/t", json=_template(title), headers=auth).status_code == 201
    r = client.post(
        "/notifications", json={"user_id": "u", "template": "t", "params": params}, headers=auth
    )
    assert r.status_code == 422, r.json
    assert r.json["error"] == "validation_error"
    assert list(r.json["fields"]) == ["params"]
    assert r.json["message"].startswith("locales.en.title: ")
    _assert_nothing_recorded(pg, rdb)


def test_a_bomb_saved_before_the_limits_is_a_422_at_ingest_naming_the_template(
    client, auth, pg, rdb
):
    with pg.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO templates (key, locales, default_locale, created_at, updated_at) "
                "VALUES ('old', CAST(:locales AS jsonb), 'en', now(), now())"
            ),
            {"locales": '{"en": {"title": "{{ \'x\' * 10**7 }}", "body": "b"}}'},
        )
    r = client.post("/notifications", json={"user_id": "u", "template": "old"}, headers=auth)
    assert r.status_code == 422
    assert r.json["fields"] == {
        "template": ["locales.en.title: a repeated value would be over 1,000 characters."]
    }
    _assert_nothing_recorded(pg, rdb)


def test_a_batch_renders_nothing_more_once_one_rendering_times_out(client, auth, pg, rdb):
    slow = "{% for a in items %}{% for b in items %}{% for c in items %}{% endfor %}{% endfor %}"
    client.put("/templates/slow", json=_template(slow + "{% endfor %}"), headers=auth)
    one = {"user_id": "u", "template": "slow", "params": {"items": list(range(1000))}}
    started = time.monotonic()
    r = client.post("/notifications/batch", json={"notifications": [one] * 50}, headers=auth)
    assert time.monotonic() - started < 2  # one deadline, not fifty
    assert r.status_code == 422
    errors = r.json["fields"]["notifications"]
    assert "took longer than 50 ms" in errors["0"]["params"][0]
    assert all(list(errors[str(i)]) == ["template"] for i in range(1, 50))
    _assert_nothing_recorded(pg, rdb)


def test_the_render_deadline_is_the_configured_one(make_app, auth, pg, rdb):
    client = make_app(TEMPLATE_RENDER_SECONDS=0.0).test_client()
    loop = "{% for i in items %}{{ i }}{% endfor %}"
    assert client.put("/templates/t", json=_template(loop), headers=auth).status_code == 201
    r = client.post(
        "/notifications",
        json={"user_id": "u", "template": "t", "params": {"items": [1]}},
        headers=auth,
    )
    assert r.status_code == 422
    assert "took longer than 0 ms" in r.json["message"]
    _assert_nothing_recorded(pg, rdb)


def test_ordinary_templates_render_as_before_within_the_limits(client, auth, pg, rdb):
    digest = {
        "title": "{{ items|length }} new for {{ name|title }}: {{ desc|striptags|truncate(30) }}",
        "body": "{% macro line(i) %}{{ '%02d'|format(i.n) }}. {{ i.t ~ '!' }}{% endmacro %}"
        "{% for i in items %}{{ line(i) }}{{ ', ' if not loop.last }}{% endfor %}"
        " | {{ '{:.2f}'.format(total * 2) }} | {{ ['a', 'b'] * 2 }} | {{ 2 ** 10 }}",
        "email_html": "<p>{{ name ~ ' & co' }}</p>{{ items|map(attribute='t')|join(', ') }}",
    }
    client.put("/templates/digest", json={"locales": {"en": digest}, "default_locale": "en"},
               headers=auth)  # fmt: skip
    params = {
        "name": "sam",
        "desc": "<p>" + "long text " * 300 + "</p>",  # a 3,000-character param, shortened
        "items": [{"n": 1, "t": "one"}, {"n": 2, "t": "two"}],
        "total": 10.25,
    }
    r = client.post("/notifications", json={"user_id": "u", "template": "digest",
                                            "params": params}, headers=auth)  # fmt: skip
    assert r.status_code == 202, r.json
    with pg.connect() as conn:
        title, body, renditions = conn.execute(
            text("SELECT title, body, renditions FROM notifications")
        ).one()
    assert title == "2 new for Sam: long text long text long..."
    assert body == "01. one!, 02. two! | 20.50 | ['a', 'b', 'a', 'b'] | 1024"
    assert renditions["locales"]["en"]["email_html"] == "<p>sam &amp; co</p>one, two"
    assert rdb.xlen("notifications:stream") == 1
