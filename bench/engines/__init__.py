"""The real-engine tier: vLLM's CPU build installed, started and measured on 127.0.0.1."""
