"""Engine and device choice, and the on-disk ONNX export cache shared by the model kinds.

Owns the rule "ONNX Runtime on the CPU, torch (fp16) on CUDA", the cache folder layout
(`<cache_dir>/onnx/<name>-<content key>[-int8]`) and the int8 quality gate: a quantised
export is used only when its embeddings keep a cosine >= 0.99 against fp32 on a probe set,
and the measured figure is recorded next to the export.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import FeatureNotSupported, InvalidParameterValue
from runtime.config import RuntimeConfig
from runtime.resolve import ResolvedModel, build_once

QUANT_MIN_COSINE = 0.99
_PROBE = [
    "The quick brown fox jumps over the lazy dog.",
    "PostgreSQL is a powerful, open source object-relational database system.",
    "How do I reset my password?",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "a",
    "The weather in Paris is mild in spring, with occasional rain showers and cool evenings.",
]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where and how a model runs."""

    engine: str  # "onnx" | "torch"
    device: str  # "cpu" | "cuda"


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def weight_mb(folder: Path) -> float:
    """The model's weight files in a folder (safetensors, PyTorch bins, GGUF), in MiB."""
    suffixes = (".safetensors", ".bin", ".pt", ".gguf")
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in suffixes and f.is_file()) / 2**20


def choose(config: RuntimeConfig, kwargs: dict[str, Any], onnx_capable: bool) -> Placement:
    """The placement for a model; a call's `device` kwarg may narrow the configured one."""
    device = str(kwargs.get("device", config.device))
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidParameterValue(f'device "{device}" is not one of auto, cpu, cuda')
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    elif device.startswith("cuda") and not cuda_available():
        raise InvalidParameterValue(f'device "{device}" was asked for but no CUDA device is present')
    device = "cuda" if device.startswith("cuda") else "cpu"
    engine = config.engine
    if engine == "auto":
        engine = "onnx" if (device == "cpu" and onnx_capable) else "torch"
    if engine == "onnx" and not onnx_capable:
        engine = "torch"
    return Placement(engine, device)


def torch_precision(placement: Placement) -> tuple[dict[str, Any], str]:
    """Model kwargs and their note for torch: fp16 on CUDA (tensor cores), fp32 on the CPU."""
    if placement.device != "cuda":
        return {}, "fp32"
    import torch

    return {"dtype": torch.float16}, "fp16"


def export_dir(config: RuntimeConfig, model: ResolvedModel, suffix: str = "") -> Path:
    return config.cache_path / "onnx" / f"{model.cache_stem}{suffix}"


def _export_once(folder: Path, export: Callable[[Path], None]) -> None:
    """`export(tmp)` once per folder (resolve.build_once), quietly."""
    with warnings.catch_warnings():
        # The exporter traces the model; its TracerWarnings are expected and harmless.
        warnings.simplefilter("ignore")
        build_once(folder, export)


def onnx_sentence_transformer(
    config: RuntimeConfig, model: ResolvedModel, trust: bool, cross_encoder: bool = False
) -> tuple[Any, str]:
    """A SentenceTransformer (or CrossEncoder) on ONNX Runtime, exported once; returns (model, note).

    int8 is considered for embedding models only: its gate measures embedding cosine.
    """
    folder = export_sentence_transformer(config, model, trust, cross_encoder)
    st = _load_sentence_transformer(config, folder, trust, cross_encoder)
    if not config.quantize or cross_encoder:
        return st, "fp32"
    return _maybe_quantized(config, folder, st, trust)


def sentence_transformer_suffix(cross_encoder: bool) -> str:
    return "-ce" if cross_encoder else ""


def export_ready(config: RuntimeConfig, model: ResolvedModel, suffix: str) -> bool:
    """Whether the ONNX export with this folder suffix is on disk (a load, not an export, away)."""
    return export_dir(config, model, suffix).is_dir()


def export_sentence_transformer(
    config: RuntimeConfig, model: ResolvedModel, trust: bool, cross_encoder: bool = False
) -> Path:
    """Export a SentenceTransformer (or CrossEncoder) to ONNX once; returns the export's folder.

    Separate from loading so that the export can run in the background, or ahead of time
    (`pgml-proxy models pull`), while the model is served on torch."""
    folder = export_dir(config, model, sentence_transformer_suffix(cross_encoder))
    _export_once(
        folder,
        lambda tmp: _load_sentence_transformer(config, model.path, trust, cross_encoder).save_pretrained(
            str(tmp)
        ),
    )
    return folder


