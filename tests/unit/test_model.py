"""The mock devices' tiny transformer: determinism, exact KV handoff, consistency."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from backends.mock import model
from backends.mock.model import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    KVCache,
    TextDecoder,
    TinyConfig,
    TinyTransformer,
    encode,
)
from backends.mock.sampling import sample_token

REPO = Path(__file__).resolve().parents[2]
PROMPT = encode("The KV cache moves between devices; the tokens must not change. ÄÖÜ €")
CONTINUATION = [101, 32, 0xE2, 0x82, 0xAC, 10, 65, 255, EOS_ID, 7, 66, 67]


@pytest.fixture(scope="module")
def tiny() -> TinyTransformer:
    return TinyTransformer()


def decode_all(net: TinyTransformer, cache: KVCache, tokens: list[int]) -> list[np.ndarray]:
    return [net.decode(cache, t) for t in tokens]


def assert_caches_equal(a: KVCache, b: KVCache) -> None:
    assert a.length == b.length
    n = a.length
    assert np.array_equal(a.keys[:, :, :n], b.keys[:, :, :n])
    assert np.array_equal(a.values[:, :, :n], b.values[:, :, :n])


def generate(
    net: TinyTransformer, cache: KVCache, logits: np.ndarray, start: int, steps: int
) -> list[int]:
    """Sampled generation as the engine runs it: token at position p from logits of p."""
    tokens = []
    for position in range(start, start + steps):
        token = sample_token(logits, temperature=0.9, top_p=0.95, seed=2**64 - 1, position=position)
        tokens.append(token)
        logits = net.decode(cache, token)
    return tokens


# --------------------------------------------------------------- tokenizer


def test_encode_is_bos_then_utf8_bytes() -> None:
    assert encode("") == [BOS_ID]
    assert encode("aé€") == [BOS_ID, 0x61, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert VOCAB_SIZE == 258
    assert EOS_ID == 257


def test_decoder_emits_a_multibyte_char_once_complete() -> None:
    decoder = TextDecoder()
    assert [decoder.feed(b) for b in "€".encode()] == ["", "", "€"]
    assert [decoder.feed(b) for b in "😀".encode()] == ["", "", "", "😀"]
    assert decoder.feed(ord("x")) == "x"
    assert decoder.flush() == ""


def test_decoder_round_trips_text() -> None:
    text = "Grüße, 世界! 🚀 tab\tnewline\n"
    decoder = TextDecoder()
    out = "".join(decoder.feed(t) for t in encode(text)) + decoder.flush()
    assert out == text


def test_decoder_replaces_invalid_bytes() -> None:
    decoder = TextDecoder()
    assert decoder.feed(0xFF) == "\ufffd"
    assert decoder.feed(0xE2) == ""
    assert decoder.feed(ord("A")) == "\ufffdA"  # truncated sequence, then the valid byte
    assert decoder.feed(0xC3) == ""
    assert decoder.flush() == "\ufffd"  # incomplete at the end
    assert decoder.feed(ord("b")) == "b"  # usable after a flush


def test_decoder_bos_and_eos_emit_nothing() -> None:
    decoder = TextDecoder()
    assert decoder.feed(BOS_ID) == ""
    assert decoder.feed(0xC3) == ""
    assert decoder.feed(EOS_ID) == ""
    assert decoder.feed(0xA9) == "é"  # a special token does not break a pending char


def test_decoder_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="outside"):
        TextDecoder().feed(VOCAB_SIZE)


# ------------------------------------------------------------ determinism


def test_same_config_gives_bit_identical_logits_and_kv() -> None:
    a, b = TinyTransformer(), TinyTransformer(TinyConfig())
    cache_a, logits_a = a.prefill(PROMPT, 128)
    cache_b, logits_b = b.prefill(PROMPT, 128)
    assert np.array_equal(logits_a, logits_b)
    assert_caches_equal(cache_a, cache_b)
    for la, lb in zip(
        decode_all(a, cache_a, CONTINUATION), decode_all(b, cache_b, CONTINUATION), strict=True
    ):
        assert np.array_equal(la, lb)
    assert cache_a.to_bytes() == cache_b.to_bytes()


@pytest.mark.slow
def test_another_process_computes_the_same_bits(tiny: TinyTransformer) -> None:
    # Same environment (BLAS thread count included), as the device launcher gives.
    code = (
        "import hashlib, json, sys\n"
        "from backends.mock.model import TinyTransformer\n"
        "prompt, continuation = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "net = TinyTransformer()\n"
        "cache, logits = net.prefill(prompt, len(prompt))\n"
        "digest = hashlib.sha256(logits.tobytes())\n"
        "for t in continuation:\n"
        "    digest.update(net.decode(cache, t).tobytes())\n"
        "digest.update(cache.to_bytes())\n"
        "print(digest.hexdigest())\n"
    )
    prompt = encode("cross-process " * 80)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "7"}
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(prompt), json.dumps(CONTINUATION)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cache, logits = tiny.prefill(prompt, len(prompt))
    digest = hashlib.sha256(logits.tobytes())
    for logits in decode_all(tiny, cache, CONTINUATION):
        digest.update(logits.tobytes())
    digest.update(cache.to_bytes())
    assert result.stdout.strip() == digest.hexdigest()


def test_the_seed_changes_the_weights(tiny: TinyTransformer) -> None:
    _, logits = tiny.prefill(PROMPT, len(PROMPT))
    _, other = TinyTransformer(TinyConfig(seed=1)).prefill(PROMPT, len(PROMPT))
    assert not np.allclose(logits, other)


# --------------------------------------------------------- handoff exactness


@pytest.mark.parametrize("capacity", [len(PROMPT), len(PROMPT) + 3, 4096])
def test_handoff_decodes_bit_identically(capacity: int) -> None:
    """Prefill on A, ship the bytes, decode on B == decode on A's own cache."""
    a, b = TinyTransformer(), TinyTransformer()
    cache_a, _ = a.prefill(PROMPT, len(PROMPT) + 40)
    wire = bytearray(cache_a.to_bytes())  # the server assembles chunks in a bytearray
    cache_b = KVCache.from_buffer(b.config, wire, length=len(PROMPT), capacity=capacity)
    for step, token in enumerate(CONTINUATION):
        logits_a, logits_b = a.decode(cache_a, token), b.decode(cache_b, token)
        assert np.array_equal(logits_a, logits_b), f"logits differ at step {step}"
    assert_caches_equal(cache_a, cache_b)


