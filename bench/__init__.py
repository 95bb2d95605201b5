"""Benchmarks: each module has run(quick) -> markdown; bench.run writes docs/benchmarks.md."""
