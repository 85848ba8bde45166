"""A local webhook receiver for the retry-storm load test (127.0.0.1 only).

Each notification's `data.mode` decides the answer: `flaky` fails with 500 until the
try number in `X-Attempt` reaches FLAKY_SUCCESS_TRY, then answers 200; `down` always
answers 500; `reject` answers 400. `GET /stats` returns the answers given so far.

    python scripts/k6/receiver.py --port 8099
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLAKY_SUCCESS_TRY = 3


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.answers: Counter[int] = Counter()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                mode = (body.get("data") or {}).get("mode", "flaky")
                attempt = int(self.headers.get("X-Attempt", "1"))
                if mode == "reject":
                    status = 400
                elif mode == "down" or attempt < FLAKY_SUCCESS_TRY:
                    status = 500
                else:
                    status = 200
                with receiver._lock:
                    receiver.answers[status] += 1
                self._answer(status, b"")

            def do_GET(self) -> None:
                with receiver._lock:
                    stats = {str(k): v for k, v in receiver.answers.items()}
                self._answer(200, json.dumps(stats).encode())

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def start(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    receiver = Receiver(args.port)
    print(f"webhook receiver on {receiver.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        receiver.server.serve_forever()


if __name__ == "__main__":
    main()
