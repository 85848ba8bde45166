"""Webhook and email deliveries: one try per task, every try a row, retries, dead letters.

A try runs in three steps:
1. claim: insert its (delivery, channel, attempt) row, committed before anything is sent.
   A copy of the task that finds the row already there sends nothing: the try finished
   (make sure its follow-up is scheduled), is running elsewhere (leave it), or started
   longer than ATTEMPT_LEASE_SECONDS ago without finishing, so its worker died: that try
   is recorded as lost and the next one is scheduled, never the same one again;
2. send, outside any transaction; a webhook whose URL's circuit is open is not sent and
   the try fails fast (tasks/circuit.py);
3. record the outcome, and after that commit schedule the next try or write the dead
   letter, then drop the try's mirror in the retry ZSET.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import shared_task
from flask import current_app
from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app import metrics, preferences
from app.config import Config
from app.routing import CHANNEL_TASK
from models import (
    AttemptOutcome,
    Channel,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Notification,
    User,
)
from models.base import utcnow
from tasks import retries
from tasks.circuit import Circuits
from tasks.email import SmtpServer, compose, send_email
from tasks.outcome import Outcome
from tasks.webhook import post_webhook, signing_secret

log = logging.getLogger(__name__)

TASK = CHANNEL_TASK
EXTERNAL = (Channel.WEBHOOK.value, Channel.EMAIL.value)


@dataclass(frozen=True)
class Job:
    """Everything one try needs, read in the claim transaction."""

    delivery_id: int
    channel: str
    attempt: int
    user_id: str
    address: str
    payload: dict[str, Any]
    secret: str


Sender = Callable[[Job, Config], Outcome]


def send_job(job: Job, cfg: Config) -> Outcome:
    if job.channel == Channel.WEBHOOK.value:
        return post_webhook(
            job.address,
            job.payload,
            job.secret,
            idempotency_key=f"{job.payload['id']}:{job.delivery_id}",
            attempt=job.attempt,
            timeout=cfg.WEBHOOK_TIMEOUT_SECONDS,
            networks=cfg.webhook_networks,
        )
    msg = compose(
        cfg.EMAIL_FROM,
        job.address,
        job.payload,
        message_id=f"<{job.payload['id']}.{job.delivery_id}@notifier>",
    )
    return send_email(SmtpServer.from_url(cfg.SMTP_URL), msg, cfg.SMTP_TIMEOUT_SECONDS)


def payload_of(n: Notification, d: Delivery) -> dict[str, Any]:
    """What a webhook receives (and an email is built from): in the recipient's language."""
    title, body, lang, extra = n.title, n.body, n.lang, {}
    if n.renditions and d.lang in n.renditions["locales"]:
        rendition = n.renditions["locales"][d.lang]
        title, body, lang = rendition.get("title"), rendition.get("body"), d.lang
        if d.channel == Channel.EMAIL.value:
            extra = {k: rendition[k] for k in ("email_subject", "email_html") if rendition.get(k)}
    return {
        "id": str(n.id),
        "user_id": d.user_id,
        "channel": d.channel,
        "title": title,
        "body": body,
        "data": n.data,
        "priority": str(n.priority),
        "category": n.category,
        "lang": lang,
        "created_at": n.created_at.isoformat(),
        **extra,
    }


@dataclass
class Result:
    state: str  # sent | retry | failed | skipped | done | running | lost | deferred | expired
    next_attempt: int | None = None
    delay: float | None = None
    # Set when a try ended: what the metrics and logs file it under.
    channel: str | None = None
    notification_id: str | None = None
    # The webhook URL the try went (or would have gone) to: its circuit.
    endpoint: str | None = None


COUNTED = {"sent", "retry", "failed", "skipped", "lost", "deferred", "expired", "held"}


