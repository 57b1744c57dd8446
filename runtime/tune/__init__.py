"""Fine-tuning for pgml-proxy: `pgml.tune`, `pgml.generate`, and tuned projects served by `pgml.transform`.

The package's one entry point is `TuneRuntime`; `runtime.Runtime` dispatches `tune` and
`generate` to it and asks it, before resolving a transform's model name, whether the
name is a tuned project (`TuneRuntime.tuned_folder`). Training runs in a worker process
(`runtime.tune.worker`), never in the proxy's.
"""

from .runtime import TuneRuntime

__all__ = ["TuneRuntime"]
