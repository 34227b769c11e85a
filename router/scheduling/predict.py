"""Predicted TTFT, TPOT and cost of serving a request colocated or split.

The model follows how the devices run (backends/mock/engine.py, and vLLM's default
scheduler): prefill first, first come first served. So a new prompt waits for the prompt
tokens queued ahead of it, then its own (uncached) prefill; its first token is out when
that prefill ends, on the prefill device even when split. Its later tokens come one
decode iteration apart on the decode device, an iteration batching every running
sequence, stretched by the prefills that device runs in between (a colocated device
prefills newcomers ahead of decoding) and, when split, by the KV transfer and the hop
spread over the output. Costs are the device-seconds the request occupies (a decode
iteration shared by its batch) at the device's price; the marginal cost prices each
device's seconds by its load as well (``Context.load``): on a fleet one has already
paid for, an idle device's time costs nothing more, a full one's costs its price.

These are estimates from the snapshot: what is queued and running now, not what will
arrive. They rank options and catch requests already late; they are not promises.
"""

from __future__ import annotations

from router.scheduling.context import Context
from router.scheduling.plan import Prediction
from router.scheduling.snapshot import BackendView


def colocated(view: BackendView, ctx: Context) -> Prediction | None:
    perf = view.perf
    prefill = ctx.prefill_s(view)
    step = ctx.step_s(view)
    share = ctx.decode_share_s(view)
    if perf is None or prefill is None or step is None or share is None:
        return None
    waiting = view.queue_wait_s
    tpot = step + waiting / max(ctx.features.max_tokens - 1, 1)
    load = ctx.load(view)
    cost = perf.price_per_second_usd * (prefill + share)
    return Prediction(waiting + prefill, tpot, cost, cost * _priced(load), load, load)


def split(prefill: BackendView, decode: BackendView, ctx: Context) -> Prediction | None:
    p_perf, d_perf = prefill.perf, decode.perf
    p_time = ctx.prefill_s(prefill)
    step = ctx.step_s(decode)
    share = ctx.decode_share_s(decode)
    if p_perf is None or d_perf is None or p_time is None or step is None or share is None:
        return None
    features = ctx.features
    handoff = p_perf.transfer_s(features.prompt_tokens, d_perf) + ctx.split_overhead_s
    tpot = step + (decode.queue_wait_s + handoff) / max(features.max_tokens - 1, 1)
    p_cost = p_perf.price_per_second_usd * p_time
    d_cost = d_perf.price_per_second_usd * share
    p_load, d_load = ctx.load(prefill), ctx.load(decode)
    marginal = p_cost * _priced(p_load) + d_cost * _priced(d_load)
    return Prediction(
        prefill.queue_wait_s + p_time, tpot, p_cost + d_cost, marginal, p_load, d_load
    )


# The least share of its price a device's time costs however idle it is: among idle
# devices the cheaper hardware still wins.
MIN_PRICED_LOAD = 0.05


def _priced(load: float) -> float:
    return load if load > MIN_PRICED_LOAD else MIN_PRICED_LOAD