def test_handoff_after_some_decoding(tiny: TinyTransformer) -> None:
    cache_a, _ = tiny.prefill(PROMPT, len(PROMPT))
    decode_all(tiny, cache_a, CONTINUATION[:5])
    wire = memoryview(cache_a.to_bytes())
    cache_b = KVCache.from_buffer(tiny.config, wire, cache_a.length, cache_a.length)
    rest = CONTINUATION[5:]
    for la, lb in zip(
        decode_all(tiny, cache_a, rest), decode_all(tiny, cache_b, rest), strict=True
    ):
        assert np.array_equal(la, lb)


def test_split_request_generates_the_tokens_of_one_device() -> None:
    one_device, prefill_device, decode_device = (TinyTransformer() for _ in range(3))
    prompt = encode("A request is split across two devices.\n")
    steps = 64

    cache, logits = one_device.prefill(prompt, len(prompt) + steps)
    alone = generate(one_device, cache, logits, 0, steps)

    cache_p, logits_p = prefill_device.prefill(prompt, len(prompt) + 1)
    first = sample_token(logits_p, temperature=0.9, top_p=0.95, seed=2**64 - 1, position=0)
    cache_d = KVCache.from_buffer(
        decode_device.config, cache_p.to_bytes(), len(prompt), len(prompt)
    )
    cache_d.ensure_capacity(len(prompt) + steps)
    rest = generate(decode_device, cache_d, decode_device.decode(cache_d, first), 1, steps - 1)
    assert [first, *rest] == alone
    assert len(set(alone)) > 5  # a real sample, not a constant stream


