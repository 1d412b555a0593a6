"""Benchmark harness (not part of the test suite): see benchmarks/README.md and docs/benchmarks.md."""
