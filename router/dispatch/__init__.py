"""Runs a plan: prefill, KV handoff, decode; fallbacks and cancellation."""
