"""GGUF checkpoints to transformers folders, converted once and cached on disk.

transformers can read a GGUF file (dequantising it), but that takes tens of seconds; the
converted model and tokenizer are saved under `<cache_dir>/converted/<name>-<key>` and
loaded from there afterwards. Plain model folders pass through unchanged.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Any

from runtime.config import RuntimeConfig
from runtime.resolve import ResolvedModel


def ensure_transformers_folder(config: RuntimeConfig, model: ResolvedModel) -> Path:
    """A folder `from_pretrained` can load: the model's own, or its GGUF converted once."""
    if model.gguf_file is None:
        return model.path
    target = config.cache_path / "converted" / model.cache_stem
    if (target / "config.json").is_file():
        return target
    transformers: Any = importlib.import_module("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(model.path), gguf_file=model.gguf_file)
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), gguf_file=model.gguf_file)
    # Write beside the target and rename: a crash mid-save never leaves a half folder behind.
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    lm.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target
