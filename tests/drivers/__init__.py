"""Driver programs and asyncpg-suite runner for the direct-vs-proxy harness (tests/test_drivers_*.py)."""
