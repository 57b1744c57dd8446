"""Models from the Hugging Face Hub: the standard cache, and downloads into it on first use.

Owns when downloads are allowed (`runtime.downloads`, `HF_HUB_OFFLINE`; hub datasets read the
same switch, runtime/tabular/datasets.py), the one download per model across threads and
processes (a file lock beside huggingface_hub's own), the marker that keeps a half-downloaded
snapshot from being trusted, progress reports, and which SQLSTATE each hub failure becomes
(`hub_errors`, for models and datasets alike). The real client (`huggingface_hub`) does the
HTTP: `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME` mean what they mean to it. Blocking: callers
run it off the event loop (`resolve.Resolver.aresolve`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.errors import (
    ConnectionFailure,
    InsufficientPrivilege,
    IoError,
    PgError,
    SqlclientUnableToEstablishSqlconnection,
    UndefinedModel,
)
from runtime.config import RuntimeConfig

log = logging.getLogger(__name__)

# Written before a download starts and removed when every file is in: a snapshot folder
# with it is a download that did not finish (its refs and some files exist already).
INCOMPLETE = ".pgml-proxy-incomplete"
ATTEMPTS = 3  # a dropped connection is resumed (blobs keep their .incomplete part)
LOCK_WAIT_S = 3600.0  # another process's download of the same model: wait for it
PROGRESS_EVERY_S = 1.0


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_root() / repo_folder_name(repo_id=repo_id, repo_type="model")


def downloads_off(config: RuntimeConfig) -> str | None:
    """Why downloads are off, or None when they are on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not config.downloads:
        return "runtime.downloads = false"
    return None


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot of `repo_id` in the local cache, never the network; None when absent or
    when a download of it was interrupted."""
    from huggingface_hub import snapshot_download

    if (repo_folder(repo_id) / INCOMPLETE).exists():
        return None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # huggingface_hub raises several kinds for "not in the cache"
        return None


def download(repo_id: str, revision: str | None, progress: Callable[[str], None] | None = None) -> Path:
    """Download `repo_id` into the standard cache (once, whoever else asks) and return its snapshot."""
    from filelock import FileLock, Timeout

    say = progress or (lambda _msg: None)
    folder = repo_folder(repo_id)
    lock_path = cache_root() / ".locks" / f"{folder.name}.pgml-proxy.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another download of {repo_id}")
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout:
            raise SqlclientUnableToEstablishSqlconnection(
                f'model "{repo_id}": another download did not finish within {LOCK_WAIT_S:.0f} s'
            ) from None
    try:
        found = cached_snapshot(repo_id, revision)  # another process may have finished it
        if found is not None:
            return found
        return _download_locked(repo_id, revision, folder, say)
    finally:
        lock.release()


def _download_locked(repo_id: str, revision: str | None, folder: Path, say: Callable[[str], None]) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    with hub_errors(repo_id):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = {_blob_name(s): (s.rfilename, int(s.size or 0)) for s in info.siblings or []}
    total = sum(size for _name, size in files.values())
    say(f"downloading {repo_id} ({len(files)} files, {_mb(total)})")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INCOMPLETE).write_text(str(os.getpid()))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with hub_errors(repo_id), _reporting(repo_id, folder / "blobs", files, total, say):
                snapshot = Path(snapshot_download(repo_id, revision=revision))
            break
        except ConnectionFailure as exc:
            if attempt == ATTEMPTS:
                raise
            say(f"download of {repo_id} interrupted ({exc.message}); resuming, attempt {attempt + 1}")
    (folder / INCOMPLETE).unlink(missing_ok=True)
    say(f"downloaded {repo_id}: {_mb(total)}")
    return snapshot


def _blob_name(sibling: Any) -> str:
    """The cache's blob file name of a repo file: its LFS sha256, else its git blob id."""
    lfs = getattr(sibling, "lfs", None)
    return str(lfs.sha256 if lfs is not None else sibling.blob_id)


@contextlib.contextmanager
def _reporting(repo_id: str, blobs: Path, files: dict[str, tuple[str, int]], total: int,
               say: Callable[[str], None]) -> Iterator[None]:
    """Report progress every PROGRESS_EVERY_S from the blob files' sizes on disk, which
    huggingface_hub writes as `<blob>.incomplete` and renames when a file is done."""
    stop = threading.Event()
    reported: set[str] = set()

    def report() -> None:
        done, lines = 0, []
        for blob, (name, size) in files.items():
            if (blobs / blob).exists():
                done += size
                if blob not in reported:
                    reported.add(blob)
                    lines.append(f"{name} {_mb(size)} (100%)")
            elif (part := blobs / f"{blob}.incomplete").exists():
                got = part.stat().st_size
                done += got
                lines.append(f"{name} {_mb(got)} of {_mb(size)} ({100 * got // max(size, 1)}%)")
        if lines:
            say(f"downloading {repo_id}: {', '.join(lines)}; total {_mb(done)} of {_mb(total)} "
                f"({100 * done // max(total, 1)}%)")

    def watch() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            report()

    watcher = threading.Thread(target=watch, name="pgml-hub-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        report()  # the files that finished since the last tick


@contextlib.contextmanager
def hub_errors(repo_id: str, what: str = "model",
               elsewhere: str = "or place the model on disk") -> Iterator[None]:
    """huggingface_hub's and requests' exceptions as the SQLSTATE a client can act on; `what`
    names the kind of repo (a model, a dataset) in the messages."""
    import requests
    from huggingface_hub import errors as hf

    unreachable = f'could not reach the hub to download {what} "{repo_id}"'
    check = f"check HF_ENDPOINT and the network, {elsewhere}"
    try:
        yield
    except PgError:
        raise
    except hf.LocalEntryNotFoundError as exc:  # snapshot_download's word for "hub unreachable"
        raise SqlclientUnableToEstablishSqlconnection(unreachable, detail=_first_line(exc),
                                                      hint=check) from None
    except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError) as exc:
        raise UndefinedModel(f'{what} "{repo_id}" not found on the hub',
                             detail=_first_line(exc)) from None
    except hf.GatedRepoError as exc:
        raise InsufficientPrivilege(f'{what} "{repo_id}" is gated on the hub', detail=_first_line(exc),
                                    hint="set HF_TOKEN for the proxy to a token that has access") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise InsufficientPrivilege(f'the hub refused {what} "{repo_id}" ({status})',
                                        hint="set HF_TOKEN for the proxy") from None
        raise ConnectionFailure(f'downloading {what} "{repo_id}" failed: the hub answered {status}',
                                detail=_first_line(exc)) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise SqlclientUnableToEstablishSqlconnection(unreachable, detail=_first_line(exc),
                                                      hint=check) from None
    except (OSError, requests.RequestException) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise IoError(f'downloading {what} "{repo_id}": {exc.strerror}') from None
        raise ConnectionFailure(f'downloading {what} "{repo_id}" was interrupted',
                                detail=_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
