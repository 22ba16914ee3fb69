"""Benchmarks (measured, printed, not asserted): ``python -m bigtrain.bench.parallel``."""
