"""The process that fits tabular models: `python -m runtime.tabular.fit_worker`.

A scikit-learn fit cannot be interrupted (no hook between trees, support vectors or search
candidates), so every fit runs here, in a process the proxy kills when the statement is
stopped (runtime.tabular.fitproc starts, reuses and kills these; runtime.processes is the
mechanism shared with fine-tuning). One process serves one fit at a time and, warm, the
next: scikit-learn and the converters stay imported between fits.

Reads a job folder's path per line on stdin. The folder holds `job.json` (task, algorithm,
hyperparameters, search, whether to build the ONNX form, the number of classes) and the
arrays as `.npy` files (`x_train`, `x_test`, and `y_train`, `y_test` when there are labels),
never pickles. It fits, scores, stores the model in its safe format (runtime.tabular.storage)
and checks its ONNX form (runtime.tabular.compiled), writes each file as `file-<i>` in the
folder, and answers on stdout, one JSON object per line: ``{"progress": "..."}`` for each
progress line, then ``{"result": {...}}`` or ``{"error": {<ErrorResponse fields>}}``.
Everything the libraries print goes to stderr (the proxy's log). It never talks to the database.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from core.errors import PgError

from . import algorithms, compiled, storage, training

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_OUT: TextIO = sys.stdout


def send(message: dict[str, Any]) -> None:
    _OUT.write(json.dumps(message) + "\n")
    _OUT.flush()


def run(folder: Path) -> dict[str, Any]:
    """Fit the job in `folder`; write its files there; the result line's content."""
    spec = json.loads((folder / "job.json").read_text())
    paths = {name: folder / f"{name}.npy" for name in ARRAYS}
    arrays = {name: np.load(p, allow_pickle=False) if p.exists() else None for name, p in paths.items()}
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    assert x_train is not None and x_test is not None
    task, algorithm = str(spec["task"]), str(spec["algorithm"])
    job = training.TrainJob(
        task, algorithm, dict(spec["hyperparams"]), spec["search"], dict(spec["search_params"]),
        dict(spec["search_args"]), x_train, arrays["y_train"], x_test, arrays["y_test"],
    )
    result = training.fit(job, lambda line: send({"progress": line}))
    lib = algorithms.library(task, algorithm)
    files = [storage.dump(result.estimator, lib)]
    serving = "native: runtime.tabular.onnx is off"
    if spec["onnx"]:
        # Checked against the native model exactly as serving loads it from its stored bytes,
        # on the test split (the training rows when it is empty).
        n_features = int(x_train.shape[1])
        native = storage.load(0, task, lib, algorithm, files[0][1], n_features, int(spec["n_classes"]))
        built, serving = compiled.build(native, x_test if len(x_test) else x_train)
        if built is not None:
            files.append((compiled.ONNX_PATH, built.data))
    for i, (_, blob) in enumerate(files):
        (folder / f"file-{i}").write_bytes(blob)
    return {
        "metrics": training.jsonable(result.metrics),
        "hyperparams": training.jsonable(result.hyperparams),
        "files": [path for path, _ in files],
        "serving": serving,
        "importances": training.importances(result.estimator, int(x_train.shape[1])),
    }


def main() -> int:
    for line in sys.stdin:  # stdin closed: the proxy no longer wants this process
        try:
            send({"result": run(Path(line.strip()))})
        except PgError as exc:  # the client's mistake (22023 for refused hyperparameters, ...)
            send({"error": exc.fields})
        except Exception as exc:  # a library's failure: its traceback goes to the proxy's log
            traceback.print_exc()
            send({"error": {"C": "XX000", "M": f"training failed: {type(exc).__name__}: {exc}"}})
    return 0


if __name__ == "__main__":
    from runtime import processes

    processes.as_worker()
    # The protocol goes on the real stdout; whatever the libraries print goes to stderr.
    _OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.exit(main())
