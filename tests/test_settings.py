"""The settings tree (core/settings.py): a bad key in any section stops a start and a RELOAD
or SIGHUP, named by its full dotted name, and a refused reload leaves the proxy serving."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.errors import ConfigError
from core.settings import Config, PlannerSettings, RuntimeConfig, TabularSettings
from proxy.config import load
from tests.fix_proxy import ROOT, TEST_CONFIG

# (a section's TOML with one bad key, the key's full dotted name)
BAD = [
    ("[proxy]\npool_size = 0\n", "proxy.pool_size"),
    ("[runtime]\nengine = \"tensorrt\"\n", "runtime.engine"),
    ("[runtime.tabular]\npool_size = 0\n", "runtime.tabular.pool_size"),
    ("[runtime.tabular]\npool_sise = 2\n", "runtime.tabular.pool_sise"),
    ("[planner]\nchunk_rows = 0\n", "planner.chunk_rows"),
    ("[planner]\nctas_embedding_type = \"float8[]\"\n", "planner.ctas_embedding_type"),
]


@pytest.mark.parametrize(("toml", "key"), BAD, ids=[k for _, k in BAD])
def test_load_names_the_bad_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert info.value.key == key


def test_defaults_live_in_the_tree() -> None:
    assert Config().validate() == Config()
    assert PlannerSettings.from_mapping({}) == PlannerSettings()
    assert RuntimeConfig.from_mapping({"tabular": {"pool_size": 3}}).tabular == TabularSettings(pool_size=3)


@pytest.mark.parametrize(("toml", "key"), BAD, ids=[k for _, k in BAD])
def test_a_bad_key_stops_the_start(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    out = subprocess.run(
        [sys.executable, "-m", "proxy.main", "--config", str(path), "--upstream", "postgresql://unused"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2, out.stderr
    assert f"config key {key!r}" in out.stderr


def _admin(dsn: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/pgml_proxy"


def test_reload_and_sighup_refuse_a_bad_tree_whole(own_proxy: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    good = TEST_CONFIG.read_text()
    path.write_text(good)
    proxy = own_proxy(config=path)
    for toml, key in BAD:
        # The bad section beside a good change to [proxy]: nothing of it may be applied.
        changed = "[proxy]\npool_size = 40\npool_timeout = 9.0\n"
        path.write_text(toml if toml.startswith("[proxy]") else changed + toml)
        with psycopg.connect(_admin(proxy.dsn()), autocommit=True) as console:
            with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
                console.execute("RELOAD")
            assert repr(key) in str(info.value) and "configuration unchanged" in str(info.value)
            config = {r[0]: r[1] for r in console.execute("SHOW CONFIG").fetchall()}
            assert config.get("pool_timeout") in ("3.0", "3"), config
        proxy.send_signal(signal.SIGHUP)
        assert f"(key {key})" in proxy.wait_log(f"(key {key})", timeout=10)
    path.write_text(good)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