# -------------------------------------------------------------- consistency


def test_decoding_token_by_token_matches_prefill(tiny: TinyTransformer) -> None:
    tokens = PROMPT + CONTINUATION
    full_cache, full_logits = tiny.prefill(tokens, len(tokens))
    cache, logits = tiny.prefill(tokens[:3], 3)
    for token in tokens[3:]:
        logits = tiny.decode(cache, token)
    np.testing.assert_allclose(logits, full_logits, rtol=1e-4, atol=1e-4)
    n = len(tokens)
    np.testing.assert_allclose(cache.keys[:, :, :n], full_cache.keys[:, :, :n], atol=1e-4)
    np.testing.assert_allclose(cache.values[:, :, :n], full_cache.values[:, :, :n], atol=1e-4)


def test_chunked_prefill_attention_matches_one_chunk(
    tiny: TinyTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = encode("chunk boundaries must not leak the future " * 3)
    whole_cache, whole = tiny.prefill(tokens, len(tokens))
    # A budget of 3 queries per chunk: many chunks, each with its own causal mask.
    monkeypatch.setattr(model, "_SCORE_BUDGET_BYTES", 4 * 4 * len(tokens) * 3)
    chunked_cache, chunked = tiny.prefill(tokens, len(tokens))
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked_cache.keys, whole_cache.keys, atol=1e-5)


def test_prefix_logits_ignore_later_tokens(tiny: TinyTransformer) -> None:
    """Causality: the KV of a prefix is the same whatever follows it."""
    short_cache, _ = tiny.prefill(PROMPT[:20], 20)
    long_cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    np.testing.assert_allclose(long_cache.keys[:, :, :20], short_cache.keys[:, :, :20], atol=1e-5)


def test_logits_are_float32_vocab_vectors_of_sane_size(tiny: TinyTransformer) -> None:
    _, logits = tiny.prefill(PROMPT, len(PROMPT))
    cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    decoded = tiny.decode(cache, 65)
    for out in (logits, decoded):
        assert out.dtype == np.float32
        assert out.shape == (VOCAB_SIZE,)
        assert np.isfinite(out).all()
        assert np.abs(out).max() < 50
        assert int(np.argmax(out)) != BOS_ID


# ----------------------------------------------------------------- KV cache


def test_wire_form_is_per_layer_keys_then_values(tiny: TinyTransformer) -> None:
    cache, _ = tiny.prefill(PROMPT, len(PROMPT) + 10)
    n = cache.length
    expected = b"".join(
        part[layer, :, :n].astype("<f4").tobytes()
        for layer in range(tiny.config.layers)
        for part in (cache.keys, cache.values)
    )
    wire = cache.to_bytes()
    assert wire == expected
    c = tiny.config
    assert len(wire) == cache.nbytes_valid == 2 * c.layers * c.n_kv_heads * n * c.head_dim * 4


def test_round_trip_reproduces_keys_and_values(tiny: TinyTransformer) -> None:
    cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    copy = KVCache.from_buffer(tiny.config, cache.to_bytes(), cache.length, cache.length + 7)
    assert copy.capacity == cache.length + 7
    assert_caches_equal(copy, cache)
    assert copy.to_bytes() == cache.to_bytes()
    empty = KVCache.from_buffer(tiny.config, b"", 0, 4)
    assert (empty.length, empty.capacity, empty.to_bytes()) == (0, 4, b"")


@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
def test_wrong_buffer_size_is_rejected(tiny: TinyTransformer, delta: int) -> None:
    cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    wire = cache.to_bytes()
    wrong = wire[:delta] if delta < 0 else wire + bytes(delta)
    with pytest.raises(ValueError, match="KV buffer holds"):
        KVCache.from_buffer(tiny.config, wrong, cache.length, cache.length)


