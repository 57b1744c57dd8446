"""Models from the hub, downloaded on first use, through the real proxy and a real hub server.

The server (tests/fix_hub.py) speaks the hub's HTTP API on loopback and serves repos made of
the offline all-MiniLM-L6-v2 files; the proxies run the real huggingface_hub client with
HF_ENDPOINT pointed at it and a fresh HF_HOME. The suite runs offline (HF_HUB_OFFLINE=1):
each proxy here sets its own environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_hub import HubServer, hub_server  # noqa: F401 (the fixture)
from tests.fix_postgres import free_port
from tests.fix_proxy import ROOT, ProxyProcess
from tests.test_model_names import write_config


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(scope="module")
def online(proxy_factory: Callable[..., ProxyProcess], hub_server: HubServer,  # noqa: F811
           hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ProxyProcess]:
    """Start a proxy that downloads from `hub_server` into `hf_home` (overridable)."""

    def start(environ: dict[str, str] | None = None, **runtime: Any) -> ProxyProcess:
        folder = tmp_path_factory.mktemp("proxy")
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub_server.url, "HF_HOME": str(hf_home),
               "HF_HUB_DISABLE_TELEMETRY": "1", **(environ or {})}
        return proxy_factory(config=write_config(folder, folder / "models", **runtime), environ=env)

    return start


@pytest.fixture(scope="module")
def first(online: Callable[..., ProxyProcess]) -> Iterator[ProxyProcess]:
    proxy = online()
    yield proxy
    proxy.stop()


def embed(proxy: ProxyProcess, model: str, text: str = "hello hub") -> tuple[list[float], list[str]]:
    notices: list[str] = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.severity} {d.message_primary}"))
        row = conn.execute("SELECT pgml.embed(%s, %s)", (model, text)).fetchone()
    assert row is not None
    return list(row[0]), notices


def sqlstate_of(proxy: ProxyProcess, model: str, kwargs: str = "{}") -> psycopg.Error:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pgml.embed(%s, 'x', %s::jsonb)", (model, kwargs))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    return info.value


def test_first_use_downloads_then_serves(first: ProxyProcess, hub_server: HubServer,  # noqa: F811
                                         online: Callable[..., ProxyProcess], hf_home: Path) -> None:
    got, notices = embed(first, "acme/minilm")
    want, _ = embed(first, "sentence-transformers/all-MiniLM-L6-v2")  # the same files, local
    assert got == want
    fetched = Counter(hub_server.file_gets("acme/minilm"))
    assert len(fetched) == len(hub_server.repos["acme/minilm"]) and set(fetched.values()) == {1}
    progress = [n for n in notices if n.startswith("INFO downloading acme/minilm")]
    done = [n for n in progress if "model.safetensors" in n and "(100%)" in n and "MB" in n]
    assert done, notices
    assert "downloading acme/minilm" in first.log()
    snapshot = hf_home / "hub" / "models--acme--minilm" / "snapshots" / hub_server.commit
    assert (snapshot / "model.safetensors").is_file()  # the standard cache layout, under HF_HOME
    # Served from the cache afterwards: by this proxy and by a new one, with no request at all.
    before = len(hub_server.requests)
    assert embed(first, "acme/minilm")[0] == want
    other = online()
    try:
        assert embed(other, "acme/minilm")[0] == want
    finally:
        other.stop()
    assert len(hub_server.requests) == before


def test_eight_concurrent_first_uses_make_one_download(first: ProxyProcess, hub_server: HubServer,  # noqa: F811
                                                       online: Callable[..., ProxyProcess]) -> None:
    second = online()  # two processes, four connections each
    results: list[list[float]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def one(proxy: ProxyProcess) -> None:
        try:
            barrier.wait(30)
            results.append(embed(proxy, "acme/many")[0])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in [first, second] * 4]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        second.stop()
    assert not errors, errors
    assert len(results) == 8 and all(r == results[0] for r in results)
    fetched = Counter(hub_server.file_gets("acme/many"))
    assert len(fetched) == len(hub_server.repos["acme/minilm"]) and set(fetched.values()) == {1}, fetched


def test_a_dropped_connection_is_resumed_cleanly(first: ProxyProcess, hub_server: HubServer,  # noqa: F811
                                                 hf_home: Path) -> None:
    hub_server.drop_once.add("model.safetensors")
    got, _ = embed(first, "acme/flaky")
    assert got == embed(first, "acme/minilm")[0]
    assert Counter(hub_server.file_gets("acme/flaky"))["model.safetensors"] >= 2  # cut, then resumed
    repo = hf_home / "hub" / "models--acme--flaky"
    data = (repo / "snapshots" / hub_server.commit / "model.safetensors").read_bytes()
    want = next(f for f in hub_server.repos["acme/flaky"] if f.name == "model.safetensors")
    assert hashlib.sha256(data).hexdigest() == want.sha256
    assert not list(repo.rglob("*.incomplete")) and not (repo / ".pgml-proxy-incomplete").exists()


def test_a_download_killed_halfway_is_redone(first: ProxyProcess, hub_server: HubServer,  # noqa: F811
                                             online: Callable[..., ProxyProcess]) -> None:
    victim = online()
    hub_server.stall_once.add("model.safetensors")
    hub_server.stalled.clear()
    def doomed() -> None:
        with contextlib.suppress(psycopg.Error):
            embed(victim, "acme/stall")

    worker = threading.Thread(target=doomed)
    worker.start()
    assert hub_server.stalled.wait(120), "the download never reached the model file"
    victim.stop(signal.SIGKILL)  # the proxy dies mid-file: refs, some files and a partial blob remain
    hub_server.release.set()
    worker.join(30)
    # Another proxy does not trust the half-written snapshot: it finishes the download.
    got, _ = embed(first, "acme/stall")
    assert got == embed(first, "acme/minilm")[0]
    assert Counter(hub_server.file_gets("acme/stall"))["model.safetensors"] >= 2


def test_unknown_repo_is_42704_and_trust_remote_code_is_refused_first(
    first: ProxyProcess, hub_server: HubServer  # noqa: F811
) -> None:
    err = sqlstate_of(first, "acme/nope")
    assert err.sqlstate == "42704" and "acme/nope" in str(err) and "hub" in str(err)
    before = len(hub_server.requests)
    err = sqlstate_of(first, "acme/other", '{"trust_remote_code": true}')
    assert err.sqlstate == "42501"
    assert len(hub_server.requests) == before  # refused before any request


@pytest.mark.parametrize(
    ("environ", "runtime", "says"),
    [({"HF_HUB_OFFLINE": "1"}, {}, "HF_HUB_OFFLINE"),
     ({}, {"downloads": False}, "runtime.downloads = false")],
)
def test_downloads_off_refuse_with_a_clear_error(online: Callable[..., ProxyProcess],
                                                 hub_server: HubServer,  # noqa: F811
                                                 environ: dict[str, str], runtime: dict[str, Any],
                                                 says: str) -> None:
    proxy = online(environ=environ, **runtime)
    try:
        before = len(hub_server.requests)
        err = sqlstate_of(proxy, "acme/offline-only")
        assert err.sqlstate == "42704" and says in (err.diag.message_detail or "")
        assert "downloads" in (err.diag.message_hint or "")
        assert len(hub_server.requests) == before
    finally:
        proxy.stop()


def test_the_allow_list_refuses_before_any_request(online: Callable[..., ProxyProcess],
                                                   hub_server: HubServer) -> None:  # noqa: F811
    proxy = online(allowed_models=["acme/minilm"])
    try:
        before = len(hub_server.requests)
        err = sqlstate_of(proxy, "acme/not-allowed")
        assert err.sqlstate == "42501" and "acme/not-allowed" in str(err)
        assert len(hub_server.requests) == before
    finally:
        proxy.stop()


def test_an_unreachable_hub_is_08001(online: Callable[..., ProxyProcess]) -> None:
    proxy = online(environ={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})  # nothing listens
    try:
        err = sqlstate_of(proxy, "acme/unreachable")
        assert err.sqlstate == "08001" and "acme/unreachable" in str(err)
    finally:
        proxy.stop()


def test_models_cli_pull_list_remove(hub_server: HubServer, tmp_path: Path) -> None:  # noqa: F811
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub_server.url,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    config = write_config(tmp_path, tmp_path / "models")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.main", "models", "--config", str(config), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    pulled = cli("pull", "acme/cli")
    assert pulled.returncode == 0, pulled.stderr
    assert "downloading acme/cli" in pulled.stderr and "100%" in pulled.stderr  # progress bar and lines
    assert hub_server.commit in pulled.stdout
    assert "ONNX export for embed" in pulled.stdout, pulled  # made now, not at the first statement
    listed = cli("list")
    assert listed.returncode == 0 and re.match(r"acme/cli\t[\d.]+M\t0123456789ab\n", listed.stdout), listed
    assert cli("pull", "acme/cli").returncode == 0  # already there: no new download
    assert Counter(hub_server.file_gets("acme/cli"))["model.safetensors"] == 1
    removed = cli("remove", "acme/cli")
    assert removed.returncode == 0 and "removed acme/cli" in removed.stdout
    assert "acme/cli" not in cli("list").stdout
    assert cli("remove", "acme/cli").returncode == 1
    missing = cli("pull", "acme/nope")
    assert missing.returncode == 1 and "42704" in missing.stderr
