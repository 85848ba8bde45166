"""GET /metrics: Prometheus exposition of the whole platform (see app.metrics)."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics
from app.auth import bearer_token
from app.errors import ApiError
from app.redis_client import make_redis
from app.routing import RETRY_ZSET

bp = Blueprint("metrics", __name__)

QUEUES = ["high", "default", "low", "stream", "channels"]


def _collector() -> metrics.PlatformCollector:
    found = current_app.extensions.get("metrics.collector")
    if found is None:
        cfg = current_app.config["NOTIFIER"]
        client = current_app.extensions["redis"]
        broker = client if cfg.broker_url == cfg.REDIS_URL else make_redis(cfg.broker_url)
        found = metrics.PlatformCollector(
            client, cfg.STREAM_KEY, cfg.STREAM_GROUP, RETRY_ZSET, QUEUES, broker
        )
        current_app.extensions["metrics.collector"] = found
    return found


@bp.get("/metrics")
def exposition() -> Response:
    expected = current_app.config["NOTIFIER"].METRICS_TOKEN
    if expected and not hmac.compare_digest((bearer_token() or "").encode(), expected.encode()):
        raise ApiError(
            401, "unauthorized", "GET /metrics needs its bearer token.",
            {"Authorization": ["Bearer METRICS_TOKEN expected."]},
        )  # fmt: skip
    return Response(metrics.render(_collector()), mimetype=CONTENT_TYPE_LATEST)
