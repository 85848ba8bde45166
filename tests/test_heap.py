from __future__ import annotations

import gc

from app import heap


def _in_collected_generations(obj: object) -> bool:
    return any(o is obj for generation in range(3) for o in gc.get_objects(generation))


def test_objects_alive_at_set_up_are_left_out_of_later_collections():
    kept = [[i] for i in range(3)]
    assert all(_in_collected_generations(o) for o in kept)
    try:
        heap.freeze_startup_objects()

        assert gc.get_freeze_count() > 0
        assert not any(_in_collected_generations(o) for o in kept)
        made_later = [0]
        assert _in_collected_generations(made_later)
    finally:
        gc.unfreeze()
