"""Benchmark scripts for the reenactment model (run as `python -m benchmarks.<name>`)."""
