"""The vector database workflow over BBC News, through the proxy with the real all-MiniLM-L6-v2.

Embeddings are made by `CREATE TABLE ... AS SELECT pgml.embed(...)::vector` through the proxy, indexed
with pgvector's hnsw and ivfflat, and searched with an embedded query. A sports query must return
sports articles first, and the order must equal the order computed here with numpy from the stored
vectors (exactly without an index; the approximate indexes' recall is reported).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from tests.fix_proxy import ProxyProcess

pytestmark = pytest.mark.slow

MODEL = "all-MiniLM-L6-v2"
QUERY = "the striker scored twice as the football club won the league match"


@pytest.fixture(scope="module")
def bbc(proxy: ProxyProcess) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        [(table, rows)] = conn.execute("SELECT * FROM pgml.load_dataset('bbc_news')").fetchall()
        assert (table, rows) == ("pgml.bbc_news", 2225)
        conn.execute("DROP TABLE IF EXISTS bbc_embeddings")
        # Headline and opening words only: enough to place an article, and quick on two cores.
        conn.execute(
            f"CREATE TABLE bbc_embeddings AS SELECT left(text, 80) AS title, category, "
            f"pgml.embed('{MODEL}', left(text, 300))::vector(384) AS embedding FROM pgml.bbc_news"
        )
        yield conn
        conn.execute("DROP TABLE IF EXISTS bbc_embeddings")


def _exact_order(conn: psycopg.Connection[tuple[object, ...]], k: int) -> list[str]:
    """The k nearest titles by cosine distance, computed with numpy from the stored vectors."""
    [qvec] = conn.execute(f"SELECT pgml.embed('{MODEL}', %s)", [QUERY]).fetchone() or []
    rows = conn.execute("SELECT title, embedding::real[] FROM bbc_embeddings").fetchall()
    titles = [str(r[0]) for r in rows]
    mat = np.asarray([r[1] for r in rows], dtype=np.float64)
    q = np.asarray(qvec, dtype=np.float64)
    dist = 1 - (mat @ q) / (np.linalg.norm(mat, axis=1) * np.linalg.norm(q))
    return [titles[i] for i in np.argsort(dist, kind="stable")[:k]]


def _search(conn: psycopg.Connection[tuple[object, ...]], k: int) -> list[tuple[str, str]]:
    rows = conn.execute(
        f"SELECT title, category FROM bbc_embeddings "
        f"ORDER BY embedding <=> pgml.embed('{MODEL}', %s)::vector LIMIT {k}",
        [QUERY],
    ).fetchall()
    return [(str(t), str(c)) for t, c in rows]


def test_stored_embeddings_are_vectors(bbc: psycopg.Connection[tuple[object, ...]]) -> None:
    [(typ, n, dims)] = bbc.execute(
        "SELECT format_type(atttypid, atttypmod), (SELECT count(*) FROM bbc_embeddings),"
        " (SELECT vector_dims(embedding) FROM bbc_embeddings LIMIT 1)"
        " FROM pg_attribute WHERE attrelid = 'bbc_embeddings'::regclass AND attname = 'embedding'"
    ).fetchall()
    assert (typ, n, dims) == ("vector(384)", 2225, 384)


def test_sports_query_returns_sports_first(bbc: psycopg.Connection[tuple[object, ...]]) -> None:
    found = _search(bbc, 10)
    categories = [c for _, c in found]
    assert categories[0] == "sports", found
    assert categories.count("sports") >= 8, found


def test_order_equals_numpy_without_index(bbc: psycopg.Connection[tuple[object, ...]]) -> None:
    exact = _exact_order(bbc, 10)
    assert [t for t, _ in _search(bbc, 10)] == exact


@pytest.mark.parametrize("method", ["hnsw", "ivfflat"])
def test_index_order_and_recall(
    bbc: psycopg.Connection[tuple[object, ...]], pg_dsn: str, method: str
) -> None:
    """With an index the proxy's order equals Postgres's own for the same vector; recall is reported."""
    exact = _exact_order(bbc, 10)
    options = " WITH (lists = 20)" if method == "ivfflat" else ""
    bbc.execute(
        f"CREATE INDEX bbc_idx ON bbc_embeddings USING {method} (embedding vector_cosine_ops){options}"
    )
    # ivfflat's lists come from a k-means with random starts: more probes keep recall steady.
    settings = "SET LOCAL enable_seqscan = off; SET LOCAL ivfflat.probes = 5"
    try:
        with bbc.transaction():
            bbc.execute(settings)
            # EXPLAIN through the proxy shows its own plan, then the upstream's: the index is used.
            plan = "\n".join(
                str(r[0])
                for r in bbc.execute(
                    f"EXPLAIN SELECT title FROM bbc_embeddings ORDER BY embedding <=> "
                    f"pgml.embed('{MODEL}', %s)::vector LIMIT 10",
                    [QUERY],
                ).fetchall()
            )
            assert "bbc_idx" in plan, plan
            found = [t for t, _ in _search(bbc, 10)]
        [qvec] = bbc.execute(f"SELECT pgml.embed('{MODEL}', %s)::vector::text", [QUERY]).fetchone() or []
        with psycopg.connect(pg_dsn) as direct, direct.transaction():
            direct.execute(settings)
            rows = direct.execute(
                "SELECT title FROM bbc_embeddings ORDER BY embedding <=> %s::vector LIMIT 10", [qvec]
            ).fetchall()
        assert found == [str(r[0]) for r in rows]
        recall = len(set(found) & set(exact)) / len(exact)
        print(f"{method} recall@10 against the exact order: {recall:.2f}")
        assert recall >= 0.5
    finally:
        bbc.execute("DROP INDEX bbc_idx")
