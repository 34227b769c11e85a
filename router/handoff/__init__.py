"""Moving KV between backends: direct (the decode side pulls) or relayed by the router."""
