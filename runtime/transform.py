"""`pgml.transform` and `pgml.transform_stream`: Hugging Face pipelines, batched across calls.

Owns task parsing (text or jsonb task, model choice, pipeline options), input checks,
the batch function that runs one pipeline call per group of identical call arguments,
the reshaping that gives each SQL call exactly the pipeline's own output shape, and
token streaming. Pipelines run on ONNX Runtime on the CPU (optimum-onnx exports, cached on
disk) and on torch (fp16) on CUDA; an architecture the exporter lacks falls back to torch
when the engine is "auto".
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import FeatureNotSupported, InvalidParameterValue, PgError
from runtime.config import RuntimeConfig
from runtime.engines import (
    Placement,
    export_pipeline,
    onnx_files_bytes,
    onnx_pipeline,
    torch_precision,
    weight_mb,
)
from runtime.gguf import ensure_transformers_folder
from runtime.resolve import ResolvedModel

TASKS = frozenset(
    {
        "text-classification",
        "zero-shot-classification",
        "token-classification",
        "translation",
        "summarization",
        "question-answering",
        "text-generation",
        "text2text-generation",
        "fill-mask",
        "feature-extraction",
        "conversational",
    }
)
_TASK_ALIASES = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "chat": "conversational",
}
_TRANSLATION = re.compile(r"^translation_[a-z]{2,3}_to_[a-z]{2,3}$")
# Options of the jsonb task that configure the model (PostgresML passes them to pipeline()).
_MODEL_KWARGS = frozenset(
    {
        "device",
        "device_map",
        "torch_dtype",
        "dtype",
        "trust_remote_code",
        "revision",
        "token",
        "use_auth_token",
        "load_in_8bit",
        "load_in_4bit",
        "model_type",
    }
)
# Generation options users put in the task object (the pgml SDK does: `{"model": ...,
# "temperature": 0.1, "repetition_penalty": 1.5}`): call arguments for the generative tasks,
# as the extension passes them on. `max_tokens` is OpenAI's name for max_new_tokens.
_GENERATION_OPTIONS = frozenset(
    {"temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "max_new_tokens", "max_tokens",
     "num_beams", "no_repeat_ngram_size", "min_new_tokens"}
)
# Model options the proxy accepts but cannot apply, with why (sent as a WARNING).
IGNORED_MODEL_KWARGS: Mapping[str, str] = {
    "torch_dtype": "the engine picks the precision (fp32 on ONNX Runtime, fp16 on CUDA)",
    "dtype": "the engine picks the precision (fp32 on ONNX Runtime, fp16 on CUDA)",
    "device_map": "a model runs on the one device runtime.device names",
    "load_in_8bit": "bitsandbytes quantisation is not used; set runtime.quantize for int8 on ONNX Runtime",
    "load_in_4bit": "bitsandbytes quantisation is not used; set runtime.quantize for int8 on ONNX Runtime",
    "token": "downloads use the proxy's own HF_TOKEN, not a per-call token",
    "use_auth_token": "downloads use the proxy's own HF_TOKEN, not a per-call token",
    "model_type": "the model's config.json decides its architecture",
}
# OpenAI's sampling options that Hugging Face's generate() has no equivalent of (korvus's rag
# sends `presence_penalty: 0` with every chat). Their neutral value 0 is what generation does
# anyway; any other value is dropped with a WARNING.
OPENAI_ONLY_ARGS: Mapping[str, str] = {
    "presence_penalty": "Hugging Face generation has no presence penalty (repetition_penalty is nearest)",
    "frequency_penalty": "Hugging Face generation has no frequency penalty (repetition_penalty is nearest)",
}
GENERATIVE = frozenset(
    {"text-generation", "conversational", "summarization", "translation", "text2text-generation"}
)
# HF returns a bare item instead of a one-element list for these tasks (fill-mask, QA).
_UNWRAP_SINGLE = frozenset({"fill-mask", "question-answering"})


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task: str  # as asked, e.g. "translation_en_to_fr"
    base: str  # its family, e.g. "translation"
    model: str
    model_kwargs: Mapping[str, Any]
    args: Mapping[str, Any]
    args_key: str  # canonical JSON of args: calls with the same key share a pipeline call
    dropped: tuple[str, ...] = ()  # OPENAI_ONLY_ARGS given a value generation cannot apply

    @property
    def pipeline_task(self) -> str:
        return "text-generation" if self.base == "conversational" else self.task


def parse_task(task: Any, args: Any, config: RuntimeConfig) -> TaskSpec:
    """A TaskSpec from the SQL `task` (text or jsonb) and `args`; raises InvalidParameterValue."""
    if isinstance(task, str) and task.lstrip().startswith("{"):
        try:
            task = json.loads(task)
        except json.JSONDecodeError as exc:
            raise InvalidParameterValue(f"pgml.transform: task is not valid JSON: {exc}") from exc
    options: dict[str, Any] = dict(task) if isinstance(task, Mapping) else {"task": task}
    name = options.pop("task", None)
    model = options.pop("model", None)
    if not isinstance(name, str) or not name:
        raise InvalidParameterValue('pgml.transform: task must name a task, e.g. "text-classification"')
    name = _TASK_ALIASES.get(name, name)
    base = "translation" if _TRANSLATION.match(name) else name
    if base not in TASKS:
        raise InvalidParameterValue(
            f'pgml.transform: unknown task "{name}"',
            hint="accepted: " + ", ".join(sorted(TASKS)) + ", translation_xx_to_yy",
        )
    generation = {k: options.pop(k) for k in sorted(set(options) & _GENERATION_OPTIONS)}
    if generation and base not in GENERATIVE:
        raise InvalidParameterValue(
            f'pgml.transform: task option "{next(iter(generation))}" applies to text generation, not "{name}"'
        )
    unknown = sorted(set(options) - _MODEL_KWARGS)
    if unknown:
        raise InvalidParameterValue(
            f'pgml.transform: unknown task option "{unknown[0]}"',
            hint="accepted: task, model, " + ", ".join(sorted(_MODEL_KWARGS | _GENERATION_OPTIONS)),
        )
    if model is None:
        model = config.default_models.get(base)
    if not isinstance(model, str) or not model:
        raise InvalidParameterValue(f'pgml.transform: no model given and no default for task "{name}"')
    if not isinstance(args, Mapping):
        raise InvalidParameterValue("pgml.transform: args must be a JSON object")
    # The call's own args win over the task object's generation options.
    call_args = {**generation, **{k: v for k, v in args.items() if k != "cache"}}
    if "max_tokens" in call_args:
        call_args.setdefault("max_new_tokens", call_args.pop("max_tokens"))
        call_args.pop("max_tokens", None)
    dropped = tuple(k for k in OPENAI_ONLY_ARGS if call_args.pop(k, 0) not in (0, None))
    return TaskSpec(name, base, model, options, call_args, json.dumps(call_args, sort_keys=True), dropped)


def ignored_options(spec: TaskSpec, cache: bool) -> list[str]:
    """WARNING lines for the options of a call that are accepted but not applied, and why."""
    lines = [
        f'pgml.transform: task option "{k}" is ignored: {why}'
        for k, why in IGNORED_MODEL_KWARGS.items()
        if k in spec.model_kwargs
    ]
    lines += [f'pgml.transform: "{k}" is ignored: {OPENAI_ONLY_ARGS[k]}' for k in spec.dropped]
    if cache:
        lines.append('pgml.transform: "cache" is ignored: every loaded model stays cached in the proxy '
                     "(runtime.memory_budget_mb decides what is evicted)")
    return lines


def check_inputs(spec: TaskSpec, inputs: list[Any]) -> list[Any]:
    """Inputs as the pipeline takes them: QA JSON parsed, chats checked.

    An array of messages (`ARRAY['{"role": "system", ...}'::jsonb, '{"role": "user", ...}']`)
    is one conversation, as the extension reads it: one answer.
    """
    if (
        spec.base in ("conversational", "text-generation")
        and inputs
        and all(isinstance(m, Mapping) and "role" in m for m in inputs)
    ):
        return [_check_chat(list(inputs), 1)]
    out: list[Any] = []
    for i, item in enumerate(inputs, start=1):
        if spec.base == "question-answering":
            item = json.loads(item) if isinstance(item, str) else item
            if not isinstance(item, Mapping) or not {"question", "context"} <= set(item):
                raise InvalidParameterValue(
                    f'pgml.transform: question-answering input {i} must be JSON {{"question", "context"}}'
                )
            out.append({"question": str(item["question"]), "context": str(item["context"])})
        elif spec.base == "conversational" or (spec.base == "text-generation" and isinstance(item, list)):
            out.append(_check_chat(item, i))
        elif isinstance(item, str):
            out.append(item)
        elif spec.base == "text-classification" and _is_pair(item):
            # A text pair (NLI, a tuned text-pair-classification project): the pipeline's dict form.
            out.append({"text": item["text"], "text_pair": item["text_pair"]})
        else:
            raise InvalidParameterValue(
                f"pgml.transform: input {i} must be text"
                + (' or {"text", "text_pair"}' if spec.base == "text-classification" else "")
            )
    return out


def _is_pair(item: Any) -> bool:
    return isinstance(item, Mapping) and all(isinstance(item.get(k), str) for k in ("text", "text_pair"))


def _check_chat(item: Any, i: int) -> list[dict[str, str]]:
    if isinstance(item, Mapping):
        item = [item]
    if (
        not isinstance(item, list)
        or not item
        or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in item
        )
    ):
        raise InvalidParameterValue(f'pgml.transform: chat input {i} must be a list of {{"role", "content"}}')
    return [{"role": m["role"], "content": m["content"]} for m in item]


def input_cost(item: Any) -> int:
    return len(json.dumps(item)) // 4 + 2 if not isinstance(item, str) else len(item) // 4 + 2


def shape_outputs(spec: TaskSpec, outputs: list[Any]) -> Any:
    """One SQL call's result: the pipeline's list, or its single item where HF unwraps."""
    if spec.base in _UNWRAP_SINGLE and len(outputs) == 1:
        return outputs[0]
    return outputs


def export_ahead(config: RuntimeConfig, model: ResolvedModel, base: str, trust: bool) -> bool:
    """The ONNX export a PipelineModel on ONNX Runtime would load, made now (in the background
    or by `models pull`); False where the model would run on torch anyway under engine = "auto"
    (over runtime.onnx_max_model_mb, or an architecture without an export)."""
    folder = ensure_transformers_folder(config, model)
    if config.engine == "auto" and weight_mb(folder) > config.onnx_max_model_mb:
        return False
    try:
        export_pipeline(config, model, folder, base, trust)
    except FeatureNotSupported:
        if config.engine == "onnx":
            raise
        return False
    return True


class PipelineModel:
    """A loaded transformers pipeline and its batch function."""

    kind = "transform"

    def __init__(
        self, config: RuntimeConfig, model: ResolvedModel, spec: TaskSpec, placement: Placement, trust: bool
    ) -> None:
        self.base = spec.base
        folder = ensure_transformers_folder(config, model)
        self.placement = placement
        self.onnx_folder: Path | None = None
        self.pipe: Any = None
        why_torch = ""  # under engine = "auto", why an ONNX placement runs on torch after all
        if placement.engine == "onnx":
            size = weight_mb(folder)
            if config.engine == "auto" and size > config.onnx_max_model_mb:
                why_torch = f" ({size:.0f} MiB > runtime.onnx_max_model_mb: not exported to ONNX)"
            else:
                try:
                    self.pipe, self.onnx_folder = onnx_pipeline(
                        config, model, folder, spec.pipeline_task, spec.base, trust
                    )
                    self.note = "fp32"
                except FeatureNotSupported as exc:
                    if config.engine == "onnx":
                        raise
                    # An architecture the exporter lacks still runs, on torch.
                    why_torch = f" (no ONNX export: {exc.message[:120]})"
        if self.pipe is None:
            self.placement = Placement("torch", placement.device)
            pipeline: Any = importlib.import_module("transformers").pipeline
            kwargs, precision = torch_precision(placement)
            self.note = precision + why_torch
            kwargs["trust_remote_code"] = trust
            self.pipe = pipeline(spec.pipeline_task, model=str(folder), device=placement.device, **kwargs)
        tok = self.pipe.tokenizer
        if tok is not None and spec.base in ("text-generation", "conversational"):
            # Batched decoder-only generation needs left padding and a pad token.
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.lock = threading.Lock()  # streaming and batches share the model

    def memory_bytes(self) -> int:
        if self.onnx_folder is not None:
            return onnx_files_bytes(self.onnx_folder)
        model = self.pipe.model
        return int(sum(p.numel() * p.element_size() for p in model.parameters()))

    def run(self, payloads: list[tuple[Any, str]]) -> list[Any]:
        """Outputs in payload order; a group whose arguments fail gets its error, not the others."""
        out: list[Any] = [None] * len(payloads)
        # A chat (a list of messages) and a prompt never share a pipeline call: one loaded
        # text-generation pipeline serves both `conversational` and `text-generation` calls.
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, (x, key) in enumerate(payloads):
            groups.setdefault((key, isinstance(x, list)), []).append(i)
        for (key, _), idx in groups.items():
            try:
                results = self._call([payloads[i][0] for i in idx], json.loads(key))
            except PgError as exc:
                results = [exc] * len(idx)
            for j, i in enumerate(idx):
                out[i] = results[j]
        return out

    def _call(self, inputs: list[Any], args: dict[str, Any]) -> list[Any]:
        # Per call, not per model: the model may have been loaded for the other task.
        chat = isinstance(inputs[0], list)
        seed = args.get("seed")
        args = {k: v for k, v in args.items() if k != "seed"}
        if chat:
            args = {**args, "return_full_text": False}
        try:
            with self.lock:
                _seed(seed)
                if self.base == "question-answering":
                    # Keyword form: the list-of-dicts form is deprecated in transformers.
                    results = self.pipe(
                        question=[x["question"] for x in inputs],
                        context=[x["context"] for x in inputs],
                        batch_size=len(inputs),
                        **args,
                    )
                else:
                    results = self.pipe(inputs, batch_size=len(inputs), **args)
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidParameterValue(f"pgml.transform ({self.base}): {exc}") from exc
        if len(inputs) == 1 and self.base in _UNWRAP_SINGLE:
            results = [results]
        results = [_jsonable(r) for r in results]
        if chat:
            # Chat answers the assistant's new message per conversation, as PostgresML does.
            results = [
                r[0]["generated_text"] if isinstance(r, list) else r["generated_text"] for r in results
            ]
        return results


def _seed(seed: Any) -> None:
    """A call's `seed` (the OpenAI API's): torch's generator seeded under the model's lock, so a
    seeded sampling call answers the same each time. Calls with different args never share a
    batch, so a seeded call's batch holds only calls with its seed."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidParameterValue("pgml.transform: seed must be an integer")
    import torch

    torch.manual_seed(seed)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def check_streamable(spec: TaskSpec) -> None:
    if spec.base not in ("text-generation", "conversational"):
        raise InvalidParameterValue(f'pgml.transform_stream supports text generation, not "{spec.task}"')


