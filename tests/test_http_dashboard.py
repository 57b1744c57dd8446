"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

A proxy with its HTTP listener runs in front of the test Postgres. The test trains two iris
models over SQL (one with a grid search), then opens the pages as the proxy user (HTTP basic
auth, sent by the browser as a header through the DevTools protocol) and checks them against
`pgml.models`: project names, metric values, one plot point per searched candidate, a bar per
feature importance; a snapshot's per-column statistics and histograms (their bars add up to
the row count Postgres gives). It creates a notebook, runs a cell with `pgml.embed` and a
numeric one (charted), reloads and finds both saved in pgml.notebook_cells; it uploads a CSV
and queries the new table through the proxy.
A small pgml.tune (MiniLM on two BBC classes) runs while the training page is reloaded: its
loss curve gains points as pgml.logs grows. Screenshots of each page go to the test's tmp dir.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from testing.bbc import bbc
from testing.postgres import free_port
from testing.proxy import TEST_CONFIG, ProxyProcess, start_proxy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromedriver") is None, reason="needs Debian's chromium-driver"),
]
PROJECT = "HTTP Iris"
SEARCHED = [1, 2, 3]
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
LOSS_POINTS = 'svg.curve[data-title="loss"] circle.point'


@pytest.fixture(scope="module")
def dash(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, str]]:
    port = free_port()
    config = tmp_path_factory.mktemp("http-dash") / "config.toml"
    config.write_text(TEST_CONFIG.read_text() + f'\n[http]\nlisten = "127.0.0.1:{port}"\n')
    proxy = start_proxy(pg_dsn, "session", config=config)
    yield proxy, f"http://127.0.0.1:{port}"
    proxy.stop()


@pytest.fixture(scope="module")
def browser(dash: tuple[ProxyProcess, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    token = base64.b64encode(b"postgres:any").decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def trained(dash: tuple[ProxyProcess, str]) -> list[tuple[int, str, dict[str, Any]]]:
    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        conn.execute("SELECT * FROM pgml.load_dataset('iris')").fetchall()
        conn.execute("SELECT * FROM pgml.train(%s, 'classification', 'pgml.iris', 'target', "
                     "algorithm => 'xgboost', search => 'grid', search_params => %s::jsonb, "
                     "search_args => '{\"cv\": 2}', hyperparams => '{\"n_estimators\": 5}')",
                     (PROJECT, json.dumps({"max_depth": SEARCHED}))).fetchall()
        conn.execute("SELECT * FROM pgml.train(%s, algorithm => 'linear')", (PROJECT,)).fetchall()
        return list(conn.execute(
            "SELECT m.id, m.algorithm, m.metrics FROM pgml.models m JOIN pgml.projects p"
            " ON p.id = m.project_id WHERE p.name = %s ORDER BY m.id", (PROJECT,)).fetchall())


def _open(browser: Any, url: str, shots: Path, name: str) -> None:
    browser.get(url)
    browser.save_screenshot(str(shots / f"{name}.png"))


def test_login_is_required(dash: tuple[ProxyProcess, str]) -> None:
    answer = httpx.get(dash[1] + "/dashboard/projects")
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")


def test_projects_and_model_pages(dash: tuple[ProxyProcess, str], browser: Any, tmp_path: Path,
                                  trained: list[tuple[int, str, dict[str, Any]]]) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, dash[1] + "/dashboard/projects", tmp_path, "projects")
    assert PROJECT in [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".project-name")]
    section = browser.find_element(By.CSS_SELECTOR, f'section.project[data-name="{PROJECT}"]')
    listed = [r.find_elements(By.TAG_NAME, "td") for r in section.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert [int(cells[0].text) for cells in listed] == [m[0] for m in trained]
    assert [float(cells[3].text) for cells in listed] == [m[2]["f1"] for m in trained]
    for model_id, algorithm, metrics in trained:
        _open(browser, f"{dash[1]}/dashboard/models/{model_id}", tmp_path, f"model-{model_id}")
        assert algorithm in browser.find_element(By.TAG_NAME, "main").text
        shown = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
                 for r in browser.find_elements(By.CSS_SELECTOR, "table.metrics tbody tr")}
        want = {k: v for k, v in metrics.items() if k not in ("search_results", "feature_importances")}
        assert shown.keys() == want.keys()
        assert all(float(shown[k]) == float(v) for k, v in want.items() if isinstance(v, int | float))
        # Both libraries give importances (xgboost's feature_importances_, the linear |coef_|).
        bars = browser.find_elements(By.CSS_SELECTOR, "svg.importances rect.bar")
        importances = {b.get_attribute("data-label"): float(b.get_attribute("data-value")) for b in bars}
        assert len(bars) == 4 and importances == metrics["feature_importances"]
        assert sorted(importances) == sorted(IRIS_FEATURES)
        points = browser.find_elements(By.CSS_SELECTOR, "svg.plot circle.point")
        if "search_results" in metrics:
            assert len(points) == len(SEARCHED) == len(metrics["search_results"]["params"])
            assert sorted(int(p.get_attribute("data-x")) for p in points) == SEARCHED
        else:
            assert points == []


