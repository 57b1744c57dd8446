"""What a PostgresML user reaches for on day one (issue 12), through the real proxy with psycopg.

The extension's types and version; vector functions that do not underflow on real
embeddings; a chat given as an array of messages is one conversation; streaming from a
model whose tokenizer returns token_type_ids; generation options in the task object;
a WARNING for every option accepted but not applied; predict on a multi-dimensional
array column (pgml.digits), as a column and as a row.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from testing.tiny_models import build_all
from tests.fix_proxy import ROOT, ProxyProcess

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def day_proxy(proxy_factory: Callable[..., ProxyProcess],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tiny = build_all(ROOT / ".cache" / "tiny-models")
    folder = tmp_path_factory.mktemp("dayone")
    # A decoder that takes no token_type_ids (Llama), with a tokenizer that returns them.
    typed = folder / "models" / "llama-typed"
    shutil.copytree(tiny / "llama-chat", typed)
    tok_config = json.loads((typed / "tokenizer_config.json").read_text())
    tok_config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (typed / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = folder / "config.toml"
    config.write_text(
        "[proxy]\npool_size = 8\n\n[runtime]\n"
        f'models_dir = "{folder / "models"}"\ncache_dir = "{folder / "cache"}"\nengine = "torch"\n\n'
        "[runtime.aliases]\n"
        f'"tiny-chat" = "{tiny / "llama-chat"}"\n"tiny-gpt2" = "{tiny / "gpt2"}"\n'
    )
    proxy = proxy_factory(config=config)
    yield proxy
    proxy.stop()


@pytest.fixture
def conn(day_proxy: ProxyProcess) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(day_proxy.dsn(), autocommit=True) as c:
        yield c


def one(conn: psycopg.Connection[tuple[object, ...]], sql: str, *params: object) -> object:
    row = conn.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0]


def warnings_of(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(f"{d.severity} {d.message_primary}"))
    conn.execute(sql).fetchall()
    return [s for s in seen if s.startswith("WARNING")]


# --- the SQL surface -------------------------------------------------------------------------------
def test_the_extension_types_exist(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    assert one(conn, "SELECT 'embedding'::pgml.task::text") == "embedding"
    labels: dict[str, Any] = {t: one(conn, f"SELECT enum_range(NULL::pgml.{t})::text[]")
              for t in ("task", "sampling", "strategy", "runtime")}
    assert {"regression", "classification", "text_generation", "embedding"} <= set(labels["task"])
    assert labels["sampling"] == ["random", "last", "stratified"]
    assert labels["strategy"] == ["new_score", "best_score", "most_recent", "rollback", "specific"]
    assert labels["runtime"] == ["python", "rust"]


def test_version_is_the_extensions(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    assert one(conn, "SELECT pgml.version()") == "2.10.0"


def test_vector_functions_do_not_underflow(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    tiny = "ARRAY[1e-30, 1]::real[]"  # 1e-30 squared is below real's range: float4 math raised
    assert one(conn, f"SELECT pgml.cosine_similarity({tiny}, {tiny})") == pytest.approx(1.0)
    assert one(conn, f"SELECT pgml.dot_product({tiny}, {tiny})") == pytest.approx(1.0)
    assert one(conn, f"SELECT pgml.multiply({tiny}, {tiny})") == [0.0, 1.0]
    assert one(conn, f"SELECT pgml.norm_l2({tiny})") == pytest.approx(1.0)
    # The issue's own statement, on real MiniLM embeddings.
    close = one(conn, f"SELECT pgml.cosine_similarity(pgml.embed('{MINILM}', 'The cat sat on the mat'),"
                      f" pgml.embed('{MINILM}', 'a cat on a mat')) > 0.3")
    assert close is True


def test_utility_functions_answer_for_the_proxys_python(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    import importlib.metadata
    import sys

    assert one(conn, "SELECT pgml.python_version()") == sys.version
    assert one(conn, "SELECT pgml.python_package_version('numpy')") == importlib.metadata.version("numpy")
    with pytest.raises(psycopg.errors.UndefinedObject):
        one(conn, "SELECT pgml.python_package_version('no-such-package-xyz')")
    freeze = [r[0] for r in conn.execute("SELECT * FROM pgml.python_pip_freeze()").fetchall()]
    assert f"numpy=={importlib.metadata.version('numpy')}" in freeze
    assert one(conn, "SELECT pgml.validate_python_dependencies()") is True
    assert one(conn, "SELECT pgml.clear_gpu_cache()") in (True, False)
    version = importlib.metadata.version('pgml-proxy')
    assert one(conn, "SELECT pgml.proxy_version()") == f"pgml-proxy {version}"


# --- transform ------------------------------------------------------------------------------------
def test_a_chat_array_is_one_conversation(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    task = json.dumps({"task": "conversational", "model": "tiny-chat"})
    messages = [json.dumps(m) for m in CHAT]
    out = one(conn, "SELECT pgml.transform(task => %s::jsonb, inputs => %s::jsonb[],"
                    " args => '{\"max_new_tokens\": 4}'::jsonb)", task, messages)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)


def test_transform_stream_with_token_type_ids(conn: psycopg.Connection[tuple[object, ...]],
                                              day_proxy: ProxyProcess) -> None:
    task = json.dumps({"task": "text-generation", "model": "llama-typed"})
    rows = conn.execute("SELECT * FROM pgml.transform_stream(task => %s::jsonb, args => "
                        "'{\"max_new_tokens\": 4}'::jsonb, input => 'hello there')", (task,)).fetchall()
    assert rows and all(isinstance(r[0], str) for r in rows)


def test_generation_options_in_the_task_are_honoured(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    sql = "SELECT pgml.transform(task => %s::jsonb, args => %s::jsonb, inputs => ARRAY['hello'])"
    in_task = one(conn, sql, json.dumps({"task": "text-generation", "model": "tiny-gpt2", "max_tokens": 2,
                                         "repetition_penalty": 1.5, "do_sample": False, "temperature": 0.1,
                                         "top_p": 0.9, "top_k": 5}), "{}")
    in_args = one(conn, sql, json.dumps({"task": "text-generation", "model": "tiny-gpt2"}),
                  json.dumps({"max_new_tokens": 2, "repetition_penalty": 1.5, "do_sample": False,
                              "temperature": 0.1, "top_p": 0.9, "top_k": 5}))
    longer = one(conn, sql, json.dumps({"task": "text-generation", "model": "tiny-gpt2", "max_tokens": 12,
                                        "repetition_penalty": 1.5}), "{}")
    assert in_task == in_args and in_task != longer
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        one(conn, sql, json.dumps({"task": "text-classification", "temperature": 0.5}), "{}")


def test_ignored_options_get_a_warning(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    task = json.dumps({"task": "text-generation", "model": "tiny-gpt2", "torch_dtype": "float16",
                       "device_map": "auto", "load_in_8bit": True, "token": "hf_x"})
    warned = warnings_of(conn, f"SELECT pgml.transform(task => '{task}'::jsonb, inputs => ARRAY['a', 'b'],"
                               " args => '{\"max_new_tokens\": 1}'::jsonb, cache => true)")
    for option in ("torch_dtype", "device_map", "load_in_8bit", "token", "cache"):
        assert sum(f'"{option}"' in w for w in warned) == 1, (option, warned)
    warned = warnings_of(conn, f"SELECT pgml.embed('{MINILM}', 'x', '{{\"batch_size\": 8}}'::jsonb)")
    assert len(warned) == 1 and '"batch_size" is ignored' in warned[0]
    assert warnings_of(conn, f"SELECT pgml.embed('{MINILM}', 'x')") == []


# --- tabular --------------------------------------------------------------------------------------
def test_train_runtime_gets_a_warning(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("DROP TABLE IF EXISTS dayone_rt")
    conn.execute("CREATE TABLE dayone_rt AS SELECT g::float8 AS x, (2 * g + 1)::float8 AS y"
                 " FROM generate_series(1, 40) g")
    warned = warnings_of(conn, "SELECT * FROM pgml.train('dayone_rt', 'regression', 'dayone_rt', 'y',"
                               " runtime => 'rust')")
    assert any("runtime 'rust' is ignored" in w for w in warned), warned


@pytest.fixture(scope="module")
def digits(day_proxy: ProxyProcess) -> str:
    with psycopg.connect(day_proxy.dsn(), autocommit=True) as c:
        c.execute("SELECT * FROM pgml.load_dataset('digits')").fetchall()
        c.execute("SELECT * FROM pgml.train('Handwritten Digit Image Classifier', 'classification',"
                  " 'pgml.digits', 'target')").fetchall()
    return "Handwritten Digit Image Classifier"


def test_predict_on_a_multidimensional_array(
    conn: psycopg.Connection[tuple[object, ...]], digits: str
) -> None:
    rows = conn.execute("SELECT target, pgml.predict(%s, image) FROM pgml.digits ORDER BY ctid LIMIT 50",
                        (digits,)).fetchall()
    assert len(rows) == 50 and sum(str(t) == str(round(float(str(p)))) for t, p in rows) >= 40
    by_star = conn.execute("SELECT target, pgml.predict(%s, d.*) FROM pgml.digits d ORDER BY ctid LIMIT 50",
                           (digits,)).fetchall()
    assert [p for _, p in by_star] == [p for _, p in rows]


def test_predict_on_a_bare_row_reference(conn: psycopg.Connection[tuple[object, ...]], digits: str) -> None:
    rows = conn.execute("SELECT pgml.predict(%s, image) FROM pgml.digits ORDER BY ctid LIMIT 5", (digits,))
    by_row = conn.execute("SELECT pgml.predict(%s, d) FROM pgml.digits d ORDER BY ctid LIMIT 5", (digits,))
    assert by_row.fetchall() == rows.fetchall()


# --- planner positions ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs(day_proxy: ProxyProcess) -> str:
    with psycopg.connect(day_proxy.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS dayone_docs")
        c.execute("CREATE TABLE dayone_docs (id int, body text)")
        c.execute("INSERT INTO dayone_docs VALUES (1, 'one two\n\nthree four\n\nfive'), (2, 'alpha beta'),"
                  " (3, NULL), (4, 'gamma\n\ndelta')")
    return "dayone_docs"


SPLIT = "'character', body, '{\"chunk_size\": 4, \"chunk_overlap\": 0}'"


def test_set_returning_call_in_a_select_list(conn: psycopg.Connection[tuple[object, ...]], docs: str) -> None:
    # Postgres expands a set-returning call in a select list: the same rows as the LATERAL form.
    lateral = conn.execute(f"SELECT id, c.chunk_index, c.chunk FROM {docs}, LATERAL pgml.chunk({SPLIT}) c"
                           " ORDER BY 1, 2").fetchall()
    assert len(lateral) == 6
    fields = conn.execute(f"SELECT id, (c).chunk_index, (c).chunk FROM (SELECT id, pgml.chunk({SPLIT}) AS c"
                          f" FROM {docs}) s ORDER BY 1, 2").fetchall()
    assert fields == lateral
    bare = conn.execute(f"SELECT id, pgml.chunk({SPLIT}) FROM {docs} ORDER BY 1").fetchall()
    assert [r[0] for r in bare] == [r[0] for r in lateral]
    description = conn.execute(f"SELECT id, pgml.chunk({SPLIT}) FROM {docs}").description
    assert description is not None and description[1].name == "chunk"
    # As korvus writes it: in a CTE, beside a data-modifying CTE, read back by field.
    korvus = conn.execute(
        f"WITH new AS (SELECT id, pgml.chunk({SPLIT}) AS chunk_t FROM {docs} WHERE id = ANY(%s)),"
        " gone AS (DELETE FROM dayone_docs WHERE false RETURNING id)"
        " SELECT id, (chunk_t).chunk_index, (chunk_t).chunk FROM new ORDER BY 1, 2", ([1, 4],)
    ).fetchall()
    assert korvus == [r for r in lateral if r[0] in (1, 4)]
    # The temporary tables behind it are gone.
    temp = "SELECT count(*) FROM pg_class WHERE relname LIKE 'pgml\\_%' AND relpersistence = 't'"
    assert one(conn, temp) == 0


def test_embed_over_an_aggregate_zips_with_unnest(conn: psycopg.Connection[tuple[object, ...]],
                                                  docs: str) -> None:
    # korvus embeds a pipeline's chunks with `unnest(array_agg(id)), pgml.embed(inputs => array_agg(...))`.
    zipped = conn.execute(f"SELECT unnest(array_agg(id ORDER BY id)), pgml.embed(inputs => array_agg(body"
                          f" ORDER BY id), transformer => '{MINILM}') FROM {docs} WHERE body IS NOT NULL"
                          ).fetchall()
    rows = conn.execute(f"SELECT id, pgml.embed('{MINILM}', body) FROM {docs} WHERE body IS NOT NULL"
                        " ORDER BY id").fetchall()
    assert [r[0] for r in zipped] == [r[0] for r in rows]
    for (_, a), (_, b) in zip(zipped, rows, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_stream_through_a_cursor(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    # The pgml SDK streams a chat as `DECLARE c CURSOR FOR SELECT pgml.transform_stream(...)`, then FETCH.
    task = json.dumps({"task": "conversational", "model": "tiny-chat"})
    args = json.dumps({"max_new_tokens": 6})
    sql = "pgml.transform_stream(task => %s::jsonb, inputs => %s::jsonb[], args => %s::jsonb)"
    params = (task, [json.dumps(m) for m in CHAT], args)
    direct = [r[0] for r in conn.execute(f"SELECT * FROM {sql}", params).fetchall()]
    with conn.transaction():
        conn.execute(f"DECLARE c CURSOR FOR SELECT {sql}", params)
        fetched = []
        while row := conn.execute("FETCH 1 FROM c").fetchone():
            fetched.append(row[0])
    assert fetched == direct and len(direct) > 1


def test_binary_jsonb_array_parameters_are_one_conversation(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    # The SDKs (sqlx) bind the messages as a binary jsonb[] parameter, not text.
    from psycopg.types.json import Jsonb

    sql = "SELECT pgml.transform(task => %s, inputs => %s, args => %s)"
    params = (Jsonb({"task": "conversational", "model": "tiny-chat"}), [Jsonb(m) for m in CHAT],
              Jsonb({"max_tokens": 4, "presence_penalty": 0}))
    for binary in (False, True):
        out = conn.cursor(binary=binary).execute(sql, params).fetchone()
        assert out is not None and isinstance(out[0], list) and len(out[0]) == 1, out
    warned = warnings_of(conn, "SELECT pgml.transform(task => '{\"task\": \"conversational\", \"model\":"
                               " \"tiny-chat\"}'::jsonb, inputs => ARRAY['{\"role\": \"user\", \"content\":"
                               " \"hi\"}'::jsonb], args => '{\"max_tokens\": 2, \"presence_penalty\": 0.5}')")
    assert len(warned) == 1 and '"presence_penalty" is ignored' in warned[0], warned


def test_row_types_of_set_returning_functions(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    # Migration 0006 makes one composite type per set-returning function, as core/functions.py declares.
    from core import functions
    from planner.catalog import row_type
    from planner.sqltree import type_name

    declared = {row_type(s): s.out_columns() for f in functions.FUNCTIONS for s in f.overloads if s.setof}
    for name, cols in declared.items():
        got = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = (SELECT typrelid FROM pg_type WHERE oid = %s::regtype) AND attnum > 0"
            " ORDER BY attnum", (name,)).fetchall()
        want = [(c, one(conn, f"SELECT format_type('{'.'.join(n.sval for n in type_name(t).names)}"
                              f"{'[]' if t.endswith('[]') else ''}'::regtype, NULL)")) for c, t in cols]
        assert got == want, name


def test_a_pgml_call_inside_another(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    # The inner call runs first, batched over the rows, and the outer call reads its results.
    conn.execute("DROP TABLE IF EXISTS dayone_nest")
    conn.execute("CREATE TABLE dayone_nest AS SELECT g::float8 AS x, (3 * g)::float8 AS y"
                 " FROM generate_series(1, 30) g")
    conn.execute("SELECT * FROM pgml.train('dayone_nest', 'regression', 'dayone_nest', 'y')").fetchall()
    inner = "round(pgml.predict('dayone_nest', ARRAY[x]))::text"
    nested = conn.execute(f"SELECT x, pgml.embed('{MINILM}', {inner}) FROM dayone_nest WHERE x <= 5"
                          " ORDER BY x").fetchall()
    two_step = conn.execute(
        f"WITH p AS (SELECT x, {inner} AS v FROM dayone_nest WHERE x <= 5)"
        f" SELECT x, pgml.embed('{MINILM}', v) FROM p ORDER BY x").fetchall()
    assert [r[0] for r in nested] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(nested, two_step, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # With constant arguments: one inner call, then one outer call.
    inner = "round(pgml.predict('dayone_nest', ARRAY[2.0]))::text"
    value = one(conn, f"SELECT {inner}")
    constant = one(conn, f"SELECT pgml.embed('{MINILM}', {inner})")
    assert constant == pytest.approx(one(conn, f"SELECT pgml.embed('{MINILM}', %s)", value), abs=1e-5)
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="in FROM inside"):
        conn.execute(f"SELECT pgml.rank('{MINILM}', 'q', ARRAY(SELECT chunk FROM pgml.chunk('character',"
                     " body))) FROM dayone_docs")


def test_pgml_calls_in_insert_returning_and_on_conflict(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    def embed(text: str) -> Any:
        return one(conn, f"SELECT pgml.embed('{MINILM}', %s)", text)

    conn.execute("DROP TABLE IF EXISTS dayone_ins")
    conn.execute("CREATE TABLE dayone_ins (id int PRIMARY KEY, body text, e real[])")
    rows = conn.execute(f"INSERT INTO dayone_ins (id, body) VALUES (1, 'a cat'), (2, 'a dog') RETURNING id,"
                        f" pgml.embed('{MINILM}', body) AS e").fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert rows[0][1] == pytest.approx(embed("a cat"), abs=1e-5)
    assert rows[1][1] == pytest.approx(embed("a dog"), abs=1e-5)
    # An upsert that embeds the new text: EXCLUDED is the row being inserted.
    conn.execute(f"INSERT INTO dayone_ins (id, body) VALUES (1, 'a bird'), (3, 'a fish') ON CONFLICT (id)"
                 f" DO UPDATE SET body = excluded.body, e = pgml.embed('{MINILM}', excluded.body)")
    got = conn.execute("SELECT id, e FROM dayone_ins WHERE e IS NOT NULL").fetchall()
    stored: dict[Any, Any] = {r[0]: r[1] for r in got}
    assert set(stored) == {1} and stored[1] == pytest.approx(embed("a bird"), abs=1e-5)
    # The existing row's value is not known before the statement runs: a clear 0A000.
    with pytest.raises(psycopg.errors.FeatureNotSupported, match=r"dayone_ins\.body is not a column"):
        conn.execute(f"INSERT INTO dayone_ins (id, body) VALUES (1, 'x') ON CONFLICT (id)"
                     f" DO UPDATE SET e = pgml.embed('{MINILM}', dayone_ins.body)")


def test_a_call_in_a_derived_table_reads_its_rows_once(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    # The README's batch prediction: a derived table with a LIMIT over a view shuffled by
    # random(). Its rows are read once, so every row gets its own prediction (no NULL, no other
    # row's value), and the LIMIT bounds the model work.
    conn.execute("DROP TABLE IF EXISTS dayone_vol CASCADE")
    conn.execute("CREATE TABLE dayone_vol AS SELECT g::float8 AS x, (3 * g)::float8 AS y"
                 " FROM generate_series(1, 60) g")
    conn.execute("SELECT * FROM pgml.train('dayone_vol', 'regression', 'dayone_vol', 'y')").fetchall()
    conn.execute("CREATE VIEW dayone_vol_shuffled AS SELECT * FROM dayone_vol ORDER BY random() OFFSET 10")
    for _ in range(3):
        rows = conn.execute(
            "SELECT x, round(p::numeric) AS p FROM (SELECT x, pgml.predict('dayone_vol', ARRAY[x]) AS p"
            " FROM dayone_vol_shuffled LIMIT 5) AS s").fetchall()
        assert len(rows) == 5
        assert all(p is not None and float(str(p)) == 3 * float(str(x)) for x, p in rows), rows
    names = conn.execute("SELECT * FROM (SELECT x, pgml.predict('dayone_vol', ARRAY[x]) FROM dayone_vol"
                         " ORDER BY x LIMIT 2) s").description
    assert names is not None and [d.name for d in names] == ["x", "predict"]


def test_large_parameters_are_decoded_off_the_loop(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    # A parameter of 64 KiB or more is decoded in a thread; its value is the same as a small one's.
    long_text = "The quick brown fox jumps over the lazy dog. " * 2000  # 90 KB
    by_param = one(conn, f"SELECT pgml.embed('{MINILM}', %s::text)", long_text)
    by_row = one(conn, f"SELECT pgml.embed('{MINILM}', t) FROM (SELECT repeat(%s, 2000) AS t) s",
                 "The quick brown fox jumps over the lazy dog. ")
    assert by_param == pytest.approx(by_row, abs=1e-5)
    features = [float(i % 7) for i in range(20_000)]  # 20,000 floats as text: over 64 KiB
    with pytest.raises(psycopg.errors.UndefinedObject, match="dayone_no_such_project"):
        conn.execute("SELECT pgml.predict('dayone_no_such_project', %s::float8[])", (features,))
    assert one(conn, "SELECT 1") == 1
