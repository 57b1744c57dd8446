"""The quality bar of `pgml.tune`: MiniLM on 240 BBC News articles (5 classes), 3 epochs, held-out F1 >= 0.9.

Slow (minutes on a CPU): the metric is the one `pgml.tune` stores (macro F1 on the test
split it held out), and the serving check classifies articles none of the splits saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from testing.bbc import bbc
from tests.fix_postgres import PgServer
from tests.fix_proxy import ProxyProcess
from tests.test_tabular_support import new_database
from tests.test_tune import MINILM, Db, run_tune, tune_sql

pytestmark = [pytest.mark.slow, pytest.mark.quality, pytest.mark.timeout(3600)]
CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def test_bbc_news_f1(pg_server: PgServer, proxy_factory: Callable[..., ProxyProcess]) -> None:
    dsn = new_database(pg_server, "tune_quality")
    db = Db(pg_server, proxy_factory("session", upstream=dsn), dsn)
    db.load("bbc", bbc(48, CLASSES, chars=1000))
    hyper = {
        "training_args": {
            "num_train_epochs": 3,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "learning_rate": 1e-4,
            "logging_steps": 10,
        },
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "max_seq_length": 128,
    }
    assert run_tune(db, tune_sql("bbc5", "bbc", hyper, model=MINILM)) == [
        ("bbc5", "text-classification", "transformers", True)
    ]
    [(metrics,)] = db.query("SELECT metrics FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id")
    print("bbc5 metrics:", json.dumps(metrics))
    assert metrics["f1"] >= 0.9, metrics
    unseen = bbc(6, CLASSES, chars=1000, skip=300)
    task = json.dumps({"task": "text-classification", "model": "bbc5"})
    with db.via_proxy() as conn:
        [(answers,)] = conn.execute(
            "SELECT pgml.transform(task => %s::jsonb, inputs => %s)", (task, [t for t, _ in unseen])
        ).fetchall()
    right = sum(a["label"] == c for a, (_, c) in zip(answers, unseen, strict=True))
    print(f"bbc5 unseen articles: {right}/{len(unseen)} right")
    assert right >= 0.8 * len(unseen)
