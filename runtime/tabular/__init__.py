"""Tabular ML for pgml-proxy: train/predict/deploy/snapshot/load_dataset with the registry upstream.

The package's one entry point is `TabularRuntime`; `runtime.Runtime` dispatches the
names in `TabularRuntime.functions` to it.
"""

from .runtime import TabularRuntime

__all__ = ["TabularRuntime"]
