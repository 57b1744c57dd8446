"""`pgml-proxy models pull|list|remove`: the model cache from the shell.

Owns the subcommands only: `pull` goes through the same resolution as a SQL call (the
allow-list, aliases, models_dir, the cache, then a download with huggingface_hub's own
progress bars) and then makes the ONNX export that serving the model on ONNX Runtime loads,
so that no statement of a proxy started later runs on torch while it exports; `list` and
`remove` read and prune the standard Hugging Face cache (`HF_HOME`) with huggingface_hub's
cache API. The proxy's `main` hands `argv` here along with a loader for the `[runtime]`
section of the config file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, PgError
from runtime.config import RuntimeConfig

if TYPE_CHECKING:
    from runtime.resolve import ResolvedModel

LoadRuntime = Callable[[str | None], Mapping[str, Any]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgml-proxy models", description="Manage the models the proxy serves.")
    p.add_argument("--config", metavar="PATH", help="TOML config file (as for pgml-proxy)")
    sub = p.add_subparsers(dest="command", required=True)
    pull = sub.add_parser("pull", help="download a model into the HF cache (or check it is on disk)")
    pull.add_argument("name", help="a hub id, an alias or a models_dir name")
    pull.add_argument("--revision", help="a branch, tag or commit (default main)")
    pull.add_argument(
        "--export",
        default="auto",
        metavar="KIND",
        help="the ONNX export to make now: auto (from the model's files: sentence-transformers -> embed, "
        "else its architecture's task), embed, rank, a pgml.transform task (text-classification, "
        "text-generation, ...) or none",
    )
    sub.add_parser("list", help="the models in the Hugging Face cache, with their size")
    remove = sub.add_parser("remove", help="delete a model (every revision) from the Hugging Face cache")
    remove.add_argument("name", help="a hub id")
    return p


def main(argv: list[str], load_runtime: LoadRuntime) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = RuntimeConfig.from_mapping(load_runtime(args.config))
    except ConfigError as exc:
        print(f"pgml-proxy models: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "pull":
            return pull(config, args.name, args.revision, args.export)
        if args.command == "list":
            return list_models()
        return remove(args.name)
    except PgError as exc:
        print(f"pgml-proxy models: {exc.message} (SQLSTATE {exc.sqlstate})", file=sys.stderr)
        for key in ("D", "H"):
            if key in exc.fields:
                print(f"  {exc.fields[key]}", file=sys.stderr)
        return 1


def pull(config: RuntimeConfig, name: str, revision: str | None, export: str = "auto") -> int:
    from runtime.resolve import Resolver

    model = Resolver(config).resolve(name, revision, progress=lambda line: print(line, file=sys.stderr))
    print(f"{name}: {model.path} ({model.key})")
    kind = _export_kind(model) if export == "auto" else None if export == "none" else export
    if kind is None:
        return 0
    from runtime.engines import choose

    if choose(config, {}, onnx_capable=True).engine != "onnx":
        print(f"{name}: served on torch here (runtime.engine, runtime.device): no ONNX export",
              file=sys.stderr)
        return 0
    try:
        made = _export(config, model, kind)
    except PgError as exc:
        # The model is pulled and still serves, on torch; the export is what failed.
        print(f"{name}: no ONNX export for {kind}: {exc.message}", file=sys.stderr)
        return 0
    print(f"{name}: ONNX export for {kind}: {made}" if made else f"{name}: stays on torch for {kind}")
    return 0


# An architecture's class name suffix -> the pgml.transform task whose export serves it.
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)


def _export_kind(model: ResolvedModel) -> str | None:
    """What a model's files say it serves: a sentence-transformers folder embeds, a GGUF file
    generates, else its config.json's architecture; None when they say nothing we export."""
    if model.gguf_file is not None:
        return "text-generation"
    if (model.path / "modules.json").is_file():
        return "embed"
    try:
        arch = json.loads((model.path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    for suffix, task in _ARCHITECTURE_TASKS:
        if any(str(a).endswith(suffix) for a in arch):
            return task
    return None


def _export(config: RuntimeConfig, model: ResolvedModel, kind: str) -> str | None:
    """Make the export (in this process); its folder, or None where the model stays on torch."""
    from runtime import engines, export_worker
    from runtime import transform as tf

    if kind not in ("embed", "rank"):
        kind = tf.parse_task({"task": kind, "model": model.name}, {}, config).base
    if not export_worker.export(config, model, kind, config.trust_remote_code):
        return None
    suffix = engines.sentence_transformer_suffix(kind == "rank") if kind in ("embed", "rank") else (
        engines.pipeline_suffix(kind))
    return str(engines.export_dir(config, model, suffix))


def list_models() -> int:
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir()
    except Exception as exc:  # CacheNotFound: nothing downloaded yet
        print(f"no models in the Hugging Face cache ({exc})", file=sys.stderr)
        return 0
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = ", ".join(sorted(r.commit_hash[:12] for r in repo.revisions))
        print(f"{repo.repo_id}\t{repo.size_on_disk_str}\t{revisions}")
    return 0


def remove(name: str) -> int:
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir()
    except Exception:
        info = None
    repos = [r for r in (info.repos if info else ()) if r.repo_id == name and r.repo_type == "model"]
    if info is None or not repos:
        print(f"pgml-proxy models: {name} is not in the Hugging Face cache", file=sys.stderr)
        return 1
    strategy = info.delete_revisions(*(r.commit_hash for repo in repos for r in repo.revisions))
    strategy.execute()
    for repo in repos:
        # Whatever a revision list does not cover (an interrupted download's parts) goes too.
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    print(f"removed {name} ({strategy.expected_freed_size_str})")
    return 0
