"""hetero-router: LLM generation across heterogeneous accelerators."""

__version__ = "0.1.0"
