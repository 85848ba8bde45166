"""Templates: locale tags, sandboxed rendering, the /templates API, and rendering at ingest
in every locale with each recipient's copy in their own language."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app import locales, rendering
from tasks.stream import process_entries

ORDER_SHIPPED = {
    "locales": {
        "en": {"title": "Order {{ order }} shipped", "body": "Hi {{ name }}, it is on its way.",
               "email_subject": "Your order {{ order }}",
               "email_html": "<p>Hi <b>{{ name }}</b></p>"},
        "de": {"title": "Bestellung {{ order }} versandt", "body": "Hallo {{ name }}."},
        "pt": {"title": "Encomenda {{ order }} enviada", "body": "Olá {{ name }}."},
        "pt_br": {"title": "Pedido {{ order }} enviado", "body": "Oi {{ name }}."},
    },
    "default_locale": "en",
}  # fmt: skip


def test_locale_tags_are_normalised_by_babel():
    assert locales.normalize("pt_br") == "pt-BR"
    assert locales.normalize("PT-br") == "pt-BR"
    assert locales.normalize("zh-hant-tw") == "zh-Hant-TW"
    with pytest.raises(locales.InvalidLocale):
        locales.normalize("xx-YY")


def test_locale_falls_back_from_region_to_language_to_default():
    have = ["en", "pt", "pt-BR"]
    assert locales.choose(["pt-BR"], have, "en") == "pt-BR"
    assert locales.choose(["pt-PT"], have, "en") == "pt"
    assert locales.choose(["de-AT"], have, "en") == "en"
    assert locales.choose([None, "pt-PT"], have, "en") == "pt"  # no lang: the user's locale
    assert locales.choose(["de", "pt-BR"], have, "en") == "pt-BR"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ name['__class__'] }}",
        "{{ name|attr('__class__') }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_sandbox_escapes_are_refused_when_the_template_is_saved(client, auth, source):
    body = {"locales": {"en": {"title": source, "body": "b"}}, "default_locale": "en"}
    r = client.put("/templates/evil", json=body, headers=auth)
    assert r.status_code == 422
    assert "locales.en.title" in r.json["fields"]
    assert client.get("/templates/evil", headers=auth).status_code == 404


def test_sandbox_refuses_internals_even_when_reached_indirectly():
    attr = "__" + "class__"
    with pytest.raises(rendering.RenderError) as err:
        rendering.render_all({"en": {"title": "{{ x|attr(a) }}"}}, {"x": 1, "a": attr})
    assert err.value.field == "template"


def test_email_html_is_autoescaped_and_plain_text_is_not():
    out = rendering.render_all(ORDER_SHIPPED["locales"], {"order": 7, "name": "<script>x</script>"})
    assert out["en"]["email_html"] == "<p>Hi <b>&lt;script&gt;x&lt;/script&gt;</b></p>"
    assert out["en"]["body"] == "Hi <script>x</script>, it is on its way."


def test_templates_api_creates_replaces_lists_and_deletes(client, auth):
    r = client.put("/templates/order_shipped", json=ORDER_SHIPPED, headers=auth)
    assert r.status_code == 201
    assert r.json["locale_tags"] == ["de", "en", "pt", "pt-BR"]  # "pt_br" normalised
    assert (
        client.put("/templates/order_shipped", json=ORDER_SHIPPED, headers=auth).status_code == 200
    )
    client.put("/templates/welcome", json={"locales": {"en": {"title": "Hi", "body": "b"}},
                                           "default_locale": "en"}, headers=auth)  # fmt: skip

    page = client.get("/templates?limit=1", headers=auth).json
    assert [t["key"] for t in page["templates"]] == ["order_shipped"]
    rest = client.get(f"/templates?limit=1&after={page['next_after']}", headers=auth).json
    assert [t["key"] for t in rest["templates"]] == ["welcome"]
    one = client.get("/templates/order_shipped", headers=auth).json
    assert one["locales"]["pt-BR"]["title"] == "Pedido {{ order }} enviado"

    assert client.delete("/templates/welcome", headers=auth).status_code == 204
    assert client.delete("/templates/welcome", headers=auth).status_code == 404
    assert client.get("/templates", headers=auth).json["templates"][0]["key"] == "order_shipped"
    assert client.get("/templates").status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"locales": {"en": {"title": "{% if %}", "body": "b"}}, "default_locale": "en"},
         "locales.en.title"),
        ({"locales": {"en": {"title": "t"}}, "default_locale": "en"}, "locales.en.body"),
        ({"locales": {"en": {"title": "t", "body": "b", "sms": "x"}}, "default_locale": "en"},
         "locales.en.sms"),
        ({"locales": {"en": {"title": "t", "body": "b"}}, "default_locale": "de"},
         "default_locale"),
        ({"locales": {"xx-YY": {"title": "t", "body": "b"}}, "default_locale": "en"}, "locales"),
        ({"locales": {}, "default_locale": "en"}, "locales"),
        ({"default_locale": "en"}, "locales"),
    ],
)  # fmt: skip
def test_bad_templates_get_a_422_naming_the_field(client, auth, body, field):
    r = client.put("/templates/t1", json=body, headers=auth)
    assert r.status_code == 422, r.json
    assert field in r.json["fields"]


def test_a_missing_parameter_is_a_422_at_ingest_naming_it(client, auth, rdb):
    client.put("/templates/order_shipped", json=ORDER_SHIPPED, headers=auth)
    r = client.post("/notifications", json={"user_id": "u", "template": "order_shipped",
                                            "params": {"order": 1}}, headers=auth)  # fmt: skip
    assert r.status_code == 422
    assert "params.name" in r.json["fields"]
    r = client.post("/notifications", json={"user_id": "u", "template": "nope"}, headers=auth)
    assert r.status_code == 422
    assert "template" in r.json["fields"]
    assert not rdb.exists("notifications:stream")  # nothing was accepted


def _offline(client, auth, user: str) -> list[dict]:
    return client.get(f"/notifications/offline/{user}", headers=auth).json["notifications"]


def test_each_recipient_gets_the_rendering_in_their_language(client, auth, pg, rdb):
    client.put("/templates/order_shipped", json=ORDER_SHIPPED, headers=auth)
    for user, locale in (("ana", "pt-BR"), ("rui", "pt-PT"), ("max", "de-AT"), ("li", "zh")):
        client.put(f"/users/{user}", json={"locale": locale}, headers=auth)
    params = {"order": 42, "name": "Sam"}
    r = client.post("/notifications", json={"user_ids": ["ana", "rui", "max", "li", "nobody"],
                                            "template": "order_shipped", "params": params},
                    headers=auth)  # fmt: skip
    assert r.status_code == 202
    # The notification's own lang wins over the user's locale.
    client.post("/notifications", json={"user_id": "ana", "template": "order_shipped",
                                        "params": params, "lang": "de"}, headers=auth)  # fmt: skip
    process_entries(pg, rdb.xrange("notifications:stream"), lambda *_: None, 100)

    got = {u: [(m["title"], m["lang"]) for m in _offline(client, auth, u)]
           for u in ("ana", "rui", "max", "li", "nobody")}  # fmt: skip
    assert got == {
        "ana": [("Pedido 42 enviado", "pt-BR"), ("Bestellung 42 versandt", "de")],
        "rui": [("Encomenda 42 enviada", "pt")],
        "max": [("Bestellung 42 versandt", "de")],
        "li": [("Order 42 shipped", "en")],
        "nobody": [("Order 42 shipped", "en")],
    }
    assert _offline(client, auth, "ana")[0]["body"] == "Oi Sam."


def test_accepted_notifications_keep_their_rendering_when_the_template_changes(
    client, auth, pg, rdb
):
    client.put("/templates/order_shipped", json=ORDER_SHIPPED, headers=auth)
    body = {"user_id": "u", "template": "order_shipped", "params": {"order": 1, "name": "A"}}
    client.post("/notifications", json=body, headers=auth)
    client.delete("/templates/order_shipped", headers=auth)
    process_entries(pg, rdb.xrange("notifications:stream"), lambda *_: None, 100)
    assert [m["title"] for m in _offline(client, auth, "u")] == ["Order 1 shipped"]
    with pg.connect() as conn:
        assert conn.scalar(text("SELECT lang FROM deliveries")) == "en"
