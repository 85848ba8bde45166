"""Every setting the platform reads, each from one env var, typed and defaulted for development.

The defaults let a newcomer run `make run` and curl the API at once; production sets
`API_KEY`, `JWT_SECRET`, `DATABASE_URL` and `REDIS_URL` explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from app import outbound


def _bool(raw: str) -> bool:
    return raw.strip().lower() in {"1", "true", "yes", "on"}


_COERCE: dict[type, Callable[[str], Any]] = {str: str, int: int, float: float, bool: _bool}


def setting(default: Any, doc: str) -> Any:
    """Declare a setting: its default and what it is for (shown in the README table)."""
    return field(default=default, metadata={"doc": doc})


DEV_API_KEY = "dev-api-key"
DEV_JWT_SECRET = "dev-jwt-secret-change-me-in-production"
DEV_FLOWER_BASIC_AUTH = "admin:admin"


class UnsafeConfig(Exception):
    """Production settings that still hold a development default."""


@dataclass(frozen=True)
class Config:
    NOTIFIER_ENV: str = setting(
        "development",
        "`production` refuses to start with the development API key, JWT secret or Flower "
        "password.",
    )
    DATABASE_URL: str = setting(
        "postgresql+psycopg2://postgres@127.0.0.1:5432/notifier", "PostgreSQL (SQLAlchemy URL)."
    )
    REDIS_URL: str = setting("redis://127.0.0.1:6379/0", "Redis: streams, pub/sub, presence.")
    CELERY_BROKER_URL: str = setting("", "Celery broker; empty means REDIS_URL.")
    API_KEY: str = setting(DEV_API_KEY, "An API key accepted besides the hashed keys in the DB.")
    JWT_SECRET: str = setting(DEV_JWT_SECRET, "HS256 secret for user tokens (32+ bytes).")
    FLOWER_BASIC_AUTH: str = setting(
        DEV_FLOWER_BASIC_AUTH, "Flower's `user:password` (the Procfile passes it to Flower)."
    )
    METRICS_TOKEN: str = setting(
        "", "When set, `GET /metrics` requires `Authorization: Bearer <token>`."
    )
    PORT: int = setting(8000, "HTTP and WebSocket port of `make run`.")

    STREAM_KEY: str = setting("notifications:stream", "Redis Stream every notification goes to.")
    STREAM_GROUP: str = setting("notifier_group", "Consumer group reading the stream.")
    STREAM_BACKLOG_LIMIT: int = setting(
        100_000, "Unprocessed stream entries above which ingest answers 503."
    )
    BACKLOG_CHECK_SECONDS: float = setting(
        0.2, "How long one process reuses a backlog reading before asking Redis again."
    )
    RETRY_AFTER_SECONDS: int = setting(2, "Retry-After sent with a backpressure 503.")

    MAX_CONTENT_LENGTH: int = setting(2 * 1024 * 1024, "Largest accepted request body, bytes.")
    MAX_RECIPIENTS: int = setting(10_000, "Most recipients in one notification.")
    MAX_DATA_BYTES: int = setting(16 * 1024, "Largest `data` object, JSON-encoded bytes.")
    IDEMPOTENCY_TTL_SECONDS: int = setting(24 * 3600, "How long an Idempotency-Key is remembered.")
    RATE_LIMIT_PER_SECOND: int = setting(
        5000, "Requests per second one API key may send on average; 0 turns rate limits off."
    )
    RATE_LIMIT_BURST: int = setting(
        10_000, "Requests one API key may send at once (the window is BURST / RATE seconds)."
    )
    AUTH_FAILURES_PER_MINUTE: int = setting(
        60, "Failed authentications per client address and minute before it gets 429s."
    )
    RATE_LIMIT_STORAGE_URL: str = setting(
        "", "Where rate-limit counts are kept (`redis://...` or `memory://`); empty: REDIS_URL."
    )
    API_KEY_CACHE_SECONDS: float = setting(
        5.0, "How long a process trusts a looked-up API key; bounds how late a revocation bites."
    )

    INGEST_BATCH_MAX: int = setting(500, "Most notifications committed in one ingest transaction.")
    OUTBOX_SWEEP_SECONDS: float = setting(
        5.0, "Beat interval of the scheduler, which streams notifications whose send_at came."
    )
    RECONCILE_SECONDS: float = setting(
        5.0, "Beat interval of the reconciler, which repairs what Redis or a worker lost."
    )
    RECONCILE_GRACE_SECONDS: float = setting(
        15.0,
        "How much older than the stream's oldest waiting entry a notification must be before "
        "the reconciler streams it again for want of deliveries (covers clock skew between "
        "hosts and the time from commit to XADD).",
    )
    RECONCILE_PUSH_AFTER_SECONDS: float = setting(
        10.0,
        "Age at which a websocket delivery still pending for a connected user is pushed again "
        "(its task was lost with a worker or the broker).",
    )
    RECONCILE_LOOKBACK_SECONDS: float = setting(
        3600.0, "How far back the reconciler's very first run looks for lost notifications."
    )
    RECONCILE_BATCH: int = setting(5000, "Rows one reconciler query reads at most.")

    STREAM_CONSUMERS: str = setting(
        "consumer-1", "Comma-separated consumer names the watchdog keeps running."
    )
    STREAM_BATCH: int = setting(500, "Entries read per XREADGROUP.")
    STREAM_BLOCK_MS: int = setting(
        1000, "XREADGROUP BLOCK; kept below the Redis client's 5 s socket timeout."
    )
    STREAM_CLAIM_IDLE_MS: int = setting(
        60_000, "Idle time after which another consumer's pending entry is claimed."
    )
    STREAM_CLAIM_EVERY_SECONDS: float = setting(
        10.0, "How often a consumer looks for entries left pending by dead consumers."
    )
    STREAM_MAX_DELIVERIES: int = setting(
        5, "Times an entry may be handed out before it goes to dead letters."
    )
    STREAM_RUN_SECONDS: float = setting(
        300.0, "How long one consumer task runs before it resubmits itself."
    )
    STREAM_LEASE_SECONDS: float = setting(
        15.0, "Lease a running consumer holds in Redis; the watchdog restarts it once expired."
    )
    STREAM_WATCHDOG_SECONDS: float = setting(5.0, "Beat interval of the consumer watchdog.")
    STREAM_TRIM_SECONDS: float = setting(30.0, "Beat interval of the stream trimmer.")
    DELIVERY_BATCH: int = setting(500, "Most deliveries handled by one delivery task.")
    PRESENCE_TTL_SECONDS: float = setting(
        30.0, "A socket's presence lapses this long after its gateway's last heartbeat."
    )
    PRESENCE_HEARTBEAT_SECONDS: float = setting(
        10.0, "How often a gateway process renews the presence of its sockets."
    )
    WS_PING_SECONDS: float = setting(
        25.0, "Interval of server WebSocket pings (keeps idle sockets alive through proxies)."
    )
    WS_MAX_MESSAGE_BYTES: int = setting(
        64 * 1024, "Largest client frame; larger ones close the socket with 1009."
    )
    TOKEN_MAX_TTL_SECONDS: int = setting(
        7 * 24 * 3600, "Longest lifetime POST /auth/token will mint."
    )

    RETRY_BASE_SECONDS: float = setting(
        2.0, "First retry delay; try n waits RETRY_BASE_SECONDS * 2**(n-1), with jitter."
    )
    RETRY_MAX_DELAY_SECONDS: float = setting(
        1800.0, "Longest delay between tries (kept below the broker's 3,600 s visibility timeout)."
    )
    RETRY_MAX_ATTEMPTS: int = setting(6, "Tries of one delivery before it goes to dead letters.")
    RETRY_JITTER: float = setting(0.2, "Random share (0..1) taken off or added to each delay.")
    RETRY_SWEEP_SECONDS: float = setting(5.0, "Beat interval of the retry sweeper.")
    RETRY_SWEEP_GRACE_SECONDS: float = setting(
        15.0, "How overdue a mirrored retry must be before the sweeper enqueues it again."
    )
    WORKER_HEARTBEAT_SECONDS: float = setting(
        5.0,
        "How often a worker process says it is alive; the retry sweeper takes the tries it "
        "held as lost three intervals after its last heartbeat.",
    )
    ATTEMPT_LEASE_SECONDS: float = setting(
        60.0, "An attempt unfinished this long after it started is taken as lost with its worker."
    )
    WEBHOOK_TIMEOUT_SECONDS: float = setting(10.0, "Timeout of one webhook POST.")
    WEBHOOK_ALLOWED_NETWORKS: str = setting(
        "",
        "Comma-separated CIDRs webhooks may go to besides public addresses (loopback, private "
        "and link-local ones are refused otherwise), e.g. `10.1.0.0/16`.",
    )
    CIRCUIT_FAILURES: int = setting(
        5, "Consecutive retryable failures of a webhook URL that open its circuit."
    )
    CIRCUIT_OPEN_SECONDS: float = setting(
        30.0, "First open window of a circuit; waiting tries return spread over this long."
    )
    CIRCUIT_MAX_OPEN_SECONDS: float = setting(
        600.0, "Longest open window (each failed probe doubles it up to this)."
    )
    WEBHOOK_SIGNING_SECRET: str = setting(
        "", "HMAC secret for webhooks of notifications sent with API_KEY; empty derives one."
    )
    SMTP_URL: str = setting(
        "smtp://127.0.0.1:1025",
        "SMTP server: smtp://[user:pass@]host:port (smtps://, ?starttls=1).",
    )
    SMTP_TIMEOUT_SECONDS: float = setting(10.0, "Timeout of one SMTP conversation.")
    EMAIL_FROM: str = setting("notifier@localhost", "From address of notification emails.")
    ESCALATION_SWEEP_SECONDS: float = setting(
        5.0, "Beat interval of the check for un-acked notifications due for fallback."
    )

    TEMPLATE_CACHE_SECONDS: float = setting(
        2.0, "How long an API process reuses a template it read (PUTs elsewhere show after it)."
    )
    TEMPLATE_RENDER_SECONDS: float = setting(
        0.05,
        "Wall time one notification's template rendering (every locale and part) may take; "
        "a template or parameters that need longer get a 422.",
    )
    CRITICAL_CATEGORIES: str = setting(
        "security",
        "Comma-separated categories whose `priority: high` notifications ignore users' mutes "
        "and quiet hours.",
    )

    LOG_LEVEL: str = setting(
        "INFO", "Level of the platform's own loggers; DEBUG adds a line per notification per step."
    )
    LOG_FORMAT: str = setting("text", "`text`, or `json` for one JSON object per line.")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Config:
        """Read every setting from `environ` (default os.environ), then apply `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        overrides = overrides or {}
        for f in fields(cls):
            raw = overrides.get(f.name, environ.get(f.name))
            if raw is not None:
                values[f.name] = _COERCE[type(f.default)](raw) if isinstance(raw, str) else raw
        return cls(**values)

    def __post_init__(self) -> None:
        # A mistyped network must stop the start, not fail every webhook request later.
        try:
            outbound.parse_networks(self.WEBHOOK_ALLOWED_NETWORKS)
        except ValueError as exc:
            raise ValueError(f"WEBHOOK_ALLOWED_NETWORKS: {exc}") from None

    def refuse_unsafe(self) -> None:
        """In production, refuse development secrets, naming each one still set."""
        if self.NOTIFIER_ENV != "production":
            return
        unsafe = [
            name
            for name, value, dev in (
                ("API_KEY", self.API_KEY, DEV_API_KEY),
                ("JWT_SECRET", self.JWT_SECRET, DEV_JWT_SECRET),
                ("FLOWER_BASIC_AUTH", self.FLOWER_BASIC_AUTH, DEV_FLOWER_BASIC_AUTH),
            )
            if value == dev
        ]
        if unsafe:
            raise UnsafeConfig(
                "NOTIFIER_ENV=production refuses to start with development defaults: set "
                + ", ".join(unsafe)
            )

    @property
    def webhook_networks(self) -> tuple[outbound.Network, ...]:
        return outbound.parse_networks(self.WEBHOOK_ALLOWED_NETWORKS)

    @property
    def broker_url(self) -> str:
        return self.CELERY_BROKER_URL or self.REDIS_URL

    @property
    def critical_categories(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.CRITICAL_CATEGORIES.split(",") if c.strip())

    @property
    def consumer_names(self) -> list[str]:
        return [n.strip() for n in self.STREAM_CONSUMERS.split(",") if n.strip()]

    @classmethod
    def documented(cls) -> list[tuple[str, Any, str]]:
        """(name, default, doc) for every setting."""
        return [(f.name, f.default, f.metadata["doc"]) for f in fields(cls)]
