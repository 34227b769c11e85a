"""Prompt text of a given length for live runs: seeded, so a seed gives the same prompt.

The lengths and arrivals of what the benchmark sends come from router.sim.workload,
shared with the simulator; a live run also needs the words. A request with a block hash
chain (a Mooncake trace's ``hash_ids``, or a shared prefix group) gets text whose blocks
repeat exactly where its ids do, so the same trace exercises prefix caching on mock
devices and real engines as it does in the simulator.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from router.sim.workload import RequestSpec

# Short, common words so the text looks like prose to anything that inspects it, and
# pure lowercase ASCII so one character is one byte is one token for the mock model.
_VOCABULARY = (
    "the of and to in is it that for on was with as at by be this from or an are not but "
    "have one all were they we can there their been has more will would when if no out so "
    "what up about into them some time only other than then its also two new these may "
    "first any like now such most over well made after even where back use way many day "
    "a i go see work long find here thing give part take place year small every good"
)
_WORDS = tuple(_VOCABULARY.split())
# Block texts come from streams of their own, apart from every prompt_text seed.
_BLOCK_STREAM = 0xB10C


def prompt_text(prompt_tokens: int, seed: int) -> str:
    """ASCII prose of exactly ``prompt_tokens`` UTF-8 bytes, the same for the same seed.

    The text never ends in a space: servers that strip trailing whitespace would
    otherwise shorten the prompt by a token and skew the length the run reports.
    """
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    text = _words(np.random.default_rng(seed), prompt_tokens)
    if text.endswith(" "):
        text = text[:-1] + "s"
    return text


def _words(rng: np.random.Generator, length: int) -> str:
    # Every word plus its space takes at least 2 bytes, so this many always suffice.
    picks = rng.integers(0, len(_WORDS), length // 2 + 1)
    return " ".join(_WORDS[i] for i in picks)[:length]


def block_text(block_id: int, tokens: int) -> str:
    """The text of one chain block: ``tokens`` bytes of prose, the same for the same id and
    length whatever the request, and another for another id. It ends in a letter, so a
    prompt that ends with a whole block needs no change at its end."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    text = _words(np.random.default_rng([_BLOCK_STREAM, block_id, tokens]), tokens)
    return text[:-1] + "s" if text.endswith(" ") else text


def chained_prompt(
    spec: RequestSpec, seed: int, blocks: MutableMapping[tuple[int, int], str] | None = None
) -> str:
    """The prompt of ``spec`` (one byte per token, one byte short for the mock's BOS):
    chain block *i* is bytes ``[i * size, (i + 1) * size)``, the :func:`block_text` of
    its id (cut where the prompt ends), so two prompts whose chains share their first
    *k* ids share their first *k* blocks of text and no more; the bytes after the chain
    are the request's own, seeded by ``seed``. ``blocks`` caches block texts."""
    chain, size = spec.prefix_chain()
    length = max(spec.prompt_tokens - 1, 1)
    cache: MutableMapping[tuple[int, int], str] = {} if blocks is None else blocks
    parts = []
    for position, value in enumerate(chain):
        start = position * size
        if start >= length:
            break
        text = cache.get((value, size))
        if text is None:
            text = cache[(value, size)] = block_text(value, size)
        parts.append(text[: length - start])
    covered = min(len(chain) * size, length)
    if covered < length:
        parts.append(prompt_text(length - covered, seed))
    prompt = "".join(parts)
    # Servers that strip a trailing space would shorten the prompt by a token. Only a
    # block cut short ends in one, and it ends every prompt with its id (an id names
    # its tokens): all of them get the same letter.
    return prompt[:-1] + "s" if prompt.endswith(" ") else prompt
