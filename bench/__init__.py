"""Benchmarks (not part of the product); see bench/README.md."""
