"""Benchmark scripts: each prints its figures and writes them to benchmarks/results/."""
