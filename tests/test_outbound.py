"""Webhooks never reach an address the operator has not allowed, at validation or at send time."""

from __future__ import annotations

import pytest

from app import outbound
from tasks.outcome import Outcome
from tasks.webhook import REFUSED, post_webhook
from tests.helpers import free_port
from tests.receivers import Receiver

LOOPBACK = outbound.parse_networks("127.0.0.0/8,::1/128")
# What the issue tried: cloud metadata, a private network, loopback as an IPv6 literal, as a
# decimal number and by name.
INTERNAL_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://[::1]:8000/",
    "http://2130706433/",
    "http://localhost:8000/",
    "http://192.168.1.20/hook",
    "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0:8000/",
]
PAYLOAD = {"id": "01a1", "title": "t"}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.1", "::1", "fd00::1", "fe80::1", "::ffff:10.0.0.1", "ff02::1"],
)  # fmt: skip
def test_internal_addresses_are_not_allowed(address):
    assert not outbound.allowed(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert outbound.allowed(address)


def test_an_allowed_network_lets_its_addresses_through():
    assert outbound.allowed("127.0.0.1", LOOPBACK)
    assert outbound.allowed("::1", LOOPBACK)
    assert not outbound.allowed("10.0.0.1", LOOPBACK)


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_urls_resolving_to_internal_addresses_are_refused(url):
    with pytest.raises(outbound.RefusedAddress):
        outbound.check_url(url)


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_a_notification_with_an_internal_webhook_url_gets_a_422_naming_the_field(
    make_app, auth, url
):
    client = make_app(WEBHOOK_ALLOWED_NETWORKS="").test_client()

    r = client.post(
        "/notifications",
        json={
            "user_id": "u",
            "title": "t",
            "body": "b",
            "channels": ["webhook"],
            "webhook_url": url,
        },
        headers=auth,
    )

    assert r.status_code == 422
    assert list(r.json["fields"]) == ["webhook_url"]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_a_user_with_an_internal_webhook_url_gets_a_422_naming_the_field(make_app, auth, url):
    client = make_app(WEBHOOK_ALLOWED_NETWORKS="").test_client()

    r = client.put("/users/u1", json={"webhook_url": url}, headers=auth)

    assert r.status_code == 422
    assert "webhook_url" in r.json["fields"]


def test_a_loopback_receiver_is_accepted_when_the_operator_allows_it(client, auth):
    r = client.post(
        "/notifications",
        json={"user_id": "u", "title": "t", "body": "b", "channels": ["webhook"],
              "webhook_url": "http://127.0.0.1:9/hook"},
        headers=auth,
    )  # fmt: skip

    assert r.status_code == 202, r.json


def test_a_mistyped_allowed_network_stops_the_start(make_app):
    with pytest.raises(ValueError, match="WEBHOOK_ALLOWED_NETWORKS"):
        make_app(WEBHOOK_ALLOWED_NETWORKS="10.0.0.0/33")


def _post(url: str, networks=()) -> Outcome:
    return post_webhook(url, PAYLOAD, "secret", "k", 1, timeout=5, networks=networks)


def test_a_try_to_an_address_not_allowed_is_refused_before_anything_is_sent(receiver):
    # As if the name had resolved to a public address at validation (DNS rebinding).
    outcome = _post(receiver.url("hook"))

    assert outcome.error == REFUSED
    assert not outcome.retryable
    assert receiver.of("hook") == []


def test_a_try_to_an_allowed_address_is_sent(receiver):
    assert _post(receiver.url("hook"), LOOPBACK).ok
    assert len(receiver.of("hook")) == 1


def test_a_failed_connection_is_recorded_without_the_address_or_port():
    port = free_port()  # nothing listens there

    outcome = _post(f"http://127.0.0.1:{port}/hook", LOOPBACK)

    assert outcome.retryable
    assert outcome.error == "connection failed: connection refused"
    assert "127.0.0.1" not in outcome.error
    assert str(port) not in outcome.error


def test_redirects_are_not_followed(receiver):
    elsewhere = receiver.url("elsewhere")
    url = receiver.script("hook", (302, {"Location": elsewhere}, 0.0))

    outcome = _post(url, LOOPBACK)

    assert not outcome.ok
    assert outcome.error.startswith("HTTP 302")
    assert receiver.of("elsewhere") == []


def test_the_422_says_why_and_how_to_allow_a_network(make_app, auth):
    client = make_app(WEBHOOK_ALLOWED_NETWORKS="").test_client()

    r = client.put(
        "/users/u1", json={"webhook_url": "http://169.254.169.254/latest/meta-data/"}, headers=auth
    )

    [message] = r.json["fields"]["webhook_url"]
    assert "does not send to" in message
    assert "WEBHOOK_ALLOWED_NETWORKS" in message