async def stream_generation(
    model: PipelineModel, spec: TaskSpec, inputs: list[Any], as_list: bool
) -> AsyncIterator[Any]:
    """Yield new text as it is generated: a string per chunk, or a 1-list for the jsonb[] form."""
    check_streamable(spec)
    items = check_inputs(spec, inputs)
    if len(items) != 1:
        raise FeatureNotSupported("pgml.transform_stream streams one input at a time")
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tok, lm = model.pipe.tokenizer, model.pipe.model
    item = items[0]
    prompt = (
        tok.apply_chat_template(item, tokenize=False, add_generation_prompt=True)
        if isinstance(item, list)
        else item
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=not isinstance(item, list)).to(lm.device)
    # What generate() takes; some tokenizers add token_type_ids, which decoders refuse.
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    stop = threading.Event()

    class _Stop(StoppingCriteria):  # the client went away: stop generating
        def __call__(self, *_: Any, **__: Any) -> bool:
            return stop.is_set()

    gen_args = dict(spec.args)
    gen_args.setdefault("max_new_tokens", 64)
    seed = gen_args.pop("seed", None)

    def generate() -> None:
        try:
            with model.lock:
                _seed(seed)
                lm.generate(
                    **enc,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Stop()]),
                    pad_token_id=tok.pad_token_id,
                    **gen_args,
                )
        except Exception:
            streamer.end()  # type: ignore[no-untyped-call]
            raise

    loop = asyncio.get_running_loop()
    # The default executor, not the model pool: a long stream must not hold the batchers' threads.
    done = loop.run_in_executor(None, generate)
    try:
        while True:
            piece = await loop.run_in_executor(None, next, streamer, None)
            if piece is None:
                break
            if piece:
                yield [piece] if as_list else piece
        await done
    except (TypeError, ValueError) as exc:
        raise InvalidParameterValue(f"pgml.transform_stream: {exc}") from exc
    finally:
        stop.set()
