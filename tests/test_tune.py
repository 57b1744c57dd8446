"""`pgml.tune` and tuned-model serving through the real proxy, on BBC News and MiniLM.

Small runs (tens of rows, one epoch, short sequences) check the mechanics: the result
row, the INFO notices and `pgml.logs`, the registry, the files, serving through
`pgml.transform` equal to transformers on the saved folder, a second proxy, restart
from a project, cancellation and the errors. The quality run is marked slow.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from testing.bbc import bbc
from tests.fix_postgres import PgServer
from tests.fix_proxy import TEST_CONFIG, ProxyProcess, start_proxy
from tests.test_tabular_support import new_database

# Training on a shared CPU can take minutes where it takes seconds on a free one.
pytestmark = pytest.mark.timeout(1800)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMALL_ARGS = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "logging_steps": 1,
    "learning_rate": 1e-4,
}


class Db:
    """A fresh database and a proxy in front of it."""

    def __init__(self, server: PgServer, proxy: ProxyProcess, dsn: str) -> None:
        self.server, self.proxy, self.direct = server, proxy, dsn
        self.name = dsn.rsplit("/", 1)[1]

    def via_proxy(self, proxy: ProxyProcess | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect((proxy or self.proxy).dsn(database=self.name), autocommit=True)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.direct, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def load(self, table: str, rows: list[tuple[Any, ...]], columns: str = "text text, class text") -> None:
        with psycopg.connect(self.direct, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} ({columns})")
            names = ", ".join(c.split()[0] for c in columns.split(", "))
            with conn.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def registry(self) -> list[tuple[Any, ...]]:
        return self.query(
            "SELECT (SELECT count(*) FROM pgml.projects), (SELECT count(*) FROM pgml.models),"
            " (SELECT count(*) FROM pgml.files), (SELECT count(*) FROM pgml.deployments)"
        )


@pytest.fixture(scope="module")
def db(pg_server: PgServer, proxy_factory: Callable[..., ProxyProcess]) -> Iterator[Db]:
    dsn = new_database(pg_server, "tune")
    yield Db(pg_server, proxy_factory("session", upstream=dsn), dsn)


def tune_sql(project: str, relation: str, hyper: dict[str, Any], model: str = MINILM, extra: str = "") -> str:
    return (
        f"SELECT * FROM pgml.tune('{project}', task => 'text-classification', relation_name => '{relation}',"
        f" model_name => '{model}', hyperparams => '{json.dumps(hyper)}'{extra})"
    )


def run_tune(db: Db, sql: str, notes: list[tuple[str, str]] | None = None) -> list[tuple[Any, ...]]:
    """Run `sql` through the proxy; (severity, message) of each notice into `notes`."""
    with db.via_proxy() as conn:
        if notes is not None:
            # Copied inside the handler: psycopg's Diagnostic is only valid during the call.
            conn.add_notice_handler(lambda d: notes.append((d.severity or "", d.message_primary or "")))
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def tuned(db: Db) -> dict[str, Any]:
    """One small tuning of MiniLM on two BBC classes, shared by the tests that inspect it."""
    db.load("bbc_small", bbc(12, ("business", "sports")))
    notes: list[tuple[str, str]] = []
    hyper = {
        "training_args": {**SMALL_ARGS, "hub_token": "SECRET-TOKEN-123"},
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "max_seq_length": 64,
    }
    started = time.monotonic()
    rows = run_tune(db, tune_sql("bbc_small", "bbc_small", hyper), notes)
    return {"rows": rows, "notes": notes, "seconds": time.monotonic() - started}


def test_tune_returns_the_row_and_registers_the_model(db: Db, tuned: dict[str, Any]) -> None:
    assert tuned["rows"] == [("bbc_small", "text-classification", "transformers", True)]
    [(model_id, status, metrics, hyper)] = db.query(
        "SELECT m.id, m.status, m.metrics, m.hyperparams FROM pgml.models m JOIN pgml.projects p"
        " ON p.id = m.project_id WHERE p.name = 'bbc_small'"
    )
    assert status == "successful"
    assert 0.0 <= metrics["f1"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0 and "eval_loss" in metrics
    assert "SECRET-TOKEN-123" not in json.dumps(hyper)
    assert db.query(
        "SELECT model_id FROM pgml.deployments d JOIN pgml.projects p ON p.id = d.project_id"
        " WHERE p.name = 'bbc_small'"
    ) == [(model_id,)]
    paths = {p for (p,) in db.query("SELECT DISTINCT path FROM pgml.files WHERE model_id = %s", model_id)}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= paths
    assert not [p for p in paths if p.endswith((".bin", ".pt", ".pkl"))]
    [(config,)] = db.query(
        "SELECT convert_from(data, 'UTF8') FROM pgml.files WHERE model_id = %s AND path = 'config.json'",
        model_id,
    )
    assert json.loads(config)["id2label"] == {"0": "business", "1": "sports"}
    assert json.loads(config)["label2id"] == {"business": 0, "sports": 1}


def test_tune_notices_and_logs(db: Db, tuned: dict[str, Any]) -> None:
    infos = [json.loads(m) for s, m in tuned["notes"] if s == "INFO" and m.startswith("{")]
    steps = [n for n in infos if "loss" in n]
    assert steps, tuned["notes"]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "step", "max_steps", "timestamp"} <= set(steps[0])
    assert any("train_runtime" in n for n in infos)
    assert any("eval_f1" in n and "eval_accuracy" in n and "eval_loss" in n for n in infos)
    assert all("SECRET-TOKEN-123" not in m for _, m in tuned["notes"])
    logged = db.query(
        "SELECT logs->>'step', logs->>'loss' FROM pgml.logs l JOIN pgml.projects p ON p.id = l.project_id"
        " WHERE p.name = 'bbc_small' AND jsonb_exists(logs, 'loss') ORDER BY l.id"
    )
    assert [int(s) for s, _ in logged] == [n["step"] for n in steps]


def _saved_folder(db: Db, project: str, target: Path) -> Path:
    for path, data in db.query(
        "SELECT f.path, f.data FROM pgml.files f JOIN pgml.deployed_models d ON d.id = f.model_id"
        " WHERE d.name = %s ORDER BY f.path, f.part",
        project,
    ):
        with open(target / path, "ab") as fh:
            fh.write(bytes(data))
    return target


def test_transform_serves_the_tuned_model_like_transformers(db: Db, tuned: dict[str, Any]) -> None:
    pipeline: Any = importlib.import_module("transformers").pipeline

    texts = [t for t, _ in bbc(3, ("business", "sports"), skip=100)]
    task = json.dumps({"task": "text-classification", "model": "bbc_small"})
    with db.via_proxy() as conn:
        [(served,)] = conn.execute(
            "SELECT pgml.transform(task => %s::jsonb, inputs => %s)", (task, texts)
        ).fetchall()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = pipeline(
            "text-classification", model=str(_saved_folder(db, "bbc_small", Path(tmp))), device="cpu"
        )
        direct = pipe(texts)
    assert all(r["label"] in ("business", "sports") for r in served)
    # The proxy runs the model on ONNX Runtime, transformers on torch: equal up to float noise.
    assert _p_first(served, "business") == pytest.approx(_p_first(direct, "business"), abs=1e-3), (
        served,
        direct,
    )


def _p_first(results: list[dict[str, Any]], first: str) -> list[float]:
    """The probability of class `first` from a two-class pipeline's top answers."""
    return [r["score"] if r["label"] == first else 1 - r["score"] for r in results]


