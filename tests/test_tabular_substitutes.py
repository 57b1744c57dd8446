"""`[runtime.tabular.dataset_substitutes]`: offline stand-ins for hub datasets, under the asked name."""

from __future__ import annotations

import psycopg
import pytest

from core.errors import ConfigError
from runtime.tabular import TabularRuntime
from tests.test_tabular_support import Notes, tab_dsn

__all__ = ["tab_dsn"]  # the fixture, re-exported so pytest finds it here


def test_unknown_generator_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"dataset_substitutes\.imdb.*unknown generator 'nope'"):
        TabularRuntime("postgresql://unused", {"dataset_substitutes": {"imdb": "nope"}})


async def test_substitute_is_loaded_under_the_asked_name(tab_dsn: str) -> None:
    rt = TabularRuntime(tab_dsn, {"pool_size": 1, "dataset_substitutes": {"imdb": "generated_reviews"}})
    await rt.start()
    try:
        notes = Notes()
        [[row]] = await rt.call_batch("load_dataset", [{"source": "imdb", "limit": 50}], notes.ctx)
        assert row == ("pgml.imdb", 50)
        assert any("offline substitute 'generated_reviews'" in line for line in notes.lines), notes.lines
    finally:
        await rt.close()
    with psycopg.connect(tab_dsn) as conn:
        labels = conn.execute(
            "SELECT label, count(*) FROM pgml.imdb GROUP BY label ORDER BY label"
        ).fetchall()
        columns = conn.execute(
            "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute"
            " WHERE attrelid = 'pgml.imdb'::regclass AND attnum > 0"
        ).fetchone()
    assert labels == [(0, 25), (1, 25)]
    assert columns == (["text", "label"],)
