"""Benchmark harness: load generation, workloads, statistics, scenarios."""
