"""The email channel: one SMTP message per delivery, plain text with an HTML alternative."""

from __future__ import annotations

import html
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tasks.outcome import Outcome


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int
    tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> SmtpServer:
        """smtp://[user:pass@]host[:port][?starttls=1] or smtps://..."""
        parts = urlsplit(url)
        if parts.scheme not in {"smtp", "smtps"} or not parts.hostname:
            raise ValueError(f"SMTP_URL must be smtp://host:port or smtps://host:port, not {url!r}")
        tls = parts.scheme == "smtps"
        starttls = parse_qs(parts.query).get("starttls", ["0"])[0].lower() in {"1", "true", "yes"}
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if tls else 25),
            tls=tls,
            starttls=starttls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def compose(sender: str, to: str, payload: dict[str, Any], message_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = payload.get("email_subject") or payload.get("title") or "Notification"
    msg["From"] = sender
    msg["To"] = to
    # The same id on every try of one delivery: mail systems drop the repeats.
    msg["Message-ID"] = message_id
    msg["X-Notification-Id"] = str(payload["id"])
    body = payload.get("body") or ""
    msg.set_content(body)
    if payload.get("email_html"):
        # A template's email_html, rendered with autoescaping: parameters arrive as text.
        msg.add_alternative(payload["email_html"], subtype="html")
        return msg
    title = html.escape(payload.get("title") or "")
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in body.split("\n\n") if p)
    msg.add_alternative(
        f"<!doctype html><html><body><h1>{title}</h1>{paragraphs}</body></html>", subtype="html"
    )
    return msg


def send_email(server: SmtpServer, msg: EmailMessage, timeout: float) -> Outcome:
    try:
        if server.tls:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                server.host, server.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            smtp = smtplib.SMTP(server.host, server.port, timeout=timeout)
        with smtp:
            if server.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if server.username:
                smtp.login(server.username, server.password or "")
            smtp.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        error = f"recipient refused: {exc.recipients}"[:500]
        # 4xx is "try again later"; 5xx is final.
        return (
            Outcome.retry(error) if all(400 <= c < 500 for c in codes) else Outcome.permanent(error)
        )
    except smtplib.SMTPResponseException as exc:
        error = f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"[:500]
        return Outcome.retry(error) if 400 <= exc.smtp_code < 500 else Outcome.permanent(error)
    except (TimeoutError, smtplib.SMTPException, OSError) as exc:
        return Outcome.retry(f"SMTP unreachable: {type(exc).__name__}: {exc}"[:500])
    return Outcome.success()
