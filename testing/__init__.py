"""Fixtures shared by the tests and the benchmarks, not shipped by the wheel.

`testing.postgres` (a real Postgres 18 with pgvector), `testing.proxy` (the real proxy as a
subprocess) and `testing.tiny_models` (seeded random models of every pipeline architecture,
built offline). pyproject.toml's package list leaves this package out; tests/test_layering.py
checks that no shipped package imports it, and that benchmarks import it rather than `tests`.
"""
