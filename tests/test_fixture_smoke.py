"""The test Postgres itself works: vector is there and drivers reach it."""

import psycopg


def test_postgres_has_pgvector(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector, current_setting('server_version_num')::int"
        ).fetchone()
    assert row is not None
    assert row[0] == 1.0
    assert row[1] >= 180000
