"""How a serving engine batches and reports, as the mock devices do and the simulator models."""

from __future__ import annotations

from collections.abc import Iterable

# A prefill iteration takes waiting prompts, oldest first, up to this many tokens in all
# (vLLM's max_num_batched_tokens plays this part).
MAX_PREFILL_BATCH_TOKENS = 16384
# Load reports at most this many cached block hashes (the most recently used): enough to
# route prompts of 256 KiB, while a Load reply stays small whatever the cache holds.
LOAD_PREFIX_HASHES = 4096


def prefill_batch_size(
    waiting: Iterable[tuple[int, int]], kv_tokens_used: int, kv_tokens_capacity: int
) -> int:
    """How many of the waiting prompts, oldest first, the next prefill iteration takes.

    ``waiting`` yields each prompt's (prompt tokens, KV tokens it reserves). The first
    that does not fit, in the KV capacity or in the batch's token budget, ends the
    batch: first come, first served, no overtaking. A prompt longer than the budget
    still goes alone. 0: no prefill iteration now (a decode step, or idle).
    """
    taken = batch_tokens = 0
    for prompt_tokens, reserved_tokens in waiting:
        if kv_tokens_used + reserved_tokens > kv_tokens_capacity:
            break
        if taken and batch_tokens + prompt_tokens > MAX_PREFILL_BATCH_TOKENS:
            break
        kv_tokens_used += reserved_tokens
        batch_tokens += prompt_tokens
        taken += 1
    return taken
