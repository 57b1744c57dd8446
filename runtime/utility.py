"""The extension's utility functions that need the proxy's Python: versions, packages, GPU cache.

Owns `pgml.python_version()`, `python_package_version(name)`, `python_pip_freeze()`,
`validate_python_dependencies()`, `clear_gpu_cache(memory_usage)` and `proxy_version()`.
PostgresML answers these about the Python inside Postgres; here the models run in the
proxy's Python, so that is the one they describe. `pgml.version()` is plain SQL
(runtime/sql/0005_surface.sql): it gives the extension version the proxy's SQL matches.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

from core.errors import InvalidParameterValue, SystemError_, UndefinedObject

# What the runtime imports to serve every function (distribution name, import name).
DEPENDENCIES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("sentence-transformers", "sentence_transformers"),
    ("huggingface-hub", "huggingface_hub"),
    ("onnxruntime", "onnxruntime"),
    ("scikit-learn", "sklearn"),
    ("xgboost", "xgboost"),
    ("lightgbm", "lightgbm"),
    ("numpy", "numpy"),
)


def call(function: str, args: Mapping[str, Any]) -> Any:
    """One call's result (blocking: run off the event loop)."""
    if function == "python_version":
        return sys.version
    if function == "proxy_version":
        return f"pgml-proxy {importlib.metadata.version('pgml-proxy')}"
    if function == "python_package_version":
        return package_version(args.get("name"))
    if function == "python_pip_freeze":
        return [(line,) for line in pip_freeze()]
    if function == "validate_python_dependencies":
        return validate_dependencies()
    if function == "clear_gpu_cache":
        return clear_gpu_cache(args.get("memory_usage"))
    raise InvalidParameterValue(f"pgml.{function} is not a utility function")


def package_version(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidParameterValue("pgml.python_package_version: name must be a package name")
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise UndefinedObject(f'python package "{name}" is not installed in the proxy\'s Python') from None


def pip_freeze() -> list[str]:
    """`name==version` for every installed distribution, sorted as pip freeze sorts them."""
    seen = {(d.metadata["Name"] or "", d.version) for d in importlib.metadata.distributions()}
    return sorted((f"{n}=={v}" for n, v in seen if n), key=str.lower)


def validate_dependencies() -> bool:
    """True when every package the runtime imports is installed; 58000 naming the missing ones."""
    missing = [dist for dist, module in DEPENDENCIES if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemError_(
            f"python packages missing from the proxy's environment: {', '.join(missing)}",
            hint="pip install pgml-proxy with its extras into the proxy's Python",
        )
    return True


def clear_gpu_cache(memory_usage: Any) -> bool:
    """Free torch's cached CUDA memory (every device; `memory_usage`, a share of memory above
    which the extension clears, is accepted: the proxy clears whenever asked). False without CUDA."""
    if isinstance(memory_usage, bool) or not isinstance(memory_usage, int | float | None):
        raise InvalidParameterValue("pgml.clear_gpu_cache: memory_usage must be a number")
    if "torch" not in sys.modules:  # nothing was ever put on a GPU
        return False
    torch: Any = sys.modules["torch"]
    if not torch.cuda.is_available():
        return False
    torch.cuda.empty_cache()
    return True
