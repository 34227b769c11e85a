"""The blocks a simulated prompt's prefix cache lookups name: stand-ins for
``backends.prefix.block_hashes``, derived from the request's block hash chain.

A cache block is ``BLOCK_TOKENS`` prompt tokens, cut from the prompt's start, and only
a whole one is cacheable (as an engine caches full KV blocks only). A request's chain
(:meth:`router.sim.workload.RequestSpec.prefix_chain`) names its leading tokens in
blocks of its own size, 512 tokens in Mooncake's traces; its ids are prefix-chained:
equal ids, equal tokens up to the end of that block. So a cache block whose last token
lies in chain block *i* is named by (id *i*, where in block *i* it ends): two prompts
give it one name exactly when they agree up to its end. Where the chain's blocks are a
multiple of the cache's, that is (id, sub-block index). Cache blocks past the chain
are the request's own and named after the request, matching nothing.
"""

from __future__ import annotations

from router.sim.device import BLOCK_TOKENS
from router.sim.workload import RequestSpec

__all__ = ["prompt_blocks"]

# Chain blocks are named from 2**62 up, each (id, end offset) once: offsets below 2**32.
_CHAIN_BASE = 1 << 62
_OFFSET_BITS = 32
# A request's own blocks: (request index, block index), below 2**62 for 2**30 requests.
_OWN_BITS = 32


def prompt_blocks(index: int, spec: RequestSpec) -> tuple[int, ...]:
    """One name per whole cache block of request ``index``'s prompt, in prompt order."""
    chain, chain_tokens = spec.prefix_chain()
    prompt = spec.prompt_tokens
    covered = min(len(chain) * chain_tokens, prompt)
    names: list[int] = []
    for position, value in enumerate(chain):
        start = position * chain_tokens
        end = min(start + chain_tokens, covered)
        # The cache blocks ending in (start, end]: those ending at m * BLOCK_TOKENS.
        first_end = (start // BLOCK_TOKENS + 1) * BLOCK_TOKENS
        if first_end > end:
            continue
        base = _CHAIN_BASE + (value << _OFFSET_BITS) - start
        names.extend(range(base + first_end, base + end + 1, BLOCK_TOKENS))
    shared = len(names)  # covered // BLOCK_TOKENS
    own = index << _OWN_BITS
    names.extend(range(own + shared, own + prompt // BLOCK_TOKENS))
    return tuple(names)