def test_second_proxy_serves_the_tuned_model(db: Db, tuned: dict[str, Any]) -> None:
    task = json.dumps({"task": "text-classification", "model": "bbc_small"})
    text = bbc(1, ("sports",), skip=200)[0][0]
    sql = "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY[%s])"
    with db.via_proxy() as conn:
        [(first,)] = conn.execute(sql, (task, text)).fetchall()
    # Its own cache folder: the model comes from pgml.files, not from the first proxy's disk.
    cache = Path(tempfile.mkdtemp(prefix="tune-cache-"))
    config = cache / "config.toml"
    config.write_text(
        TEST_CONFIG.read_text().replace("\n[runtime]\n", f"\n[runtime]\ncache_dir = '{cache}'\n")
    )
    other = start_proxy(db.direct, "session", config=config)
    try:
        with db.via_proxy(other) as conn:
            [(second,)] = conn.execute(sql, (task, text)).fetchall()
    finally:
        other.stop()
        shutil.rmtree(cache, ignore_errors=True)
    assert _p_first(first, "business") == pytest.approx(_p_first(second, "business"), abs=1e-4)


def test_an_alias_of_a_tuned_project_serves_and_restarts_it(db: Db, tuned: dict[str, Any]) -> None:
    """A hub name aliased (`[runtime.aliases]`) to a tuned project is that project: transform serves
    its deployed model and model_name => the alias continues from its weights (the README's
    section 6 and 7 name the project by its pushed hub copy)."""
    task = {"task": "text-classification", "model": "bbc_small"}
    texts = [t for t, _ in bbc(2, ("business", "sports"), skip=300)]
    sql = "SELECT pgml.transform(task => %s::jsonb, inputs => %s)"
    with db.via_proxy() as conn:
        [(direct,)] = conn.execute(sql, (json.dumps(task), texts)).fetchall()
    cache = Path(tempfile.mkdtemp(prefix="tune-alias-"))
    config = cache / "config.toml"
    config.write_text(TEST_CONFIG.read_text() + '\n[runtime.aliases]\n"someone/bbc_small" = "bbc_small"\n')
    other = start_proxy(db.direct, "session", config=config)
    try:
        hyper = {"training_args": {**SMALL_ARGS, "learning_rate": 0.0}, "max_seq_length": 64}
        with db.via_proxy(other) as conn:
            alias = "someone/bbc_small"
            [(aliased,)] = conn.execute(sql, (json.dumps({**task, "model": alias}), texts)).fetchall()
            rows = conn.execute(tune_sql("bbc_via_alias", "bbc_small", hyper, model=alias)).fetchall()
            again = json.dumps({**task, "model": "bbc_via_alias"})
            [(restarted,)] = conn.execute(sql, (again, texts)).fetchall()
    finally:
        other.stop()
        shutil.rmtree(cache, ignore_errors=True)
    assert [a["label"] for a in aliased] == [d["label"] for d in direct]
    assert _p_first(aliased, "business") == pytest.approx(_p_first(direct, "business"), abs=1e-4)
    assert rows == [("bbc_via_alias", "text-classification", "transformers", True)]
    # Learning rate 0 from the project's weights: the same answers, not a fresh head's.
    assert _p_first(restarted, "business") == pytest.approx(_p_first(direct, "business"), abs=1e-4)


