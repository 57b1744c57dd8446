"""The `[runtime]` section of config.toml: one typed, frozen object, validated once.

Owns every runtime default (batching, memory budget, model resolution, engines). The
proxy keeps `[runtime]` as a raw mapping; `RuntimeConfig.from_mapping` turns it into
this object and raises `core.errors.ConfigError` naming the first bad key.
`[runtime.tabular]` is passed through untouched to the tabular runtime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import ConfigError

# Hugging Face's own pipeline defaults (transformers.pipelines.SUPPORTED_TASKS, 4.57), so a
# task without a model means what it means to PostgresML users.
HF_DEFAULT_MODELS: Mapping[str, str] = {
    "text-classification": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    "zero-shot-classification": "facebook/bart-large-mnli",
    "token-classification": "dbmdz/bert-large-cased-finetuned-conll03-english",
    "question-answering": "distilbert/distilbert-base-cased-distilled-squad",
    "fill-mask": "distilbert/distilroberta-base",
    "summarization": "sshleifer/distilbart-cnn-12-6",
    "translation": "google-t5/t5-base",
    "text2text-generation": "google-t5/t5-base",
    "text-generation": "openai-community/gpt2",
    "feature-extraction": "distilbert/distilbert-base-cased",
    "conversational": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "embed": "sentence-transformers/all-MiniLM-L6-v2",
    "rank": "cross-encoder/ms-marco-MiniLM-L-6-v2",
}

_CHOICES: Mapping[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "engine": ("auto", "onnx", "torch"),
}


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Every runtime setting; the only place their defaults live."""

    # One folder or several: names are looked up in each, and a client's path must lie in one.
    models_dir: str | tuple[str, ...] = "models"
    # Paths outside models_dir as model names (a single-user machine, a notebook).
    allow_paths: bool = False
    # Hub ids not on disk are downloaded on first use (also off with HF_HUB_OFFLINE=1).
    downloads: bool = True
    cache_dir: str = ".cache/pgml-proxy"
    aliases: Mapping[str, str] = field(default_factory=dict)
    default_models: Mapping[str, str] = field(default_factory=lambda: dict(HF_DEFAULT_MODELS))
    device: str = "auto"
    engine: str = "auto"
    quantize: bool = False
    trust_remote_code: bool = False
    allowed_models: tuple[str, ...] = ()
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 2.0
    queue_size: int = 4096
    memory_budget_mb: int = 4096
    # engine = "auto": a transform model with more weight than this stays on torch. Exporting
    # traces the model in memory (several times its size) and a large decoder gains little.
    onnx_max_model_mb: int = 2048
    preload: tuple[str, ...] = ()
    threads: int = 0  # 0: one per core
    tabular: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> RuntimeConfig:
        """Validate `d` (the raw `[runtime]` table); raises ConfigError naming the key."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"runtime.{unknown[0]}", f"unknown key; accepted keys: {', '.join(sorted(known))}"
            )
        kw: dict[str, Any] = {}
        for name, value in d.items():
            kw[name] = _check(name, value)
        if "default_models" in kw:
            # Configured defaults override Hugging Face's task by task.
            kw["default_models"] = {**HF_DEFAULT_MODELS, **kw["default_models"]}
        return cls(**kw)

    @property
    def thread_count(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    @property
    def models_dirs(self) -> tuple[str, ...]:
        return (self.models_dir,) if isinstance(self.models_dir, str) else self.models_dir

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


def _check(name: str, value: Any) -> Any:
    key = f"runtime.{name}"
    if name == "models_dir" and isinstance(value, list | tuple):
        if not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a folder or a non-empty list of folders")
        return tuple(value)
    if name in ("models_dir", "cache_dir"):
        return _typed(key, value, str)
    if name in ("device", "engine"):
        if value not in _CHOICES[name]:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(_CHOICES[name])}")
        return value
    if name in ("quantize", "trust_remote_code", "allow_paths", "downloads"):
        return _typed(key, value, bool)
    if name in ("aliases", "default_models", "tabular"):
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table")
        if name != "tabular" and not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(key, "every value must be a string")
        return dict(value)
    if name in ("allowed_models", "preload"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of strings")
        return tuple(value)
    if name == "batch_wait_ms":
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(key, "must be a number >= 0")
        return float(value)
    # The remaining keys are counts.
    number = _typed(key, value, int)
    if number < (0 if name == "threads" else 1):
        raise ConfigError(key, f"must be >= {0 if name == 'threads' else 1}, got {number}")
    return number


def _typed(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(key, f"must be {kind.__name__}, got bool")
    if not isinstance(value, kind):
        raise ConfigError(key, f"must be {kind.__name__}, got {type(value).__name__}")
    return value