def _load_sentence_transformer(config: RuntimeConfig, path: Path, trust: bool, cross_encoder: bool) -> Any:
    """On ONNX Runtime; from a model folder this exports in memory, from an export it loads."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    cls: Any = CrossEncoder if cross_encoder else SentenceTransformer
    return cls(
        str(path), backend="onnx", device="cpu", trust_remote_code=trust, model_kwargs=_ort_kwargs(config)
    )


# transformers pipeline task -> the optimum-onnx class that exports and runs it.
_ORT_CLASSES = {
    "text-classification": "ORTModelForSequenceClassification",
    "zero-shot-classification": "ORTModelForSequenceClassification",
    "token-classification": "ORTModelForTokenClassification",
    "question-answering": "ORTModelForQuestionAnswering",
    "fill-mask": "ORTModelForMaskedLM",
    "feature-extraction": "ORTModelForFeatureExtraction",
    "summarization": "ORTModelForSeq2SeqLM",
    "translation": "ORTModelForSeq2SeqLM",
    "text2text-generation": "ORTModelForSeq2SeqLM",
    "text-generation": "ORTModelForCausalLM",
    "conversational": "ORTModelForCausalLM",
}


def onnx_pipeline(
    config: RuntimeConfig, model: ResolvedModel, folder: Path, task: str, base: str, trust: bool
) -> tuple[Any, Path]:
    """A transformers pipeline whose model is the optimum-onnx export of `folder`, and the export's folder.

    `base` is the task family (its ORT class); `task` is what the pipeline is built for
    (e.g. "translation_en_to_fr", "text-generation" for chat). Raises FeatureNotSupported
    when the architecture has no ONNX export.
    """
    import optimum.onnxruntime as ort
    from optimum.pipelines import pipeline

    # Any: transformers' from_pretrained is untyped.
    auto_tokenizer: Any = importlib.import_module("transformers").AutoTokenizer
    cls = getattr(ort, _ORT_CLASSES[base])
    target = export_pipeline(config, model, folder, base, trust)
    ort_model = cls.from_pretrained(
        str(target), provider="CPUExecutionProvider", session_options=_session_options(config)
    )
    tok = auto_tokenizer.from_pretrained(str(target), trust_remote_code=trust)
    return pipeline(task, model=ort_model, tokenizer=tok, accelerator="ort", device="cpu"), target


def pipeline_suffix(base: str) -> str:
    """The export folder's suffix for a task family: its ORT class, shared by the tasks that use it."""
    return f"-{_ORT_CLASSES[base]}"


def export_pipeline(
    config: RuntimeConfig, model: ResolvedModel, folder: Path, base: str, trust: bool
) -> Path:
    """Export `folder` with the task family's optimum-onnx class once; returns the export's folder.

    Raises FeatureNotSupported when the architecture has no ONNX export."""
    import optimum.onnxruntime as ort

    auto_tokenizer: Any = importlib.import_module("transformers").AutoTokenizer
    cls = getattr(ort, _ORT_CLASSES[base])
    target = export_dir(config, model, pipeline_suffix(base))

    def export(tmp: Path) -> None:
        try:
            exported = cls.from_pretrained(str(folder), export=True, trust_remote_code=trust)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise FeatureNotSupported(
                f'model "{model.name}" has no ONNX export for {base}: {exc}',
                hint='set [runtime] engine = "torch" for it',
            ) from exc
        exported.save_pretrained(str(tmp))
        auto_tokenizer.from_pretrained(str(folder), trust_remote_code=trust).save_pretrained(str(tmp))

    _export_once(target, export)
    return target


def onnx_files_bytes(path: Path) -> int:
    """An ONNX model's weight: a graph file and its external data, or all of an export folder's."""
    files = path.rglob("*.onnx*") if path.is_dir() else path.parent.glob(f"{path.name}*")
    return sum(f.stat().st_size for f in files if f.is_file())


def _session_options(config: RuntimeConfig) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.thread_count
    return opts


def _ort_kwargs(config: RuntimeConfig) -> dict[str, Any]:
    return {"provider": "CPUExecutionProvider", "session_options": _session_options(config)}


def _maybe_quantized(config: RuntimeConfig, folder: Path, fp32: Any, trust: bool) -> tuple[Any, str]:
    """int8 only where the probe set keeps cosine >= QUANT_MIN_COSINE; the figure is recorded."""
    import numpy as np
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    report = folder / "quantization.json"
    if not report.is_file():
        export_dynamic_quantized_onnx_model(fp32, "avx2", str(folder))
    # The exporter names the file after its quantisation type (model_quint8_avx2.onnx today).
    qfile = str(next((folder / "onnx").glob("model_*int8_avx2.onnx")).relative_to(folder))

    def load_int8() -> Any:
        return SentenceTransformer(
            str(folder),
            backend="onnx",
            device="cpu",
            trust_remote_code=trust,
            model_kwargs={**_ort_kwargs(config), "file_name": qfile},
        )

    q: Any = None
    if not report.is_file():
        q = load_int8()  # loaded once: probed here, served below when it passes
        a = fp32.encode(_PROBE, normalize_embeddings=True)
        b = q.encode(_PROBE, normalize_embeddings=True)
        cosine = float(np.min(np.sum(a * b, axis=1)))
        report.write_text(
            json.dumps(
                {"min_cosine": cosine, "threshold": QUANT_MIN_COSINE, "passed": cosine >= QUANT_MIN_COSINE}
            )
        )
    result = json.loads(report.read_text())
    if not result["passed"]:
        return fp32, f"fp32 (int8 rejected: min cosine {result['min_cosine']:.4f})"
    if q is None:
        q = load_int8()
    return q, f"int8 (min cosine {result['min_cosine']:.4f})"
