"""The broker transport (app/broker.py), on real Redis."""

from __future__ import annotations

from app.broker import Channel


def test_the_celery_app_talks_to_redis_urls_through_the_broker_transport(app):
    celery_app = app.extensions["celery"]
    with celery_app.connection_for_write() as conn:
        assert isinstance(conn.default_channel, Channel)
        # The URL keeps its scheme: Flower's broker view picks its client by it.
        assert conn.as_uri().startswith("redis://")


def test_a_broker_channel_reuses_one_command_client(app):
    celery_app = app.extensions["celery"]
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()
        with conn.channel() as other, other.conn_or_acquire() as third:
            assert third is not first
