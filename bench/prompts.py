"""Prompt text of a given length for live runs: seeded, so a seed gives the same prompt.

The lengths and arrivals of what the benchmark sends come from router.sim.workload,
shared with the simulator; a live run also needs the words.
"""

from __future__ import annotations

import numpy as np

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


def prompt_text(prompt_tokens: int, seed: int) -> str:
    """ASCII prose of exactly ``prompt_tokens`` UTF-8 bytes, the same for the same seed.

    The text never ends in a space: servers that strip trailing whitespace would
    otherwise shorten the prompt by a token and skew the length the run reports.
    """
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    rng = np.random.default_rng(seed)
    # Every word plus its space takes at least 2 bytes, so this many always suffice.
    picks = rng.integers(0, len(_WORDS), prompt_tokens // 2 + 1)
    text = " ".join(_WORDS[i] for i in picks)[:prompt_tokens]
    if text.endswith(" "):
        text = text[:-1] + "s"
    return text
