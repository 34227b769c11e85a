"""A tiny but real decoder-only transformer, its KV cache and a byte tokenizer.

Mock devices run this model so that the KV cache handed from a prefill device
to a decode device is real data: a wrong handoff gives wrong tokens, not just a
wrong timing. The model is a miniature Llama: pre-RMSNorm, grouped-query
attention with rotary positions, a SwiGLU MLP and an untied output head.

Everything is float32 and deterministic: the same config gives the same weights
(``np.random.default_rng(config.seed)``), and ``decode`` reads only the valid
part of the cache, so its result does not depend on the cache's capacity or on
which process filled it. The bits do depend on the BLAS kernel (CPU type) and
on the BLAS thread count (OpenBLAS sums long products differently when
threaded): processes that must agree bit for bit need the same numpy build,
CPU type and OPENBLAS_NUM_THREADS, as children of one launcher on one machine
have.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258

Floats = NDArray[np.float32]
_Rotary = tuple[Floats, Floats]  # cos and sin, each (positions, 1, head_dim / 2)

# Wire form of the KV cache: float32, little-endian, whatever the host is.
_WIRE_DTYPE = np.dtype("<f4")
# Bytes of attention scores one prefill chunk may hold; bounds the temporaries
# of a long prompt; larger chunks were measured to be no faster.
_SCORE_BUDGET_BYTES = 4 * 1024 * 1024
_RMS_EPS = 1e-6
# Decode's softmax weights are integers: exp(score - max) * this, rounded.
_WEIGHT_ONE = np.float32(2.0**24)
# The RoPE table is computed in blocks of this many positions.
_ROPE_BLOCK = 256
# Output bias: makes sampled text mostly printable ASCII (readable in demos)
# and keeps BOS from ever being generated; EOS stays rare but possible.
_PRINTABLE_BIAS = 4.0
_NEWLINE_BIAS = 2.0
_BOS_BIAS = -30.0


def encode(text: str) -> list[int]:
    """Token ids of a prompt: BOS, then its UTF-8 bytes (lone surrogates become '?')."""
    return [BOS_ID, *text.encode("utf-8", errors="replace")]


class TextDecoder:
    """Incremental detokenizer: bytes in, text out as soon as characters complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Text completed by this token; a partial UTF-8 sequence is held back."""
        if token_id in (BOS_ID, EOS_ID):
            return ""
        if not 0 <= token_id < 256:
            raise ValueError(f"token id {token_id} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
        return self._decoder.decode(bytes((token_id,)))

    def flush(self) -> str:
        """Whatever is held at the end of the sequence (an incomplete char gives U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


@dataclass(frozen=True)
class TinyConfig:
    layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 16
    ffn_dim: int = 128
    vocab_size: int = VOCAB_SIZE
    rope_theta: float = 10000.0
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (self.layers, self.d_model, self.n_heads, self.n_kv_heads, self.head_dim)
        if min(*sizes, self.ffn_dim) <= 0:
            raise ValueError("model dimensions must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary positions")
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {VOCAB_SIZE} (bytes, BOS, EOS)")


@dataclass(eq=False)
class KVCache:
    """Keys (after RoPE) and values, shape (layers, n_kv_heads, capacity, head_dim).

    Positions [0, length) are valid; the rest is preallocated room for decode.
    """

    keys: Floats
    values: Floats
    length: int = 0

    @classmethod
    def allocate(cls, config: TinyConfig, capacity: int) -> KVCache:
        if capacity < 0:
            raise ValueError(f"KV capacity must be >= 0, got {capacity}")
        shape = (config.layers, config.n_kv_heads, capacity, config.head_dim)
        # np.zeros uses calloc: room reserved for decode costs no memory until used.
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes_valid(self) -> int:
        layers, heads, _, head_dim = (int(n) for n in self.keys.shape)
        return 2 * layers * heads * self.length * head_dim * _WIRE_DTYPE.itemsize

    def to_bytes(self) -> bytes:
        """Wire form: per layer, K[layer, :, :length, :] then V[layer, :, :length, :]."""
        n = self.length
        wire = np.stack((self.keys[:, :, :n], self.values[:, :, :n]), axis=1)
        return wire.astype(_WIRE_DTYPE, copy=False).tobytes()

    @classmethod
    def from_buffer(
        cls,
        config: TinyConfig,
        buffer: bytes | bytearray | memoryview,
        length: int,
        capacity: int,
    ) -> KVCache:
        """Inverse of ``to_bytes``, copied into a cache with room for ``capacity`` positions."""
        if not 0 <= length <= capacity:
            raise ValueError(f"KV length {length} must be within 0..capacity ({capacity})")
        wire_shape = (config.layers, 2, config.n_kv_heads, length, config.head_dim)
        expected = math.prod(wire_shape) * _WIRE_DTYPE.itemsize
        view = memoryview(buffer)
        if view.nbytes != expected:
            raise ValueError(
                f"KV buffer holds {view.nbytes} bytes but {length} positions of layout "
                f"layers={config.layers} kv_heads={config.n_kv_heads} "
                f"head_dim={config.head_dim} float32 need {expected}"
            )
        wire = np.frombuffer(view.cast("B"), dtype=_WIRE_DTYPE).reshape(wire_shape)
        cache = cls.allocate(config, capacity)
        cache.keys[:, :, :length] = wire[:, 0]
        cache.values[:, :, :length] = wire[:, 1]
        cache.length = length
        return cache

    def ensure_capacity(self, capacity: int) -> None:
        """Grow to hold at least ``capacity`` positions, keeping the valid part."""
        if capacity <= self.capacity:
            return
        layers, heads, _, head_dim = self.keys.shape
        keys = np.zeros((layers, heads, capacity, head_dim), np.float32)
        values = np.zeros_like(keys)
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values


@dataclass(frozen=True)
class _ExactWeight:
    """A weight whose columns are each on their own power-of-two grid.

    ``matrix`` (float32, what prefill multiplies by) == ``ints * col_scale``
    exactly, with integer-valued float64 ``ints``. Decode multiplies
    integer-valued activations by ``ints`` in float64: every product and every
    partial sum is an integer below 2**53, so the result is exact whatever
    order BLAS sums in (batch size, kernel, threads, CPU); only the final,
    elementwise rescaling rounds. That is what makes a row's logits
    independent of the rows batched with it.
    """

    matrix: Floats
    ints: NDArray[np.float64]
    col_scale: NDArray[np.float64]  # (N,) powers of two


@dataclass(frozen=True)
class _Layer:
    # RMSNorm gains (initialised to 1) are folded into the projection that
    # follows each norm, and 1/sqrt(head_dim) into the query columns: fewer
    # numpy calls per decoded token, same function.
    w_qkv: _ExactWeight  # (d_model, (n_heads + 2 * n_kv_heads) * head_dim): q, k, v fused
    w_out: _ExactWeight  # (n_heads * head_dim, d_model)
    w_gate_up: _ExactWeight  # (d_model, 2 * ffn_dim): gate and up projections fused
    w_down: _ExactWeight  # (ffn_dim, d_model)


def _rms_norm(x: Floats) -> Floats:
    """RMSNorm without gain (folded into the next projection)."""
    # ndarray.sum, not np.mean: this runs several times per decoded token and
    # np.mean's Python-level overhead is twice the arithmetic.
    mean_square = np.square(x).sum(axis=-1, keepdims=True) * (1.0 / x.shape[-1])
    out: Floats = (x * (1.0 / np.sqrt(mean_square + _RMS_EPS))).astype(np.float32, copy=False)
    return out


def _rope(x: Floats, rope: _Rotary) -> Floats:
    """Rotate-half RoPE; x is (positions, heads, head_dim), cos/sin (positions, 1, head_dim/2)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def _softmax_weighted(scores: Floats, values: Floats) -> Floats:
    """softmax(scores) @ values, normalising after the matmul (fewer divisions).

    Works in place on ``scores``, which the caller no longer needs.
    """
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    out: Floats = np.matmul(scores, values)
    out /= total
    return out


class TinyTransformer:
    def __init__(self, config: TinyConfig = TinyConfig()) -> None:
        self.config = config
        self._group = config.n_heads // config.n_kv_heads
        rng = np.random.default_rng(config.seed)
        d = config.d_model
        self._embed = _normal(rng, (config.vocab_size, d), 1.0)
        # Decode activations as fixed point: a row's largest element gets this many
        # bits; small enough that a d_model row's sum of squares is exact in float64.
        widest = max(config.d_model, config.ffn_dim, config.n_heads * config.head_dim)
        self._row_bits = min(24, (53 - _ceil_log2(widest)) // 2)
        self._layers = tuple(self._init_layer(rng) for _ in range(config.layers))
        # Logits of std ~1 from a unit-RMS hidden state; the bias shapes the output.
        self._head = self._exact(_normal(rng, (d, config.vocab_size), 1.0 / math.sqrt(d)))
        self._head_bias = _output_bias(config.vocab_size)
        half = config.head_dim // 2
        self._inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
        empty = np.empty((0, half), np.float32)
        self._rope_table: tuple[Floats, Floats] = (empty, empty)

    def _init_layer(self, rng: np.random.Generator) -> _Layer:
        c = self.config
        qkv_width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        w_qkv = _normal(rng, (c.d_model, qkv_width), 1.0 / math.sqrt(c.d_model))
        w_qkv[:, : c.n_heads * c.head_dim] *= 1.0 / math.sqrt(c.head_dim)
        # Residual branches scaled down by depth (GPT-2 style) so the residual
        # stream keeps unit-ish RMS however many layers are stacked.
        branch = 1.0 / math.sqrt(2 * c.layers)
        w_out = _normal(rng, (c.n_heads * c.head_dim, c.d_model), branch / math.sqrt(c.d_model))
        w_gate_up = _normal(rng, (c.d_model, 2 * c.ffn_dim), 1.0 / math.sqrt(c.d_model))
        w_down = _normal(rng, (c.ffn_dim, c.d_model), branch / math.sqrt(c.ffn_dim))
        return _Layer(
            w_qkv=self._exact(w_qkv),
            w_out=self._exact(w_out),
            w_gate_up=self._exact(w_gate_up),
            w_down=self._exact(w_down),
        )

    def _exact(self, weight: Floats) -> _ExactWeight:
        """Round each column to a power-of-two grid fine enough for exact decode sums.

        ``rows`` products of a row integer (<= 2**row_bits) and a weight integer
        (<= 2**bits) sum to less than 2**53 when row_bits + bits + log2(rows)
        <= 53: 23 or 24 bits for the default config, float32's own precision.
        """
        bits = min(24, 53 - self._row_bits - _ceil_log2(weight.shape[0]))
        if bits < 8:
            raise ValueError("model too wide for exact float64 decode sums")
        _, exponent = np.frexp(np.abs(weight).max(axis=0))  # column max < 2**exponent
        col_scale = np.ldexp(1.0, exponent - bits)
        ints = np.rint(weight.astype(np.float64) / col_scale)
        return _ExactWeight((ints * col_scale).astype(np.float32), ints, col_scale)

    # ---------------------------------------------------------------- prefill

    def prefill(self, token_ids: Sequence[int], capacity: int) -> tuple[KVCache, Floats]:
        """KV for every prompt position and the float32 logits after the last one."""
        ids = self._check_ids(token_ids)
        n = len(ids)
        if capacity < n:
            raise ValueError(f"KV capacity {capacity} is smaller than the prompt ({n} tokens)")
        cache = KVCache.allocate(self.config, capacity)
        rope = self._rotary(np.arange(n))
        x = self._embed[ids]
        for index in range(self.config.layers):
            # The last layer's outputs matter only at the last position (its K/V
            # are still stored for all), which halves the attention work of a
            # two-layer model.
            first_query = n - 1 if index == self.config.layers - 1 else 0
            x = self._prefill_layer(index, x, cache, rope, first_query=first_query)
        cache.length = n
        return cache, self._logits(x[-1])

    def _prefill_layer(
        self, index: int, x: Floats, cache: KVCache, rope: _Rotary, *, first_query: int
    ) -> Floats:
        """One block over all positions; returns the hidden states from ``first_query`` on."""
        c, layer = self.config, self._layers[index]
        n, qk_heads = x.shape[0], c.n_heads + c.n_kv_heads
        heads = _rms_norm(x) @ layer.w_qkv.matrix
        heads = heads.reshape(n, qk_heads + c.n_kv_heads, c.head_dim)
        qk = _rope(heads[:, :qk_heads], rope)
        cache.keys[index, :, :n] = qk[:, c.n_heads :].transpose(1, 0, 2)
        cache.values[index, :, :n] = heads[:, qk_heads:].transpose(1, 0, 2)
        attn = self._causal_attention(qk[first_query:, : c.n_heads], cache, index, first_query)
        h = x[first_query:] + attn @ layer.w_out.matrix
        return h + self._mlp(layer, h)

    def _causal_attention(self, q: Floats, cache: KVCache, index: int, first: int) -> Floats:
        """Attention of queries at positions [first, first + len), a chunk of positions at a time.

        q is (queries, n_heads, head_dim); returns (queries, n_heads * head_dim).
        """
        c = self.config
        queries = q.shape[0]
        # Query heads grouped per KV head, so K/V are shared without copying.
        grouped = q.transpose(1, 0, 2).reshape(c.n_kv_heads, self._group, queries, c.head_dim)
        chunk = max(1, _SCORE_BUDGET_BYTES // (4 * c.n_heads * (first + queries)))
        out = np.empty((queries, c.n_heads, c.head_dim), np.float32)
        for start in range(0, queries, chunk):
            stop = min(start + chunk, queries)
            heads = self._attention_chunk(grouped[:, :, start:stop], cache, index, first + start)
            out[start:stop] = heads.transpose(1, 0, 2)
        return out.reshape(queries, c.n_heads * c.head_dim)

    def _attention_chunk(self, q: Floats, cache: KVCache, index: int, first: int) -> Floats:
        """Queries at positions [first, first + size) over keys [0, first + size)."""
        kv_heads, group, size, head_dim = q.shape
        end = first + size
        keys = cache.keys[index, :, :end]
        scores = np.matmul(q.reshape(kv_heads, group * size, head_dim), keys.transpose(0, 2, 1))
        # Only the chunk's own block of keys can lie in a query's future.
        future = np.triu(np.full((size, size), -np.inf, np.float32), k=1)
        per_query = scores.reshape(kv_heads, group, size, end)  # a view: matmul output is C-order
        per_query[..., first:] += future
        out = _softmax_weighted(scores, cache.values[index, :, :end])
        return out.reshape(kv_heads * group, size, head_dim)

    # ----------------------------------------------------------------- decode

    def decode(self, cache: KVCache, token_id: int) -> Floats:
        """Append ``token_id`` at position ``cache.length``; float32 logits of the next token.

        A batch of one: the very code ``decode_batch`` runs, so the two cannot drift.
        """
        logits: Floats = self.decode_batch((cache,), (token_id,))[0]
        return logits

    def decode_batch(self, caches: Sequence[KVCache], token_ids: Sequence[int]) -> Floats:
        """``decode`` for many sequences at once: float32 logits (len(caches), vocab).

        A row's logits are bit-identical whatever else is in the batch and
        whatever the batch size: the dense layers sum exactly in fixed point
        (see ``_ExactWeight``), attention over a sequence's cache is BLAS calls
        whose shapes and operands come from that sequence alone, and the rest
        is elementwise or an exact reduction (max, sums of integers).
        """
        c = self.config
        if len(caches) != len(token_ids):
            raise ValueError(f"{len(caches)} caches but {len(token_ids)} token ids")
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("a cache appears twice in the batch")
        for token_id in token_ids:
            if not 0 <= token_id < c.vocab_size:
                raise ValueError(f"token id {token_id} is outside 0..{c.vocab_size - 1}")
        batch = len(caches)
        if batch == 0:
            return np.empty((0, c.vocab_size), np.float32)
        positions = [cache.length for cache in caches]
        for cache, position in zip(caches, positions, strict=True):
            if position >= cache.capacity:
                # Geometric growth: amortised O(1) copies per generated token.
                cache.ensure_capacity(max(2 * cache.capacity, position + 1, 16))
        rope = self._rotary(np.asarray(positions, dtype=np.int64))
        x = self._embed[np.asarray(token_ids, dtype=np.int64)]
        # The new K/V of every layer, written to the caches once at the end
        # (one slice assignment per sequence instead of one per layer).
        new_kv = np.empty((2, batch, c.layers, c.n_kv_heads, c.head_dim), np.float32)
        for index in range(c.layers):
            x = self._decode_layer(
                index, x, caches=caches, positions=positions, rope=rope, new_kv=new_kv
            )
        for b, (cache, position) in enumerate(zip(caches, positions, strict=True)):
            cache.keys[:, :, position] = new_kv[0, b]
            cache.values[:, :, position] = new_kv[1, b]
            cache.length = position + 1
        logits = self._exact_matmul(x, self._head, norm=True)
        logits += self._head_bias
        return logits

    def _decode_layer(
        self,
        index: int,
        x: Floats,
        *,
        caches: Sequence[KVCache],
        positions: list[int],
        rope: _Rotary,
        new_kv: Floats,
    ) -> Floats:
        """One block for each sequence's token at its position; its K/V go to ``new_kv``."""
        c, layer = self.config, self._layers[index]
        batch, qk_heads = x.shape[0], c.n_heads + c.n_kv_heads
        heads = self._exact_matmul(x, layer.w_qkv, norm=True)
        heads = heads.reshape(batch, qk_heads + c.n_kv_heads, c.head_dim)
        qk = _rope(heads[:, :qk_heads], rope)
        q = qk[:, : c.n_heads].reshape(batch, c.n_kv_heads, self._group, c.head_dim)
        new_kv[0, :, index] = qk[:, c.n_heads :]
        new_kv[1, :, index] = heads[:, qk_heads:]
        attn = self._attention(index, q, new_kv[:, :, index], caches, positions)
        h = x + self._exact_matmul(attn, layer.w_out, norm=False)
        gate_up = self._exact_matmul(h, layer.w_gate_up, norm=True)
        return h + self._exact_matmul(self._swiglu(gate_up), layer.w_down, norm=False)

    def _attention(
        self,
        index: int,
        q: Floats,
        new_kv: Floats,
        caches: Sequence[KVCache],
        positions: list[int],
    ) -> Floats:
        """Each query (batch, kv_heads, group, head_dim) over its cache plus its own new K/V.

        Scores are padded to the longest context with -inf. The new key's
        score and value are handled elementwise here, so the cache is only
        read, and a sequence with an empty cache needs no BLAS call.
        """
        batch, kv_heads, group, head_dim = q.shape
        new_k, new_v = new_kv[0][:, :, None, :], new_kv[1][:, :, None, :]
        scores = np.full((batch, kv_heads, group, 1 + max(positions)), -np.inf, np.float32)
        scores[..., 0] = _dot_last(q, new_k)
        for b, cache in enumerate(caches):
            n = positions[b]
            if n:
                keys = cache.keys[index, :, :n].transpose(0, 2, 1)
                np.matmul(q[b], keys, out=scores[b, :, :, 1 : n + 1])
        # Softmax weights as integers (2**24 * exp(score - max), rounded): their
        # float64 sum is exact, so neither the padding nor the reduction order can
        # change it. Weights below 2**-25 of the largest become 0: negligible.
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= _WEIGHT_ONE
        np.rint(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True, dtype=np.float64)
        out = np.zeros((batch, kv_heads, group, head_dim), np.float32)
        for b, cache in enumerate(caches):
            n = positions[b]
            if n:
                values = cache.values[index, :, :n]
                np.matmul(scores[b, :, :, 1 : n + 1], values, out=out[b])
        out += scores[..., :1] * new_v
        out /= total
        return out.reshape(batch, kv_heads * group * head_dim)

    # ---------------------------------------------------------------- helpers

    def _exact_matmul(self, x: Floats, weight: _ExactWeight, *, norm: bool) -> Floats:
        """``x @ weight`` (after a gainless RMSNorm if ``norm``), each row independent of the rest.

        The row becomes integers relative to a power of two above its largest
        element (``row_bits`` bits); with the weight's integers every product
        and partial sum is an integer < 2**53, so BLAS sums exactly in any order.
        The row's sum of squares is exact for the same reason.
        """
        _, exponent = np.frexp(np.abs(x).max(axis=-1, keepdims=True))  # row max < 2**exponent
        unit = np.ldexp(1.0, exponent - self._row_bits)  # float64 powers of two, (rows, 1)
        ints = np.rint(x / unit)
        scale = unit
        if norm:
            squares = np.square(ints).sum(axis=-1, keepdims=True)
            mean_square = squares * (unit * unit) * (1.0 / x.shape[-1])
            scale = unit / np.sqrt(mean_square + _RMS_EPS)
        out = np.matmul(ints, weight.ints)
        out *= scale
        out *= weight.col_scale
        result: Floats = out.astype(np.float32)
        return result

    def _mlp(self, layer: _Layer, x: Floats) -> Floats:
        out: Floats = self._swiglu(_rms_norm(x) @ layer.w_gate_up.matrix) @ layer.w_down.matrix
        return out

    def _swiglu(self, gate_up: Floats) -> Floats:
        gate, up = gate_up[..., : self.config.ffn_dim], gate_up[..., self.config.ffn_dim :]
        # SiLU via tanh: no overflow warnings for large negative gates.
        out: Floats = gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up
        return out

    def _logits(self, x: Floats) -> Floats:
        logits: Floats = _rms_norm(x) @ self._head.matrix + self._head_bias
        return logits

    def _rotary(self, positions: NDArray[np.int64]) -> _Rotary:
        """cos/sin tables (positions, 1, head_dim / 2), shared by prefill and decode."""
        cos, sin = self._rope_table
        needed = int(positions.max()) + 1 if positions.size else 0
        if needed > cos.shape[0]:
            cos, sin = self._grow_rope(needed)
        return cos[positions][:, None, :], sin[positions][:, None, :]

    def _grow_rope(self, needed: int) -> tuple[Floats, Floats]:
        """Extend the table, computing each fixed block of positions in one call.

        Fixed blocks: an entry's bits never depend on which positions were
        asked for first (a vectorised cos may treat an array's tail differently),
        so every process agrees. One tuple assignment: a prefill thread may read it.
        """
        cos, sin = self._rope_table
        have = cos.shape[0]
        stop = max(2 * have, -(-needed // _ROPE_BLOCK) * _ROPE_BLOCK)
        new_cos, new_sin = [cos], [sin]
        for start in range(have, stop, _ROPE_BLOCK):
            block = np.arange(start, start + _ROPE_BLOCK, dtype=np.float64)
            angles = np.outer(block, self._inv_freq)
            new_cos.append(np.cos(angles).astype(np.float32))
            new_sin.append(np.sin(angles).astype(np.float32))
        table = (np.concatenate(new_cos), np.concatenate(new_sin))
        self._rope_table = table
        return table

    def _check_ids(self, token_ids: Sequence[int]) -> NDArray[np.int64]:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("need a non-empty sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be within 0..{self.config.vocab_size - 1}")
        return ids


def _dot_last(a: Floats, b: Floats) -> Floats:
    """sum(a * b, axis=-1) by halving with elementwise adds: a fixed order for any shape."""
    terms = a * b
    while terms.shape[-1] > 1:
        half = terms.shape[-1] // 2
        folded = terms[..., :half] + terms[..., half : 2 * half]
        if terms.shape[-1] % 2:
            folded[..., :1] += terms[..., 2 * half :]
        terms = folded
    out: Floats = terms[..., 0]
    return out


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def _normal(rng: np.random.Generator, shape: tuple[int, int], std: float) -> Floats:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _output_bias(vocab_size: int) -> Floats:
    bias = np.zeros(vocab_size, np.float32)
    bias[0x20:0x7F] = _PRINTABLE_BIAS
    bias[0x0A] = _NEWLINE_BIAS
    bias[BOS_ID] = _BOS_BIAS
    return bias
