"""Local peers for the external channels: a scripted webhook receiver and an SMTP inbox."""

from __future__ import annotations

import threading
import time
from email import message_from_bytes
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import free_port


class Receiver:
    """A local webhook receiver: each path answers from its own script, then 200."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[tuple[int, dict[str, str], float]]] = {}
        self.calls: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                name = self.path.strip("/")
                with receiver.lock:
                    receiver.calls.setdefault(name, []).append(
                        {
                            "at": time.monotonic(),
                            "wall": time.time(),
                            "headers": dict(self.headers),
                            "body": body,
                        }
                    )
                    script = receiver.scripts.get(name, [])
                    status, headers, delay = script.pop(0) if script else (200, {}, 0.0)
                time.sleep(delay)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{name}"

    def script(self, name: str, *responses: tuple[int, dict[str, str], float]) -> str:
        self.scripts[name] = list(responses)
        return self.url(name)

    def of(self, name: str) -> list[dict]:
        with self.lock:
            return list(self.calls.get(name, []))


class Inbox:
    """aiosmtpd handler keeping every message."""

    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(message_from_bytes(envelope.content, policy=default_policy))
        return "250 OK"