def test_loaded_models_and_snapshots(dash: tuple[ProxyProcess, str], browser: Any, tmp_path: Path,
                                     pg_dsn: str, trained: list[tuple[int, str, dict[str, Any]]]) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, dash[1] + "/dashboard/snapshots", tmp_path, "snapshots")
    assert "pgml.iris" in browser.find_element(By.CSS_SELECTOR, "table.snapshots").text
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # straight to Postgres, not the proxy
        (snapshot_id,) = conn.execute("SELECT snapshot_id FROM pgml.models WHERE id = %s",
                                      (trained[0][0],)).fetchone()  # type: ignore[misc]
        (count,) = conn.execute("SELECT count(*) FROM pgml.iris").fetchone()  # type: ignore[misc]
        (mean,) = conn.execute("SELECT avg(sepal_length)::float8 FROM pgml.iris").fetchone()  # type: ignore[misc]
    _open(browser, f"{dash[1]}/dashboard/snapshots/{snapshot_id}", tmp_path, "snapshot")
    assert int(browser.find_element(By.ID, "row-count").text) == count == 150
    stats = {r.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")]
             for r in browser.find_elements(By.CSS_SELECTOR, "table.column-stats tbody tr")}
    assert list(stats) == [*IRIS_FEATURES, "target"]
    assert float(stats["sepal_length"][7]) == mean and stats["sepal_length"][3] == "0"
    for column in stats:
        bars = browser.find_elements(By.CSS_SELECTOR, f'svg.histogram[data-title="{column}"] rect.bar')
        counts = [float(b.get_attribute("data-value")) for b in bars]
        assert sum(counts) == count, column
        assert len(bars) == 10, column  # every iris column is numeric: 10 equal widths
    _open(browser, dash[1] + "/dashboard/loaded", tmp_path, "loaded")
    assert browser.find_elements(By.CSS_SELECTOR, "table.loaded")


