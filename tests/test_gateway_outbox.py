"""A socket's outbox: high-priority live frames jump what is still queued (pure data, no I/O)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from app.gateway import RESYNC, Live, Socket


def _drain(s: Socket) -> list[str]:
    out = []
    while (message := s.next_message()) is not None:
        out.append(message.id if isinstance(message, Live) else message["type"])
    return out


def test_high_priority_frames_go_before_queued_low_ones_and_keep_their_own_order():
    s = Socket(SimpleNamespace(event=threading.Event()), "u1")
    for i in range(3):
        s.push(Live(f"low{i}", "{}", 0.0))
    s.push(RESYNC)
    s.push(Live("high0", "{}", 0.0, high=True))
    s.push(Live("high1", "{}", 0.0, high=True))

    assert _drain(s) == ["high0", "high1", "low0", "low1", "low2", "__resync__"]
    assert s.ws.event.is_set()