def test_length_beyond_capacity_is_rejected(tiny: TinyTransformer) -> None:
    with pytest.raises(ValueError, match="capacity"):
        KVCache.from_buffer(tiny.config, b"", 1, 0)


def test_ensure_capacity_keeps_the_valid_part(tiny: TinyTransformer) -> None:
    cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    before = cache.to_bytes()
    keys = cache.keys
    cache.ensure_capacity(len(PROMPT) - 1)
    assert cache.keys is keys  # smaller: nothing to do
    cache.ensure_capacity(1000)
    assert cache.capacity == 1000
    assert cache.to_bytes() == before


def test_decode_grows_geometrically_not_per_step(tiny: TinyTransformer) -> None:
    cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    tiny.decode(cache, 65)
    grown = cache.capacity
    assert grown >= 2 * len(PROMPT)
    keys = cache.keys
    for _ in range(grown - cache.length):
        tiny.decode(cache, 66)
    assert cache.keys is keys  # filled the room without reallocating
    assert cache.length == grown


# --------------------------------------------------------------- validation


def test_prefill_validates_its_input(tiny: TinyTransformer) -> None:
    with pytest.raises(ValueError, match="capacity"):
        tiny.prefill(PROMPT, len(PROMPT) - 1)
    with pytest.raises(ValueError, match="non-empty"):
        tiny.prefill([], 4)
    with pytest.raises(ValueError, match="within"):
        tiny.prefill([BOS_ID, VOCAB_SIZE], 4)
    with pytest.raises(ValueError, match="within"):
        tiny.prefill([BOS_ID, -1], 4)


def test_decode_rejects_unknown_tokens(tiny: TinyTransformer) -> None:
    cache, _ = tiny.prefill(PROMPT, len(PROMPT))
    for token in (-1, VOCAB_SIZE):
        with pytest.raises(ValueError, match="outside"):
            tiny.decode(cache, token)
    assert cache.length == len(PROMPT)


# ------------------------------------------------------------------ memory


@pytest.mark.slow
def test_long_prompt_prefill_keeps_temporaries_small(tiny: TinyTransformer) -> None:
    tokens = [BOS_ID, *np.random.default_rng(0).integers(0, 256, 8191).tolist()]
    tracemalloc.start()
    try:
        cache, logits = tiny.prefill(tokens, len(tokens))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.length == 8192
    assert np.isfinite(logits).all()
    assert peak < 100 * 2**20


# ---------------------------------------------------------- batched decode


def clone(net: TinyTransformer, cache: KVCache, capacity: int | None = None) -> KVCache:
    room = cache.length if capacity is None else capacity
    return KVCache.from_buffer(net.config, cache.to_bytes(), cache.length, room)


def random_contexts(net: TinyTransformer, count: int, seed: int) -> list[KVCache]:
    """Caches of 1..400 positions with assorted spare room (growth included)."""
    rng = np.random.default_rng(seed)
    caches = []
    for _ in range(count):
        n = int(rng.integers(1, 401))
        cache, _ = net.prefill([BOS_ID, *rng.integers(0, 256, n - 1).tolist()], n)
        caches.append(clone(net, cache, n + int(rng.integers(0, 3))))
    return caches


