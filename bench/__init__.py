"""The benchmark suite of quart-wslb: ``python -m bench`` (see docs/benchmarks.md)."""