def test_restart_from_a_previous_project(db: Db, tuned: dict[str, Any]) -> None:
    """model_name => a tuned project: training starts from its weights (with a learning rate
    of 0 they stay as they were, so the new project answers exactly as the old one)."""
    hyper = {"training_args": {**SMALL_ARGS, "learning_rate": 0.0}, "max_seq_length": 64}
    rows = run_tune(db, tune_sql("bbc_restart", "bbc_small", hyper, model="bbc_small"))
    assert rows == [("bbc_restart", "text-classification", "transformers", True)]
    texts = [t for t, _ in bbc(2, ("business", "sports"), skip=300)]
    sql = "SELECT pgml.transform(task => %s::jsonb, inputs => %s)"
    with db.via_proxy() as conn:
        answers = [
            conn.execute(sql, (json.dumps({"task": "text-classification", "model": p}), texts)).fetchall()[0][
                0
            ]
            for p in ("bbc_small", "bbc_restart")
        ]
    assert _p_first(answers[0], "business") == pytest.approx(_p_first(answers[1], "business"), abs=1e-4)
    [(base,)] = db.query(
        "SELECT m.hyperparams->>'model_name' FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
        " WHERE p.name = 'bbc_restart'"
    )
    assert base == "bbc_small"


def _workers() -> list[int]:
    """Pids of running tuning processes (of any test proxy)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"runtime.tune.worker" in cmd:
            found.append(int(proc.name))
    return found


def test_cancel_stops_the_training_and_marks_the_model(db: Db, tuned: dict[str, Any]) -> None:
    before = db.registry()
    hyper = {"training_args": {**SMALL_ARGS, "num_train_epochs": 200}, "max_seq_length": 64}
    sql = tune_sql("bbc_cancel", "bbc_small", hyper)
    logged = threading.Event()
    notes: list[tuple[str, str]] = []
    outcome: dict[str, Any] = {}
    conn = db.via_proxy()

    def handler(d: psycopg.errors.Diagnostic) -> None:
        notes.append((d.severity or "", d.message_primary or ""))
        if '"loss"' in (d.message_primary or ""):
            logged.set()

    conn.add_notice_handler(handler)

    def run() -> None:
        try:
            conn.execute(sql)
        except psycopg.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert logged.wait(300), notes  # training is under way in its process
        assert _workers()
        conn.cancel_safe()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        conn.close()
    assert isinstance(outcome.get("error"), psycopg.errors.QueryCanceled), outcome
    deadline = time.monotonic() + 10
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _workers(), "the training process still runs after the cancel"
    [(status, files, deployments)] = db.query(
        "SELECT m.status, (SELECT count(*) FROM pgml.files f WHERE f.model_id = m.id),"
        " (SELECT count(*) FROM pgml.deployments d WHERE d.model_id = m.id)"
        " FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = 'bbc_cancel'"
    )
    assert (status, files, deployments) == ("cancelled", 0, 0)
    after = db.registry()[0]
    assert (after[1], after[2], after[3]) == (before[0][1] + 1, before[0][2], before[0][3])


@pytest.mark.parametrize(
    ("hyper", "relation", "extra", "sqlstate", "words"),
    [
        (
            {"training_args": {"no_such_arg": 1, "learning_rate": 1e-4}},
            "bbc_small",
            "",
            "22023",
            "no_such_arg",
        ),
        ({"dataset_args": {"text_column": "body"}}, "bbc_small", "", "22023", "'body'"),
        ({"dataset_args": {"label": "x"}}, "bbc_small", "", "22023", "'label'"),
        ({"unknown_key": 1}, "bbc_small", "", "22023", "unknown_key"),
        ({}, "no_such_table", "", "42P01", "no_such_table"),
        ({}, "bbc_one_row", "", "22023", "1 rows"),
        ({}, "bbc_late_class", ", test_sampling => 'last'", "22023", "only in the test split"),
        ({}, "bbc_small", ", test_sampling => 'sideways'", "22023", "sideways"),
    ],
)
def test_errors_leave_the_registry_unchanged(
    db: Db, tuned: dict[str, Any], hyper: dict[str, Any], relation: str, extra: str, sqlstate: str, words: str
) -> None:
    if not db.query("SELECT 1 FROM pg_class WHERE relname = 'bbc_late_class'"):
        db.load("bbc_one_row", bbc(1, ("tech",)))
        db.load("bbc_late_class", [*bbc(6, ("business", "sports")), *bbc(3, ("tech",))])
    before = db.registry()
    with pytest.raises(psycopg.Error) as err:
        run_tune(db, tune_sql("bbc_errors", relation, hyper, extra=extra))
    assert err.value.sqlstate == sqlstate, err.value
    assert words in str(err.value)
    assert db.registry() == before
    with db.via_proxy() as conn:  # the connection's peers keep working
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unknown_base_model_is_42704(db: Db, tuned: dict[str, Any]) -> None:
    before = db.registry()
    with pytest.raises(psycopg.errors.UndefinedObject):
        run_tune(db, tune_sql("bbc_errors", "bbc_small", {}, model="no-such/model"))
    assert db.registry() == before


def test_text_pair_classification(db: Db, tuned: dict[str, Any]) -> None:
    """Pairs of BBC articles labelled by whether they share a category; served with text_pair inputs."""
    articles = bbc(12, ("business", "sports"), chars=200, skip=400)
    pairs = [
        (a[0], b[0], "same" if a[1] == b[1] else "different")
        for a, b in zip(articles, articles[1:] + articles[:1], strict=True)
    ]
    pairs += [(a[0], b[0], "same") for a, b in zip(articles[::2], articles[2::2], strict=False)]
    db.load("bbc_pairs", pairs, "a text, b text, class text")
    hyper = {
        "training_args": SMALL_ARGS,
        "dataset_args": {"text1_column": "a", "text2_column": "b", "class_column": "class"},
        "max_seq_length": 96,
    }
    sql = "SELECT * FROM pgml.tune('bbc_pairs', 'text-pair-classification', 'bbc_pairs', NULL, %s, %s::jsonb)"
    with db.via_proxy() as conn:  # positional arguments, as the extension takes them
        rows = conn.execute(sql, (MINILM, json.dumps(hyper))).fetchall()
    assert rows == [("bbc_pairs", "text-pair-classification", "transformers", True)]
    task = json.dumps({"task": "text-classification", "model": "bbc_pairs"})
    inputs = [json.dumps({"text": a, "text_pair": b}) for a, b, _ in pairs[:3]]
    with db.via_proxy() as conn:
        [(served,)] = conn.execute(
            "SELECT pgml.transform(task => %s::jsonb, inputs => %s::jsonb[])", (task, inputs)
        ).fetchall()
    pipeline: Any = importlib.import_module("transformers").pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = pipeline(
            "text-classification", model=str(_saved_folder(db, "bbc_pairs", Path(tmp))), device="cpu"
        )
        direct = pipe([{"text": a, "text_pair": b} for a, b, _ in pairs[:3]])
    assert {r["label"] for r in served} <= {"same", "different"}
    assert _p_first(served, "same") == pytest.approx(_p_first(direct, "same"), abs=1e-3), (served, direct)


SYSTEM = "Answer with the category of the news article."


def test_conversation_lora_and_generate(db: Db) -> None:
    """LoRA on SmolLM2: after tuning, the greedy answer to a training prompt is the trained answer;
    pgml.generate answers as base + adapter loaded with transformers and peft directly."""
    rows = [(SYSTEM, text[:160], category) for text, category in bbc(4, ("business", "sports"), skip=500)]
    db.load("bbc_chat", rows, "system text, question text, answer text")
    hyper = {
        "training_args": {
            **SMALL_ARGS,
            "num_train_epochs": 8,
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 2,
        },
        "dataset_args": {"system_column": "system", "user_column": "question", "assistant_column": "answer"},
        "lora_config": {
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
        },
        "max_seq_length": 128,
    }
    sql = (
        "SELECT * FROM pgml.tune('bbc_chat', task => 'conversation', relation_name => 'bbc_chat',"
        " model_name => 'HuggingFaceTB/SmolLM2-135M-Instruct', hyperparams => %s::jsonb, test_size => 2,"
        " test_sampling => 'last')"
    )
    notes: list[tuple[str, str]] = []
    with db.via_proxy() as conn:
        conn.add_notice_handler(lambda d: notes.append((d.severity or "", d.message_primary or "")))
        assert conn.execute(sql, (json.dumps(hyper),)).fetchall() == [
            ("bbc_chat", "conversation", "transformers", True)
        ]
        prompts = [q for _, q, _ in rows[:2]]
        config = json.dumps({"system": SYSTEM, "max_new_tokens": 6})
        [(answers,)] = conn.execute(
            "SELECT pgml.generate('bbc_chat', %s::text[], %s::jsonb)", (prompts, config)
        ).fetchall()
        [(one,)] = conn.execute(
            "SELECT pgml.generate('bbc_chat', %s, %s::jsonb)", (prompts[0], config)
        ).fetchall()
    assert one == answers[0]
    # The answer ends where the trained answer ended: the end of turn stops generation.
    assert [a.strip().lower() for a in answers] == [category for _, _, category in rows[:2]], answers
    paths = {
        p
        for (p,) in db.query(
            "SELECT DISTINCT f.path FROM pgml.files f JOIN pgml.deployed_models d ON d.id = f.model_id"
            " WHERE d.name = 'bbc_chat'"
        )
    }
    assert {"adapter_model.safetensors", "adapter_config.json"} <= paths
    with tempfile.TemporaryDirectory() as tmp:
        direct = _direct_generate(_saved_folder(db, "bbc_chat", Path(tmp)), prompts)
    assert answers == direct


def _direct_generate(adapter: Path, prompts: list[str]) -> list[str]:
    PeftModel: Any = importlib.import_module("peft").PeftModel
    _transformers: Any = importlib.import_module("transformers")
    AutoModelForCausalLM, AutoTokenizer = _transformers.AutoModelForCausalLM, _transformers.AutoTokenizer

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(str(adapter), padding_side="left")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(adapter)
    ).merge_and_unload()
    out = []
    for prompt in prompts:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0][ids.shape[1] :], skip_special_tokens=True))
    return out
