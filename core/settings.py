"""The settings tree: every key of config.toml with its default and its validation, here only.

`Config` is the whole tree: the `[proxy]` keys, `[runtime]` (`RuntimeConfig`, with
`[runtime.tabular]` as `TabularSettings`), `[planner]` (`PlannerSettings`) and `[http]`
(`HttpSettings`).
`Config.validate` checks every section, so a start, a RELOAD and a SIGHUP (all of which go
through `proxy.config.load`) refuse a bad tree before anything of it is applied. Errors are
`core.errors.ConfigError` carrying the key's full dotted name (`runtime.tabular.pool_size`).
`proxy/config.py` reads the tree from TOML, the environment and flags; the owners of the
sections take their part already validated (`RuntimeConfig.from_mapping` and friends are
idempotent, so a section may also be given as a plain mapping, as tests do).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import ConfigError


def _count(key: str, value: Any, low: int = 1) -> int:
    """An integer >= `low` (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, f"must be an integer >= {low}, got {value!r}")
    return value


def _unknown(section: str, given: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}", f"unknown key; accepted keys: {', '.join(sorted(known))}"
        )


# --- [planner] -------------------------------------------------------------------------------------
CTAS_EMBEDDING_TYPES = ("vector", "real[]")


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    chunk_rows: int = 1000  # rows fetched from the upstream per model batch
    # A stream whose calls give one number per row (predict) doubles its chunks while they stay
    # under half this many bytes: fewer, larger model calls for narrow rows, memory still bounded.
    chunk_bytes: int = 4 << 20
    materialise_rows: int = 5000  # argument values per batch when a call is materialised
    parse_cache_size: int = 512  # analysed statements kept by text (0: none)
    # The column type CREATE TABLE AS gives a bare pgml.embed(): pgvector's, or the extension's real[].
    ctas_embedding_type: str = "vector"
    # Statements whose only work is constant pgml calls: their Describe answered from a cache
    # by text and parameter types, with no upstream round trip (planner/handler.py).
    fast_path: bool = True

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> PlannerSettings:
        d = dict(d or {})
        _unknown("planner", d, {f.name for f in fields(cls)})
        for key, value in d.items():
            if key == "fast_path":
                if not isinstance(value, bool):
                    raise ConfigError("planner.fast_path", f"expected true or false, got {value!r}")
            elif key == "ctas_embedding_type":
                if value not in CTAS_EMBEDDING_TYPES:
                    raise ConfigError(
                        f"planner.{key}", f"expected one of {CTAS_EMBEDDING_TYPES}, got {value!r}"
                    )
            else:
                _count(f"planner.{key}", value, 0 if key in ("parse_cache_size", "chunk_bytes") else 1)
        return cls(**d)


# --- [http] ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP listener (OpenAI-compatible API, dashboard, /metrics); off while `listen` is empty."""

    listen: str = ""  # HOST:PORT, e.g. "127.0.0.1:8000"
    api_keys: Mapping[str, str] = field(default_factory=dict)  # bearer key -> proxy user
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none
    max_n: int = 16  # the largest n (choices per request)
    max_inputs: int = 2048  # texts per embeddings request

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> HttpSettings:
        d = dict(d or {})
        _unknown("http", d, {f.name for f in fields(cls)})
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key == "listen":
                if not isinstance(value, str) or (value and not _host_port(value)):
                    raise ConfigError("http.listen", f"expected HOST:PORT or empty (off), got {value!r}")
                kw[key] = value
            elif key == "api_keys":
                if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
                ):
                    raise ConfigError("http.api_keys", 'expected a table of "key" = "user"')
                kw[key] = dict(value)
            else:
                kw[key] = _count(f"http.{key}", value)
        return cls(**kw)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def _host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


