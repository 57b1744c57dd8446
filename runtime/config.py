"""The `[runtime]` settings, as the runtime's modules import them.

Their keys, defaults and validation are declared in `core/settings.py` with the rest of the
settings tree (one place for every key); this module names them for runtime/.
"""

from core.settings import HF_DEFAULT_MODELS, RuntimeConfig, TabularSettings

__all__ = ["HF_DEFAULT_MODELS", "RuntimeConfig", "TabularSettings"]
