"""What both Triton models do at start-up, outside Triton (no ``triton_python_backend_utils`` needed)."""

from __future__ import annotations

import gc
import weakref

from peftserve.triton.startup import freeze_startup_objects


class Node:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self) -> None:
        self.itself = self


def test_startup_objects_leave_full_collections_after_garbage_is_collected() -> None:
    garbage = Node()
    collected = weakref.ref(garbage)
    del garbage
    alive = Node()
    try:
        freeze_startup_objects()
        assert collected() is None, "garbage made before start-up ended must be freed, not frozen"
        assert gc.get_freeze_count() > 0
        assert not any(tracked is alive for tracked in gc.get_objects()), "a live object still walked by the GC"
        later = Node()
        assert any(tracked is later for tracked in gc.get_objects()), "objects made later are collected as before"
    finally:
        gc.unfreeze()