def check_batches_match_solo(net: TinyTransformer, seed: int, sizes: list[int]) -> None:
    """Every sequence, in batches of every size and order, gives its solo bits."""
    rng = np.random.default_rng(seed)
    pool = random_contexts(net, max(sizes), seed)
    steps = 3
    tokens = rng.integers(0, VOCAB_SIZE, (len(pool), steps)).tolist()
    solo_caches = [clone(net, cache, cache.length) for cache in pool]
    solo = [
        [net.decode(cache, t) for t in row] for cache, row in zip(solo_caches, tokens, strict=True)
    ]
    for size in sizes:
        members = rng.permutation(len(pool))[:size].tolist()
        caches = {i: clone(net, pool[i], pool[i].length + int(rng.integers(0, 2))) for i in members}
        for step in range(steps):
            # A fresh order and batch split each step: the neighbours keep changing.
            order = rng.permutation(members).tolist()
            cut = int(rng.integers(1, size + 1))
            for part in (order[:cut], order[cut:]):
                if not part:
                    continue
                logits = net.decode_batch(
                    [caches[i] for i in part], [tokens[i][step] for i in part]
                )
                assert logits.shape == (len(part), VOCAB_SIZE)
                assert logits.dtype == np.float32
                for row, i in zip(logits, part, strict=True):
                    assert np.array_equal(row, solo[i][step]), f"seq {i} step {step} size {size}"
        for i in members:
            assert_caches_equal(caches[i], solo_caches[i])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_batch_rows_are_bit_identical_to_solo(tiny: TinyTransformer, seed: int) -> None:
    check_batches_match_solo(
        tiny, seed, [1, 2, 7, 100, int(np.random.default_rng(seed).integers(3, 60))]
    )


@pytest.mark.slow
@pytest.mark.parametrize("threads", [None, "1"])
def test_decode_batch_exactness_with_any_blas_thread_count(threads: str | None) -> None:
    # The devices run with one BLAS thread, the tests with the default: check both.
    code = (
        "from backends.mock.model import TinyTransformer\n"
        "from tests.unit.test_model import check_batches_match_solo\n"
        "check_batches_match_solo(TinyTransformer(), 5, [1, 2, 7, 100])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OPENBLAS_NUM_THREADS", None)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_decode_batch_of_one_is_decode_and_matches_prefill(tiny: TinyTransformer) -> None:
    tokens = PROMPT + CONTINUATION
    cache_a, _ = tiny.prefill(tokens[:3], 3)
    cache_b = clone(tiny, cache_a)
    for token in tokens[3:]:
        single = tiny.decode(cache_a, token)
        batched = tiny.decode_batch([cache_b], [token])
        assert np.array_equal(batched[0], single)
    _, full = tiny.prefill(tokens, len(tokens))
    np.testing.assert_allclose(batched[0], full, rtol=1e-4, atol=1e-4)


def test_decode_batch_grows_each_cache(tiny: TinyTransformer) -> None:
    caches = [clone(tiny, tiny.prefill(PROMPT[:n], n)[0]) for n in (1, 5, 9)]
    tiny.decode_batch(caches, [65, 66, 67])
    assert [c.length for c in caches] == [2, 6, 10]
    assert all(c.capacity >= 16 for c in caches)


def test_decode_batch_from_an_empty_cache(tiny: TinyTransformer) -> None:
    empty = [KVCache.allocate(tiny.config, 0), KVCache.allocate(tiny.config, 4)]
    logits = tiny.decode_batch(empty, [BOS_ID, BOS_ID])
    _, prefilled = tiny.prefill([BOS_ID], 1)
    assert np.array_equal(logits[0], logits[1])
    np.testing.assert_allclose(logits[0], prefilled, rtol=1e-4, atol=1e-4)
    assert tiny.decode_batch([], []).shape == (0, VOCAB_SIZE)


def test_decode_batch_validates_before_touching_any_cache(tiny: TinyTransformer) -> None:
    caches = [clone(tiny, tiny.prefill(PROMPT, len(PROMPT))[0]) for _ in range(2)]
    with pytest.raises(ValueError, match="outside"):
        tiny.decode_batch(caches, [65, VOCAB_SIZE])
    with pytest.raises(ValueError, match="twice"):
        tiny.decode_batch([caches[0], caches[0]], [65, 66])
    with pytest.raises(ValueError, match="token ids"):
        tiny.decode_batch(caches, [65])
    assert [c.length for c in caches] == [len(PROMPT)] * 2
