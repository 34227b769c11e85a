"""The cyclic garbage collector, set for a server whose heap is mostly start-up's.

With CPython's thresholds (700, 10, 10) a young collection runs every 700 container
allocations, and a request on the HTTP door's split path makes thousands: the
collector took about 15% of the router's CPU under saturated load (py-spy,
``gc_collect_main``; bench/README.md, "Where the HTTP door's CPU goes"). Almost nothing
a request makes is cyclic garbage: reference counting frees it. So once the router
serves, what start-up made (modules, the pool, compiled protobuf and pydantic schemas)
is moved to the permanent generation, which no collection walks, and the youngest
generation waits for ``gc_gen0_threshold`` allocations. Cycles are still collected,
later; the older generations keep CPython's thresholds.
"""

from __future__ import annotations

import gc

from router.logging import get_logger

log = get_logger(__name__)


def tune_for_serving(gen0_threshold: int) -> None:
    """Freezes what exists now and sets the youngest generation's threshold; 0 leaves
    the collector as it is."""
    if gen0_threshold == 0:
        return
    gc.collect()  # start-up's cyclic garbage goes now, not into the frozen heap
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.debug("garbage collector tuned", frozen=gc.get_freeze_count(), gen0=gen0_threshold)
