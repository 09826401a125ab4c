"""Measurement tooling apart from the library: benchmarks, the support matrix and their reports."""
