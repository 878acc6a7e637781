"""`darkroom.heap.freeze_startup_objects`: start-up objects leave the collector's walks, start-up
garbage is not kept, and what is made later is collected as before.

Each case runs in a child interpreter: freezing this test process would keep every object
pytest holds out of collection for the rest of the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import gc, weakref
    from darkroom.heap import freeze_startup_objects

    class Node:
        def __init__(self):
            self.me = self  # a reference cycle: only the collector frees it

    kept = Node()
    dropped = Node()
    dropped_ref = weakref.ref(dropped)
    del dropped
    gc.disable()  # nothing collects before the call does

    frozen = freeze_startup_objects()
    assert dropped_ref() is None, "start-up garbage was frozen instead of collected"
    assert frozen == gc.get_freeze_count() > 1000, frozen
    assert not any(o is kept for o in gc.get_objects()), "a live start-up object is still walked"

    later = Node()  # a model loaded after the freeze, then unloaded
    later_ref = weakref.ref(later)
    del later
    gc.collect()
    assert later_ref() is None, "a cycle made after the freeze was not collected"
    print("ok", frozen)
    """
)


def test_start_up_objects_are_frozen_and_later_cycles_still_collected() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
