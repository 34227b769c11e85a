"""How a serving engine batches and reports, as the mock devices do and the simulator models."""

from __future__ import annotations

# A prefill iteration takes waiting prompts, oldest first, up to this many tokens in all
# (vLLM's max_num_batched_tokens plays this part).
MAX_PREFILL_BATCH_TOKENS = 16384
# Load reports at most this many cached block hashes (the most recently used): enough to
# route prompts of 256 KiB, while a Load reply stays small whatever the cache holds.
LOAD_PREFIX_HASHES = 4096
