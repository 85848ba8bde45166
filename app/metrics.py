"""Prometheus metrics, served by every API process at `GET /metrics`.

Three sources, so that one scrape of any API process tells the state of the whole platform:
- platform counters (notifications accepted, deliveries by channel and outcome, retries,
  dead letters) are bumped by whichever process sees the event — an API process, the stream
  consumer, a delivery or channels worker — in one Redis hash. The workers serve no HTTP,
  and a `--scale worker=N` deployment would otherwise need each of them scraped;
- per-process figures of the gateway (open sockets, POST-to-socket latency) live in
  prometheus_client's own metrics, in multiprocess mode under gunicorn
  (PROMETHEUS_MULTIPROC_DIR, set by gunicorn.conf.py);
- gauges read from Redis at scrape time: stream length, consumer-group lag and pending
  entries, retries waiting, Celery queue lengths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

COUNTERS_KEY = "notifications:metrics"
PREFIX = "notifier_"

# Counter name -> its label names; a hash field is the name and label values joined by ":".
COUNTERS: dict[str, tuple[tuple[str, ...], str]] = {
    "notifications_accepted": ((), "Notifications recorded and accepted by the API."),
    "deliveries": (
        ("channel", "outcome"),
        "Delivery tries by channel and outcome (websocket: sent, offline, retry, failed; "
        "webhook and email: sent, retry, lost, failed, skipped).",
    ),
    "retries_scheduled": (("channel",), "Retries scheduled after a failed try."),
    "retries_swept": (
        ("reason",),
        "Tries the retry sweeper enqueued from the ZSET: due (left to it: long delays, open "
        "circuits) or lost (nobody held them, or their worker died).",
    ),
    "reconciled": (
        ("action",),
        "What the reconciler repaired from PostgreSQL: restreamed (notifications whose stream "
        "entry was lost), repushed (websocket deliveries whose task was lost), remirrored "
        "(webhook and email tries whose retry ZSET member was lost).",
    ),
    "circuits_opened": ((), "Times a failing webhook URL's circuit opened."),
    "dead_letters": (("source",), "Rows written to the dead-letter table, by source."),
}

open_sockets = Gauge(
    f"{PREFIX}open_sockets",
    "WebSockets open on this gateway process, counted once their connect-time replay is sent.",
    multiprocess_mode="liveall",
)
delivery_latency = Histogram(
    f"{PREFIX}delivery_latency_seconds",
    "From the notification's acceptance to its live send on a socket.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 5, 10, 30),
)


def field(name: str, *labels: str) -> str:
    names, _ = COUNTERS[name]
    if len(labels) != len(names):
        raise ValueError(f"{name} takes labels {names}")
    return ":".join((name, *labels))


def count(client: redis.Redis | Any, name: str, *labels: str, n: int = 1) -> None:
    """Add `n` to a platform counter; `client` may be a pipeline. Never raises on Redis errors:
    a lost increment must not fail a delivery."""
    if n <= 0:
        return
    try:
        client.hincrby(COUNTERS_KEY, field(name, *labels), n)
    except redis.RedisError:
        log.debug("could not count %s", name)


def count_many(client: redis.Redis, increments: Iterable[tuple[str, tuple[str, ...], int]]) -> None:
    """Several counters in one round trip."""
    pipe = client.pipeline(transaction=False)
    queued = False
    for name, labels, n in increments:
        if n > 0:
            pipe.hincrby(COUNTERS_KEY, field(name, *labels), n)
            queued = True
    if not queued:
        return
    try:
        pipe.execute()
    except redis.RedisError:
        log.debug("could not count delivery outcomes")


class PlatformCollector:
    """Reads the platform counters and the stream and queue gauges from Redis per scrape."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        retry_zset: str,
        queues: list[str],
        broker: redis.Redis | None = None,
    ) -> None:
        self.redis = client
        self.broker = broker or client
        self.stream = stream
        self.group = group
        self.retry_zset = retry_zset
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        raw = self.redis.hgetall(COUNTERS_KEY)
        families = {
            name: CounterMetricFamily(f"{PREFIX}{name}", doc, labels=list(labels))
            for name, (labels, doc) in COUNTERS.items()
        }
        seen: dict[str, bool] = {}
        for key, value in raw.items():
            key = key.decode() if isinstance(key, bytes) else key
            name, *labels = key.split(":")
            if name in families and len(labels) == len(COUNTERS[name][0]):
                families[name].add_metric(labels, float(value))
                seen[name] = True
        for name, family in families.items():
            if not COUNTERS[name][0] and not seen.get(name):
                family.add_metric([], 0.0)
            yield family

    def _gauges(self) -> Iterator[Metric]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.stream)
        pipe.zcard(self.retry_zset)
        length, waiting = pipe.execute()
        pipe = self.broker.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
        queued = pipe.execute()
        lag = pending = 0.0
        try:
            for info in self.redis.xinfo_groups(self.stream):
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if name == self.group:
                    pending = float(info["pending"])
                    lag = float(info["lag"] if info.get("lag") is not None else length)
        except redis.ResponseError:
            pass  # no stream yet
        yield GaugeMetricFamily(f"{PREFIX}stream_length", "Entries in the stream.", value=length)
        yield GaugeMetricFamily(
            f"{PREFIX}stream_lag", "Stream entries not yet read by the consumer group.", value=lag
        )
        yield GaugeMetricFamily(
            f"{PREFIX}stream_pending",
            "Stream entries read by a consumer and not yet acknowledged.",
            value=pending,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}retries_waiting", "Tries waiting in the retry ZSET.", value=waiting
        )
        family = GaugeMetricFamily(
            f"{PREFIX}queue_length", "Tasks waiting in a Celery queue.", labels=["queue"]
        )
        for queue, n in zip(self.queues, queued, strict=True):
            family.add_metric([queue], n)
        yield family


def render(collector: PlatformCollector) -> bytes:
    """The exposition text: the platform collector plus this process's (or all gunicorn
    workers') own metrics."""
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    out = generate_latest(registry)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        workers = CollectorRegistry()
        multiprocess.MultiProcessCollector(workers)
        return out + generate_latest(workers)
    return out + generate_latest(REGISTRY)
