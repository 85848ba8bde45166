"""The garbage collector in the platform's long-running processes.

A process starts with 110,000-150,000 objects from its imports and set-up (Flask,
SQLAlchemy, Celery, kombu, marshmallow, ...) that live as long as it does. Every full
collection walked all of them: 70-190 ms with every thread of the process stopped, and
under load one came every few seconds, in the middle of a fan-out or a burst of
deliveries (docs/BENCHMARKS.md, "Full collections"). Frozen once set-up is done, they
are left out of every later collection, which then walks only what the process made since.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move everything alive now into the permanent generation; call once set-up is done."""
    gc.collect()  # what startup already dropped is freed, not frozen
    gc.freeze()