# --- [runtime.tabular] -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TabularSettings:
    pool_size: int = 4  # the tabular runtime's own upstream connections
    predict_threads: int = 2
    max_batch_rows: int = 4096
    max_queue: int = 10000
    max_models: int = 32  # loaded tabular models kept in memory
    # Fit processes kept warm for the next pgml.train (runtime/tabular/fitproc.py): a cold one
    # costs 1-3 s of imports, a warm one holds 0.3-0.5 GB (scikit-learn, XGBoost, the ONNX
    # converters once used). 0: a new process per fit.
    idle_fit_processes: int = 1
    # Serve with ONNX Runtime where the conversion is checked equal (runtime/tabular/compiled.py).
    onnx: bool = True
    # A compiled model's small batch runs on the event loop, not in a predict thread, while its
    # measured time there for that many rows stays under this (runtime/batcher.py). A one-row
    # ONNX predict takes ~20 us; the hop to a thread and back costs more. 0: never on the loop.
    inline_budget_us: int = 250
    # hub dataset name -> offline generator (runtime/tabular/offline_datasets.py checks the name)
    dataset_substitutes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> TabularSettings:
        d = dict(d or {})
        _unknown("runtime.tabular", d, {f.name for f in fields(cls)})
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key == "dataset_substitutes":
                if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
                    raise ConfigError(
                        "runtime.tabular.dataset_substitutes", "expected a table of name = generator"
                    )
                kw[key] = {str(k): v for k, v in value.items()}
            elif key == "onnx":
                if not isinstance(value, bool):
                    raise ConfigError("runtime.tabular.onnx", f"expected true or false, got {value!r}")
                kw[key] = value
            else:
                low = 0 if key in ("inline_budget_us", "idle_fit_processes") else 1
                kw[key] = _count(f"runtime.tabular.{key}", value, low)
        return cls(**kw)


# --- [runtime] -------------------------------------------------------------------------------------
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
    # glibc serves allocations this large or larger with their own mmap, given back the moment
    # they are freed: a model's weights are mostly 1-4 MiB tensors, which glibc's default (a
    # threshold that rises to 32 MiB as large blocks are freed) puts in its heaps, where an
    # evicted model's pages stay resident. 0: glibc's default. benchmarks/coldstart.py measures it.
    malloc_mmap_threshold_kb: int = 1024
    # engine = "auto": a transform model with more weight than this stays on torch. Exporting
    # traces the model in memory (several times its size) and a large decoder gains little.
    onnx_max_model_mb: int = 2048
    # A model on ONNX Runtime whose export is not on disk yet is served on torch while the export
    # runs in a background process, so no statement waits for it (an export takes seconds for
    # MiniLM, minutes for a small decoder). Embedding, rank and classification-type models then
    # switch to ONNX; generation stays on torch for the process (docs/DESIGN.md says why).
    # false: the first call exports and waits, as `preload` and `models pull` always do.
    export_in_background: bool = True
    preload: tuple[str, ...] = ()
    threads: int = 0  # 0: one per core
    tabular: TabularSettings = field(default_factory=TabularSettings)

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
    if name in ("quantize", "trust_remote_code", "allow_paths", "downloads", "export_in_background"):
        return _typed(key, value, bool)
    if name in ("aliases", "default_models", "tabular"):
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table")
        if name == "tabular":
            return TabularSettings.from_mapping(value)
        if not all(isinstance(v, str) for v in value.values()):
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


