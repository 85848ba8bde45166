"""Small helpers shared by tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text


def count_rows(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(f'SELECT count(*) FROM "{table}"')))


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