class Attempts:
    """Runs tries of external-channel deliveries against one engine and Redis."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        client: redis.Redis,
        sender: Sender = send_job,
        send: retries.Send = retries.celery_send,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.redis = client
        self.sender = sender
        self.send = send
        self.circuits = Circuits(
            client, cfg.CIRCUIT_FAILURES, cfg.CIRCUIT_OPEN_SECONDS, cfg.CIRCUIT_MAX_OPEN_SECONDS
        )

    @staticmethod
    def args(delivery_id: int, attempt: int, endpoint: str | None = None) -> list[Any]:
        """The task's arguments; a known webhook endpoint rides along and names the try's
        retry ZSET member."""
        return [delivery_id, attempt, endpoint] if endpoint else [delivery_id, attempt]

    def schedule(
        self, delivery_id: int, attempt: int, delay: float, endpoint: str | None = None
    ) -> None:
        retries.schedule(
            self.redis, TASK, self.args(delivery_id, attempt, endpoint), delay, self.send,
            max_countdown=self.cfg.RETRY_MAX_DELAY_SECONDS,
            grace=self.cfg.RETRY_SWEEP_GRACE_SECONDS,
        )  # fmt: skip

    def hold_delay(self, until: float) -> float:
        """Until the circuit half-opens, plus a random share of a window: the held tries
        come back spread out, not all at once."""
        return max(0.0, until - time.time()) + random.uniform(0, self.cfg.CIRCUIT_OPEN_SECONDS)

    def hold(self, delivery_ids: list[int], endpoint: str, until: float) -> None:
        """First tries for an endpoint whose circuit is open: straight to the ZSET."""
        for delivery_id in delivery_ids:
            retries.schedule(
                self.redis, TASK, self.args(delivery_id, 1, endpoint), self.hold_delay(until),
                self.send, max_countdown=0.0, grace=self.cfg.RETRY_SWEEP_GRACE_SECONDS,
            )  # fmt: skip

    def run(self, delivery_id: int, attempt: int, endpoint: str | None = None) -> Result:
        current = self.args(delivery_id, attempt, endpoint)
        result, job = self._claim(delivery_id, attempt)
        if job is not None:
            webhook = job.channel == Channel.WEBHOOK.value
            until = self.circuits.open_until(job.address) if webhook else None
            if until is not None:
                result = self._fail_fast(job, until)
            else:
                outcome = self.sender(job, self.cfg)
                opened = self._trip(job, outcome)
                result = self._finish(job, outcome)
                if opened is not None and result.next_attempt is not None:
                    result.delay = max(result.delay or 0.0, self.hold_delay(opened))
            result.endpoint = job.address if webhook else None
        if result.next_attempt is not None:
            held = result.state == "held"
            retries.schedule(
                self.redis, TASK, self.args(delivery_id, result.next_attempt, result.endpoint),
                result.delay or 0.0, self.send,
                max_countdown=0.0 if held else self.cfg.RETRY_MAX_DELAY_SECONDS,
                grace=self.cfg.RETRY_SWEEP_GRACE_SECONDS,
            )  # fmt: skip
        # A try put off to later was re-armed in the ZSET just now, maybe as this member.
        rearmed = result.next_attempt is not None and current == self.args(
            delivery_id, result.next_attempt, result.endpoint
        )
        if result.state != "running" and not rearmed:
            retries.done(self.redis, TASK, current)
        self._count(delivery_id, attempt, result)
        return result

    def _fail_fast(self, job: Job, until: float) -> Result:
        """A try whose endpoint's circuit is open: not sent, but counted like a failed one,
        its next try no sooner than the circuit half-opens. A receiver that stays down
        gets no requests, and its deliveries still end in dead letters after their last
        try instead of waiting for it forever."""
        when = datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds")
        # The hold goes in as the receiver's Retry-After would: the next try's due time in
        # PostgreSQL is then the hold's, which the reconciler goes by after a Redis loss.
        hold = self.hold_delay(until)
        result = self._finish(
            job,
            Outcome.retry(f"not sent: this webhook URL's circuit is open until {when}", hold),
        )
        if result.next_attempt is not None:
            result.state = "held"
            result.delay = max(result.delay or 0.0, hold)
        return result

    def _trip(self, job: Job, outcome: Outcome) -> float | None:
        """Feed a webhook try's outcome to its endpoint's circuit; the open-until time if
        this failure opened it."""
        if job.channel != Channel.WEBHOOK.value:
            return None
        try:
            if outcome.ok or not outcome.retryable:
                # Any answer but a retryable failure shows the receiver is up.
                self.circuits.succeeded(job.address)
                return None
            opened = self.circuits.failed(job.address)
        except redis.RedisError:
            log.warning("could not update the circuit of %s", job.address)
            return None
        if opened is not None:
            metrics.count(self.redis, "circuits_opened")
            log.warning("circuit of webhook %s opened until %.0f", job.address, opened)
        return opened

    def _count(self, delivery_id: int, attempt: int, result: Result) -> None:
        if result.state not in COUNTED or result.channel is None:
            return
        retried = result.state in ("retry", "lost")
        metrics.count_many(
            self.redis,
            [
                ("deliveries", (result.channel, result.state), 1),
                ("retries_scheduled", (result.channel,), int(retried)),
                ("dead_letters", (result.channel,), int(result.state == "failed")),
            ],
        )
        levels = {"sent": logging.DEBUG, "skipped": logging.INFO, "failed": logging.WARNING}
        log.log(
            levels.get(result.state, logging.INFO),
            "%s try %d: %s",
            result.channel,
            attempt,
            result.state,
            extra={
                "notification_id": result.notification_id,
                "delivery_id": delivery_id,
                "channel": result.channel,
            },
        )

    # -- step 1 ---------------------------------------------------------------------------

    def _claim(self, delivery_id: int, attempt: int) -> tuple[Result, Job | None]:
        now = utcnow()
        with Session(self.engine) as db, db.begin():
            row = db.execute(
                select(Delivery, Notification)
                .join(Notification, Notification.id == Delivery.notification_id)
                .where(Delivery.id == delivery_id)
            ).first()
            if row is None:
                return Result("done"), None
            d, n = row
            if d.status != DeliveryStatus.PENDING or attempt < d.series_start:
                return Result("done"), None
            user = db.get(User, d.user_id)
            held = self._held_back(db, d, n, user, attempt, now)
            if held is not None:
                return held, None
            address = self._address(d, n, user)
            claimed = db.scalar(
                pg_insert(DeliveryAttempt)
                .values(delivery_id=d.id, channel=d.channel, attempt=attempt, started_at=now)
                .on_conflict_do_nothing()
                .returning(DeliveryAttempt.id)
            )
            if claimed is None:
                return self._already_claimed(db, d, attempt, now), None
            if address is None:
                what = "email address" if d.channel == Channel.EMAIL.value else "webhook_url"
                error = f"user {d.user_id!r} has no {what}"
                self._close_attempt(db, d.id, attempt, AttemptOutcome.FAILED, error, now)
                db.execute(
                    update(Delivery)
                    .where(Delivery.id == d.id)
                    .values(status=DeliveryStatus.SKIPPED, last_error=error)
                )
                return Result(
                    "skipped", channel=d.channel, notification_id=str(d.notification_id)
                ), None
            secret = signing_secret(db, self.cfg, n.api_key_name)
            job = Job(
                d.id, d.channel, attempt, d.user_id, address,
                payload_of(n, d), secret,
            )  # fmt: skip
        return Result("claimed"), job

    def _held_back(
        self,
        db: Session,
        d: Delivery,
        n: Notification,
        user: User | None,
        attempt: int,
        now: datetime,
    ) -> Result | None:
        """Expired, muted, or within quiet hours: this try is not sent now (and not counted)."""
        mark = str(n.id)
        if n.expires_at is not None and n.expires_at <= now:
            db.execute(
                update(Delivery)
                .where(Delivery.id == d.id)
                .values(status=DeliveryStatus.EXPIRED, last_error="expired before it was sent")
            )
            return Result("expired", channel=d.channel, notification_id=mark)
        if user is None:
            return None
        critical = self.cfg.critical_categories
        if preferences.is_muted(user.muted, n.category, d.channel, str(n.priority), critical):
            db.execute(
                update(Delivery)
                .where(Delivery.id == d.id)
                .values(
                    status=DeliveryStatus.SKIPPED,
                    last_error=f"muted by the user: {d.channel} for category {n.category!r}",
                )
            )
            return Result("skipped", channel=d.channel, notification_id=mark)
        until = preferences.deferral(
            now, d.channel, user.timezone, user.quiet_start, user.quiet_end,
            override=preferences.overrides(n.category, str(n.priority), critical),
        )  # fmt: skip
        if until is None:
            return None
        db.execute(update(Delivery).where(Delivery.id == d.id).values(deferred_until=until))
        # The same try, later: quiet hours do not use up one of the delivery's tries.
        delay = (until - now).total_seconds()
        return Result("deferred", attempt, delay, d.channel, mark)

    @staticmethod
    def _address(d: Delivery, n: Notification, user: User | None) -> str | None:
        if d.channel == Channel.WEBHOOK.value:
            return n.webhook_url or (user.webhook_url if user else None)
        return user.email if user else None

    def _already_claimed(self, db: Session, d: Delivery, attempt: int, now: datetime) -> Result:
        prev = db.execute(
            select(DeliveryAttempt).where(
                DeliveryAttempt.delivery_id == d.id,
                DeliveryAttempt.channel == d.channel,
                DeliveryAttempt.attempt == attempt,
            )
        ).scalar_one()
        if prev.finished_at is not None:
            if prev.outcome in (AttemptOutcome.RETRY, AttemptOutcome.LOST):
                # Crashed between recording the try and scheduling the next: schedule it now
                # (a second copy of the next try is harmless).
                due = prev.next_retry_at or now
                return Result("done", attempt + 1, max(0.0, (due - now).total_seconds()))
            return Result("done")
        if prev.started_at > now - timedelta(seconds=self.cfg.ATTEMPT_LEASE_SECONDS):
            return Result("running")
        error = "the worker running this try was lost before it finished"
        log.warning("delivery %s try %s: %s", d.id, attempt, error)
        return self._after_failure(db, d, attempt, Outcome.retry(error), now, AttemptOutcome.LOST)

    # -- step 3 ---------------------------------------------------------------------------

    def _finish(self, job: Job, outcome: Outcome) -> Result:
        now = utcnow()
        with Session(self.engine) as db, db.begin():
            d = db.get(Delivery, job.delivery_id)
            assert d is not None
            if outcome.ok:
                self._close_attempt(db, d.id, job.attempt, AttemptOutcome.SUCCESS, None, now)
                db.execute(
                    update(Delivery)
                    .where(Delivery.id == d.id)
                    .values(status=DeliveryStatus.SENT, sent_at=now, last_error=None)
                )
                return Result("sent", channel=d.channel, notification_id=str(d.notification_id))
            return self._after_failure(db, d, job.attempt, outcome, now, None)

    def _after_failure(
        self,
        db: Session,
        d: Delivery,
        attempt: int,
        outcome: Outcome,
        now: datetime,
        as_outcome: AttemptOutcome | None,
    ) -> Result:
        tries = attempt - d.series_start + 1
        if outcome.retryable and tries < self.cfg.RETRY_MAX_ATTEMPTS:
            delay = retries.retry_delay(self.cfg, tries, outcome.retry_after)
            self._close_attempt(
                db, d.id, attempt, as_outcome or AttemptOutcome.RETRY, outcome.error, now,
                next_retry_at=now + timedelta(seconds=delay),
            )  # fmt: skip
            db.execute(update(Delivery).where(Delivery.id == d.id).values(last_error=outcome.error))
            return Result(
                "lost" if as_outcome else "retry", attempt + 1, delay, d.channel,
                str(d.notification_id),
            )  # fmt: skip
        self._close_attempt(
            db, d.id, attempt, as_outcome or AttemptOutcome.FAILED, outcome.error, now
        )
        db.execute(
            update(Delivery)
            .where(Delivery.id == d.id)
            .values(status=DeliveryStatus.FAILED, last_error=outcome.error)
        )
        dead_letter(db, d, outcome.error or "failed")
        return Result("failed", channel=d.channel, notification_id=str(d.notification_id))

    @staticmethod
    def _close_attempt(
        db: Session,
        delivery_id: int,
        attempt: int,
        outcome: AttemptOutcome,
        error: str | None,
        now: datetime,
        next_retry_at: datetime | None = None,
    ) -> None:
        db.execute(
            update(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id, DeliveryAttempt.attempt == attempt)
            .values(finished_at=now, outcome=outcome, error=error, next_retry_at=next_retry_at)
        )


def dead_letter(db: Session, d: Delivery, error: str) -> None:
    """Copy a delivery that failed for good to the dead letters, with this series' tries."""
    n = db.get(Notification, d.notification_id)
    assert n is not None
    history = [
        {
            "attempt": a.attempt,
            "started_at": a.started_at.isoformat(),
            "finished_at": a.finished_at.isoformat() if a.finished_at else None,
            "outcome": str(a.outcome) if a.outcome else None,
            "error": a.error,
        }
        for a in db.execute(
            select(DeliveryAttempt)
            .where(
                DeliveryAttempt.delivery_id == d.id,
                DeliveryAttempt.attempt >= d.series_start,
            )
            .order_by(DeliveryAttempt.attempt)
        ).scalars()
    ]
    db.execute(
        pg_insert(DeadLetter).values(
            source=d.channel,
            notification_id=d.notification_id,
            delivery_id=d.id,
            user_id=d.user_id,
            payload=payload_of(n, d),
            error=error,
            attempts=len(history),
            history=history,
        )
    )


def attempts_from_app() -> Attempts:
    return Attempts(
        current_app.config["NOTIFIER"],
        current_app.extensions["db.engine"],
        current_app.extensions["redis"],
    )


@shared_task(name=TASK, ignore_result=True)
def deliver(delivery_id: int, attempt: int = 1, endpoint: str | None = None) -> str:
    return attempts_from_app().run(delivery_id, attempt, endpoint).state