def test_snapshot_of_text_and_nulls(dash: tuple[ProxyProcess, str], browser: Any, tmp_path: Path,
                                    pg_dsn: str) -> None:
    """Text columns get a bar per most frequent value and one for the rest; NULLs a bar of their own."""
    from selenium.webdriver.common.by import By

    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE snap_text (name text, kind text, x float8, y int)")
        with conn.cursor().copy("COPY snap_text FROM STDIN") as copy:
            for i in range(15):
                copy.write_row((f"n{i:02d}", "abc"[min(i // 5, 2)], None if i < 2 else i / 2, i))
        conn.execute("SELECT * FROM pgml.snapshot('snap_text', 'y', preprocess => "
                     "'{\"x\": {\"impute\": \"mean\"}}')").fetchall()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # straight to Postgres, not the proxy
        (snapshot_id,) = conn.execute("SELECT max(id) FROM pgml.snapshots WHERE relation_name = 'snap_text'"
                                      ).fetchone()  # type: ignore[misc]
        kinds: dict[str, int] = dict(conn.execute("SELECT kind, count(*) FROM snap_text GROUP BY 1"))
        _open(browser, f"{dash[1]}/dashboard/snapshots/{snapshot_id}", tmp_path, "snapshot-text")
        conn.execute("DROP TABLE snap_text")

    def histogram(column: str) -> dict[str, float]:
        bars = browser.find_elements(By.CSS_SELECTOR, f'svg.histogram[data-title="{column}"] rect.bar')
        return {b.get_attribute("data-label"): float(b.get_attribute("data-value")) for b in bars}

    names, kind, x = histogram("name"), histogram("kind"), histogram("x")
    assert len(names) == 11 and names["other"] == 5 and sum(names.values()) == 15
    assert kind == {k: float(n) for k, n in kinds.items()}
    assert len(x) == 11 and x["NULL"] == 2 and sum(x.values()) == 15


def test_notebook_cells_are_saved_and_charted(dash: tuple[ProxyProcess, str], browser: Any,
                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(dash[1] + "/dashboard/notebook")
    browser.find_element(By.ID, "notebook-name").send_keys("dash test")
    browser.find_element(By.ID, "create").click()
    # The form posts and the browser follows the redirect to the new notebook: wait for it, as
    # current_url read at once may still be the form's page.
    WebDriverWait(browser, 60).until(EC.url_contains("/dashboard/notebooks/"))
    page_url = browser.current_url
    cells = ["SELECT array_length(pgml.embed('sentence-transformers/all-MiniLM-L6-v2', 'hello'), 1) AS dims",
             "SELECT g AS x, g * g AS square FROM generate_series(1, 5) g"]
    for text in cells:
        box = browser.find_element(By.NAME, "sql")
        box.send_keys(text)
        browser.find_element(By.ID, "run").click()
        # The form posts and the page comes back with the cell: wait for the new page, or the
        # next cell is typed into the old one while it goes (a stale element).
        WebDriverWait(browser, 300).until(EC.staleness_of(box))
        WebDriverWait(browser, 300).until(EC.presence_of_element_located((By.NAME, "sql")))
    browser.get(page_url)  # a reload: the cells come back from pgml.notebook_cells
    browser.save_screenshot(str(tmp_path / "notebook.png"))
    shown = browser.find_elements(By.CSS_SELECTOR, "section.cell")
    assert [s.find_element(By.CSS_SELECTOR, "pre.sql").text for s in shown] == cells
    assert [c.text for c in shown[0].find_elements(By.CSS_SELECTOR, "table.result tbody td")] == ["384"]
    points = shown[1].find_elements(By.CSS_SELECTOR, 'svg.chart[data-title="square"] circle.point')
    assert [(int(p.get_attribute("data-x")), float(p.get_attribute("data-y"))) for p in points] == \
        [(g, g * g) for g in range(1, 6)]
    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        saved = conn.execute("SELECT c.contents, c.cell_type FROM pgml.notebook_cells c JOIN pgml.notebooks n"
                             " ON n.id = c.notebook_id WHERE n.name = 'dash test' ORDER BY c.cell_number")
        assert saved.fetchall() == [(text, 3) for text in cells]


def test_upload_csv_then_query_it(dash: tuple[ProxyProcess, str], browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    csv_path = tmp_path / "cities.csv"
    csv_path.write_text("name,population,area\nParis,2102650,105.4\nLyon,522250,47.87\nNice,,71.92\n")
    browser.get(dash[1] + "/dashboard/upload")
    browser.find_element(By.ID, "table").send_keys("uploaded_cities")
    browser.find_element(By.ID, "file").send_keys(str(csv_path))
    browser.find_element(By.ID, "upload").click()
    # The posted form's answer is a new page: wait for it (a click does not always wait).
    uploaded = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.ID, "uploaded")))
    browser.save_screenshot(str(tmp_path / "upload.png"))
    assert uploaded.text.startswith("3 rows")
    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT name, population, area FROM uploaded_cities ORDER BY name").fetchall()
        types = conn.execute("SELECT atttypid::regtype::text FROM pg_attribute WHERE attrelid ="
                             " 'uploaded_cities'::regclass AND attnum > 0 ORDER BY attnum").fetchall()
        conn.execute("DROP TABLE uploaded_cities")
    assert rows == [("Lyon", 522250, 47.87), ("Nice", None, 71.92), ("Paris", 2102650, 105.4)]
    assert [t for (t,) in types] == ["text", "bigint", "double precision"]


def test_training_curve_grows_while_a_tune_runs(dash: tuple[ProxyProcess, str], browser: Any,
                                                tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE bbc_dash (text text, class text)")
        with conn.cursor().copy("COPY bbc_dash (text, class) FROM STDIN") as copy:
            for row in bbc(40, ("business", "sports")):
                copy.write_row(row)
    hyper = {"training_args": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "logging_steps": 1,
                               "per_device_eval_batch_size": 8, "learning_rate": 1e-4},
             "dataset_args": {"text_column": "text", "class_column": "class"}, "max_seq_length": 32}
    result: dict[str, Any] = {}

    def tune() -> None:
        with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
            result["rows"] = conn.execute(
                "SELECT * FROM pgml.tune('bbc_dash', task => 'text-classification',"
                " relation_name => 'bbc_dash', model_name => 'sentence-transformers/all-MiniLM-L6-v2',"
                " hyperparams => %s::jsonb)",
                (json.dumps(hyper),)).fetchall()

    worker = threading.Thread(target=tune)
    worker.start()
    counts: list[int] = []
    model_id = None
    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        while worker.is_alive():
            if model_id is None:
                model_id = conn.execute("SELECT max(m.id) FROM pgml.models m JOIN pgml.projects p"
                                        " ON p.id = m.project_id WHERE p.name = 'bbc_dash'").fetchone()[0]  # type: ignore[index]
            if model_id is not None:
                browser.get(f"{dash[1]}/dashboard/models/{model_id}/training")
                counts.append(len(browser.find_elements(By.CSS_SELECTOR, LOSS_POINTS)))
            time.sleep(0.5)
    worker.join()
    assert result["rows"] and model_id is not None
    browser.get(f"{dash[1]}/dashboard/models/{model_id}/training")
    browser.save_screenshot(str(tmp_path / "training.png"))
    final = len(browser.find_elements(By.CSS_SELECTOR, LOSS_POINTS))
    with psycopg.connect(dash[0].dsn(), autocommit=True) as conn:
        logged = conn.execute("SELECT count(*) FROM pgml.logs WHERE model_id = %s AND logs ? 'loss'",
                              (model_id,)).fetchone()[0]  # type: ignore[index]
    assert final == logged > 1
    seen = sorted(set(counts))
    assert len(seen) >= 2 and seen[0] < final, counts  # the page showed the curve growing
