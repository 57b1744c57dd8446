"""ONNX exports made apart from serving: in this process (`models pull`) or in a child process
(the background export while a model serves on torch).

The background export runs in a child process, not a thread of the proxy: loading a model
for export (transformers' `from_pretrained` under accelerate's `init_empty_weights`, which
patches torch.nn.Module process-wide) broke a torch load running beside it in another thread
("Cannot copy out of meta tensor", SmolLM2), and tracing holds the GIL for long stretches. The
child runs at a lower CPU priority (nice 10) so that serving keeps the cores, and it is killed
when the runtime closes. Its folder is renamed into place only when complete
(resolve.build_once), so a killed export leaves nothing that is read.

Child: ``python -m runtime.export_worker '<json>'``; exit status 0 with "exported" or
"not exported" on stdout, 1 with the error on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.config import RuntimeConfig
from runtime.resolve import ResolvedModel

# The [runtime] keys an export reads; the child gets these, not the whole tree.
_CONFIG_KEYS = ("cache_dir", "engine", "onnx_max_model_mb", "threads")


def export(config: RuntimeConfig, model: ResolvedModel, kind: str, trust: bool) -> bool:
    """Make the ONNX export serving `model` as `kind` ("embed", "rank" or a transform task
    family) on ONNX Runtime loads; False where it stays on torch under engine = "auto"."""
    from runtime import engines
    from runtime import transform as tf

    if kind in ("embed", "rank"):
        engines.export_sentence_transformer(config, model, trust, cross_encoder=kind == "rank")
        return True
    return tf.export_ahead(config, model, kind, trust)


class ChildExports:
    """Exports in child processes, one at a time per caller thread; `kill` ends the running ones."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, config: RuntimeConfig, model: ResolvedModel, kind: str, trust: bool) -> bool:
        """Blocking (call it from a thread): the child's answer; raises RuntimeError on its failure."""
        request = {
            "config": {k: getattr(config, k) for k in _CONFIG_KEYS}
            | {"cache_dir": str(config.cache_path.resolve())},
            "model": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(model).items()},
            "kind": kind,
            "trust": trust,
        }
        with self._lock:
            if self._closed:
                raise RuntimeError("the runtime is closing")
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.export_worker", json.dumps(request)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self._running.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._running.discard(proc)
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"export process exited with {proc.returncode}: {' | '.join(tail)}")
        # The last line is the child's answer (a library may print before it).
        return out.decode(errors="replace").strip().splitlines()[-1:] == ["exported"]

    def kill(self) -> None:
        with self._lock:
            self._closed = True
            for proc in self._running:
                proc.kill()


def _main(argv: list[str]) -> int:
    os.nice(10)  # background work: serving keeps the CPU
    request: dict[str, Any] = json.loads(argv[0])
    config = RuntimeConfig.from_mapping(request["config"])
    fields = request["model"]
    model = ResolvedModel(
        fields["name"], Path(fields["path"]), fields["key"], fields.get("gguf_file"), fields.get("target", "")
    )
    try:
        made = export(config, model, request["kind"], bool(request["trust"]))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("exported" if made else "not exported", flush=True)
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    # os._exit: skip the interpreter's teardown of torch and onnxruntime (seconds), as proxy.main does.
    os._exit(_main(sys.argv[1:]))
