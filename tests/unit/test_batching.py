"""The batching decision the mock engine makes and the simulator replays."""

from __future__ import annotations

from backends.perf.batching import MAX_PREFILL_BATCH_TOKENS, prefill_batch_size


def test_prompts_join_oldest_first_while_they_fit_the_kv_capacity() -> None:
    waiting = [(100, 150), (100, 150), (100, 150)]
    assert prefill_batch_size(waiting, kv_tokens_used=0, kv_tokens_capacity=1000) == 3
    assert prefill_batch_size(waiting, kv_tokens_used=600, kv_tokens_capacity=1000) == 2
    assert prefill_batch_size(waiting, kv_tokens_used=900, kv_tokens_capacity=1000) == 0


def test_no_prompt_overtakes_one_that_does_not_fit() -> None:
    waiting = [(100, 150), (100, 900), (10, 20)]
    assert prefill_batch_size(waiting, kv_tokens_used=0, kv_tokens_capacity=1000) == 1


def test_the_token_budget_ends_a_batch_but_a_long_prompt_still_goes_alone() -> None:
    half = MAX_PREFILL_BATCH_TOKENS // 2
    capacity = 10 * MAX_PREFILL_BATCH_TOKENS
    waiting = [(half, half), (half, half), (1, 1)]
    assert prefill_batch_size(waiting, 0, capacity) == 2
    too_long = [(2 * MAX_PREFILL_BATCH_TOKENS, 2 * MAX_PREFILL_BATCH_TOKENS), (1, 1)]
    assert prefill_batch_size(too_long, 0, capacity) == 1


def test_nothing_waiting_means_no_prefill_iteration() -> None:
    assert prefill_batch_size([], kv_tokens_used=0, kv_tokens_capacity=1000) == 0
