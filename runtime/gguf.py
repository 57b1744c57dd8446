"""GGUF checkpoints to transformers folders, converted once and cached on disk.

transformers can read a GGUF file (dequantising it), but that takes tens of seconds; the
converted model and tokenizer are saved under `<cache_dir>/converted/<name>-<key>` and
loaded from there afterwards. Plain model folders pass through unchanged.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from runtime.config import RuntimeConfig
from runtime.resolve import ResolvedModel, build_once


def ensure_transformers_folder(config: RuntimeConfig, model: ResolvedModel) -> Path:
    """A folder `from_pretrained` can load: the model's own, or its GGUF converted once."""
    if model.gguf_file is None:
        return model.path
    target = config.cache_path / "converted" / model.cache_stem
    if (target / "config.json").is_file():
        return target
    transformers: Any = importlib.import_module("transformers")

    def convert(tmp: Path) -> None:
        tok = transformers.AutoTokenizer.from_pretrained(str(model.path), gguf_file=model.gguf_file)
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), gguf_file=model.gguf_file)
        lm.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    return build_once(target, convert)
