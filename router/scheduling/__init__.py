"""Pure scheduling policies: (request features, pool snapshot, time) -> plan. No I/O, no clocks."""