# --- [proxy], and the whole tree ---------------------------------------------------------------
POOL_MODES = ("session", "transaction")
LOAD_BALANCING = ("round_robin", "least_connections", "random")
CLIENT_AUTH_METHODS = ("trust", "cleartext", "md5", "scram-sha-256", "passthrough")


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:6432"
    # libpq URL or key=value string; empty means: start the embedded Postgres in data_dir.
    upstream: str = ""
    pool_mode: str = "session"
    data_dir: str = "./pgml-data"
    # Server connections per (database, user) pool, and how long a client waits for one.
    pool_size: int = 20
    pool_timeout: float = 5.0
    # Idle server connections older than this are closed.
    server_idle_timeout: float = 600.0
    # How a server connection is reset before it goes back to the pool.
    server_reset_query: str = "DISCARD ALL"
    max_client_connections: int = 1000
    # Several proxy processes listening on one port (SO_REUSEPORT): the kernel spreads the clients.
    reuse_port: bool = False
    # Largest protocol message accepted from a client (bytes); larger ones are a protocol violation.
    max_message_size: int = 64 * 1024 * 1024
    # Client authentication: trust | cleartext | md5 | scram-sha-256 | passthrough (the upstream checks).
    auth_method: str = "trust"
    # user -> password (plain text or an md5/SCRAM verifier as Postgres stores them).
    users: Mapping[str, str] = field(default_factory=dict)
    # TLS towards clients: both set -> SSLRequest answered 'S'; else 'N'.
    tls_cert: str = ""
    tls_key: str = ""
    # TLS towards the upstream: disable | prefer | require (sslmode in the DSN wins when given).
    upstream_sslmode: str = "prefer"
    admin_users: tuple[str, ...] = ()
    # Prometheus metrics over HTTP; 0 disables.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # SIGINT: how long transactions get to finish before their clients are cut.
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"
    # Read replicas (libpq DSNs, `--replica` / PGML_PROXY_REPLICAS, comma-separated there). Roles
    # are found with pg_is_in_recovery(), so upstream and replicas may be listed in any order.
    replicas: tuple[str, ...] = ()
    replica_weights: tuple[str, ...] = ()  # integers >= 1, one per replica in order (default 1)
    load_balancing: str = "round_robin"  # round_robin | least_connections | random
    primary_reads: bool = False  # the primary serves reads too (it always does when no replica can)
    max_replica_lag: int = 16 * 1024 * 1024  # bytes of WAL behind the primary before a ban
    ban_time: float = 60.0  # seconds a failing or lagging replica is left out
    health_check_interval: float = 1.0  # seconds between checks of every server (roles, lag)
    health_check_timeout: float = 2.0
    # After a client's write commits, its reads go to a replica only once it has replayed it.
    read_your_writes: bool = True
    # The sections of their owners, kept as given (mappings) and validated by `validate`.
    runtime: Mapping[str, Any] = field(default_factory=dict)
    planner: Mapping[str, Any] = field(default_factory=dict)
    http: Mapping[str, Any] = field(default_factory=dict)

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def validate(self) -> Config:
        """Return self, or raise ConfigError naming the first bad key of the whole tree."""
        RuntimeConfig.from_mapping(self.runtime)
        PlannerSettings.from_mapping(self.planner)
        http = HttpSettings.from_mapping(self.http)
        unknown_users = sorted(set(http.api_keys.values()) - set(self.users)) if self.users else []
        if unknown_users:
            raise ConfigError("http.api_keys", f"maps a key to {unknown_users[0]!r}, who is not in users")
        if not _host_port(self.listen):
            raise ConfigError("listen", f"expected HOST:PORT, got {self.listen!r}")
        if self.pool_mode not in POOL_MODES:
            raise ConfigError("pool_mode", f"expected one of {POOL_MODES}, got {self.pool_mode!r}")
        if self.auth_method not in CLIENT_AUTH_METHODS:
            raise ConfigError(
                "auth_method", f"expected one of {CLIENT_AUTH_METHODS}, got {self.auth_method!r}"
            )
        if self.auth_method in ("cleartext", "md5", "scram-sha-256") and not self.users:
            raise ConfigError("users", f"auth_method {self.auth_method!r} needs at least one user")
        if self.upstream_sslmode not in ("disable", "prefer", "require"):
            raise ConfigError("upstream_sslmode", "expected disable, prefer or require")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert" if not self.tls_cert else "tls_key", "set both tls_cert and tls_key")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ConfigError(key, f"no such file: {path}")
        for key in ("pool_size", "max_client_connections", "max_message_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, "must be at least 1")
        for key in ("pool_timeout", "server_idle_timeout", "shutdown_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        self._validate_replicas()
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", "must be a port number (0 disables)")
        return self

    @property
    def weights(self) -> tuple[int, ...]:
        """`replica_weights` as integers (validated)."""
        return tuple(int(w) for w in self.replica_weights)

    def _validate_replicas(self) -> None:
        if self.load_balancing not in LOAD_BALANCING:
            raise ConfigError("load_balancing",
                              f"expected one of {LOAD_BALANCING}, got {self.load_balancing!r}")
        if len(self.replica_weights) > len(self.replicas):
            raise ConfigError("replica_weights", f"{len(self.replica_weights)} weights for "
                              f"{len(self.replicas)} replicas: give at most one per replica")
        for w in self.replica_weights:
            if not str(w).isdigit() or int(w) < 1:
                raise ConfigError("replica_weights", f"must be integers >= 1, got {w!r}")
        if self.max_replica_lag < 0:
            raise ConfigError("max_replica_lag", "must be >= 0 (bytes of WAL)")
        for key in ("ban_time", "health_check_interval", "health_check_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
