"""`pgml.embed` and `pgml.rank`: sentence-transformers models, batched, on ONNX Runtime or torch.

Owns the embedding semantics (the model's own pooling and normalisation from modules.json,
then the call's `prompt`, `truncate_dim`, `normalize_embeddings`, exactly as
`SentenceTransformer.encode` applies them) and the cross-encoder scoring behind `rank`.
The batch functions here run in the runtime's thread pool, never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InvalidParameterValue, PgError
from runtime.config import RuntimeConfig
from runtime.engines import Placement, onnx_files_bytes, onnx_sentence_transformer, torch_precision
from runtime.resolve import ResolvedModel

# Keys that configure the model rather than one call; accepted and applied at load time.
MODEL_KWARGS = frozenset({"device", "revision", "trust_remote_code", "token", "cache_folder"})
_CALL_KWARGS = frozenset({"normalize_embeddings", "prompt", "prompt_name", "truncate_dim", "batch_size"})

EmbedOptions = tuple[bool, str | None, str | None, int | None]


def embed_options(kwargs: Mapping[str, Any]) -> EmbedOptions:
    """Validate embed kwargs; raises InvalidParameterValue naming the bad key."""
    unknown = sorted(set(kwargs) - _CALL_KWARGS - MODEL_KWARGS)
    if unknown:
        raise InvalidParameterValue(
            f'pgml.embed: unknown kwarg "{unknown[0]}"',
            hint="accepted: " + ", ".join(sorted(_CALL_KWARGS | MODEL_KWARGS)),
        )
    normalize = kwargs.get("normalize_embeddings", False)
    prompt = kwargs.get("prompt")
    prompt_name = kwargs.get("prompt_name")
    dim = kwargs.get("truncate_dim")
    if not isinstance(normalize, bool):
        raise InvalidParameterValue("pgml.embed: normalize_embeddings must be a boolean")
    for key, val in (("prompt", prompt), ("prompt_name", prompt_name)):
        if val is not None and not isinstance(val, str):
            raise InvalidParameterValue(f"pgml.embed: {key} must be a string")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise InvalidParameterValue(f"pgml.embed: truncate_dim must be a positive integer, got {dim!r}")
    return normalize, prompt, prompt_name, dim


def approx_tokens(text: str) -> int:
    # A cheap budget estimate (about four characters a token): exact counts would mean
    # tokenising on the event loop, which is the work the batcher moves off it.
    return len(text) // 4 + 2


class EmbedModel:
    """A loaded SentenceTransformer and its batch function."""

    kind = "embed"

    def __init__(self, config: RuntimeConfig, model: ResolvedModel, placement: Placement, trust: bool):
        from sentence_transformers import SentenceTransformer

        self.placement = placement
        self.note = "fp32"
        if placement.engine == "onnx":
            self.st, self.note = onnx_sentence_transformer(config, model, trust)
        else:
            kwargs, self.note = torch_precision(placement)
            self.st = SentenceTransformer(
                str(model.path), device=placement.device, trust_remote_code=trust, model_kwargs=kwargs
            )
        self.st.eval()
        self.dimension = int(self.st.get_embedding_dimension() or 0)
        self.lock = threading.Lock()

    def memory_bytes(self) -> int:
        return _module_bytes(self.st)

    def run(self, payloads: list[tuple[str, EmbedOptions]]) -> list[np.ndarray | PgError]:
        """Embed a batch; items with different options are encoded in separate groups.

        A group whose options fail (a too large `truncate_dim`, an unknown `prompt_name`)
        gets its error; the other callers in the batch still get their vectors.
        """
        out: list[np.ndarray | PgError | None] = [None] * len(payloads)
        groups: dict[EmbedOptions, list[int]] = {}
        for i, (_, opts) in enumerate(payloads):
            groups.setdefault(opts, []).append(i)
        for opts, idx in groups.items():
            try:
                vecs = self._encode([payloads[i][0] for i in idx], opts)
            except PgError as exc:
                vecs = [exc] * len(idx)
            for j, i in enumerate(idx):
                out[i] = vecs[j]
        return [v for v in out if v is not None]

    def _encode(self, texts: list[str], opts: EmbedOptions) -> list[np.ndarray | PgError]:
        normalize, prompt, prompt_name, dim = opts
        if dim is not None and self.dimension and dim > self.dimension:
            raise InvalidParameterValue(
                f"pgml.embed: truncate_dim {dim} is larger than the model's dimension {self.dimension}"
            )
        try:
            # One batch at a time per model: the fast tokenizer is not safe to share across
            # threads ("Already borrowed"), and on the CPU one batch already uses every core.
            with self.lock:
                vecs = self.st.encode(
                    texts,
                    batch_size=len(texts),
                    prompt=prompt,
                    prompt_name=prompt_name,
                    normalize_embeddings=normalize,
                    truncate_dim=dim,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        except (ValueError, KeyError) as exc:
            raise InvalidParameterValue(f"pgml.embed: {exc}") from exc
        return [np.asarray(v, dtype=np.float32) for v in vecs]


class RankModel:
    """A loaded sentence-transformers CrossEncoder; scores (query, document) pairs."""

    kind = "rank"

    def __init__(self, config: RuntimeConfig, model: ResolvedModel, placement: Placement, trust: bool):
        from sentence_transformers import CrossEncoder

        self.placement = placement
        self.note = "fp32"
        if placement.engine == "onnx":
            self.ce, self.note = onnx_sentence_transformer(config, model, trust, cross_encoder=True)
        else:
            kwargs, self.note = torch_precision(placement)
            self.ce = CrossEncoder(
                str(model.path), device=placement.device, trust_remote_code=trust, model_kwargs=kwargs
            )
        self.lock = threading.Lock()

    def memory_bytes(self) -> int:
        return _module_bytes(self.ce.model)

    def run(self, payloads: list[tuple[str, str]]) -> list[float]:
        with self.lock:  # see EmbedModel._encode
            scores = self.ce.predict(payloads, batch_size=len(payloads), show_progress_bar=False)
        return [float(s) for s in np.asarray(scores).reshape(len(payloads), -1)[:, 0]]


def rank_rows(
    documents: Sequence[str], scores: Sequence[float], top_k: int | None
) -> list[tuple[int, float, str]]:
    """(corpus_id, score, text) rows, best first, as pgml.rank returns them."""
    rows = sorted(
        ((i, s, d) for i, (s, d) in enumerate(zip(scores, documents, strict=True))), key=lambda r: -r[1]
    )
    return rows[:top_k] if top_k else rows


def _module_bytes(module: Any) -> int:
    """Parameter and buffer bytes of a torch module; the ONNX file size for ORT models."""
    try:
        import torch

        if isinstance(module, torch.nn.Module):
            total = sum(p.numel() * p.element_size() for p in module.parameters())
            total += sum(b.numel() * b.element_size() for b in module.buffers())
            if total:
                return int(total)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    # ONNX backend (a SentenceTransformer's first module, or a CrossEncoder's ORT model):
    # the session's files are the model's weight.
    first = module[0] if hasattr(module, "__getitem__") else module
    path = getattr(getattr(first, "auto_model", first), "path", None)
    return onnx_files_bytes(Path(path)) if path is not None and Path(path).exists() else 0
