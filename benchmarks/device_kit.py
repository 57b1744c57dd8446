"""Prepare `.device-kit/` for the GPU check (issue 4): what must travel to the GPU machine.

The GPU machine's image has torch (CUDA), but transformers 5.x, sentence-transformers 6.x and
huggingface_hub 1.x, and no network. The runtime is pinned to transformers 4.57 (see
pyproject.toml), so the kit carries the project's own versions as wheels, read from this
environment, plus MiniLM's tokenizer files (its 88 MB of weights cannot travel: the check uses
random-initialised weights of the same architecture, which is enough for throughput). About
17 MB in all, inside the 64 MiB the device tool carries.

    .venv/bin/python -m benchmarks.device_kit            # here, once
    then, in a session lent a GPU: run `bash benchmarks/device_check.sh` with carry [".device-kit"]
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.tiny_models import TOKENIZER_FILES, minilm_tokenizer_dir

KIT = Path(__file__).resolve().parent.parent / ".device-kit"
# The project's pins the GPU image lacks (it has other versions), and the test plugin it lacks.
WHEELS = ("transformers", "sentence-transformers", "tokenizers", "huggingface_hub", "pytest-asyncio")
# The GPU image's Python (KINDS.md in the device tool's notes).
PYTHON = "3.12"


def main() -> None:
    wheels = KIT / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON, "--implementation", "cp", "-d", str(wheels)]
    cmd += [arg for p in platforms for arg in ("--platform", p)]
    subprocess.run([*cmd, *pins], check=True)
    tokenizer = KIT / "minilm-tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    source = minilm_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tokenizer / name)
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
    print(f"{KIT}: {', '.join(pins)} and MiniLM's tokenizer, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
