"""`POST /v1/chat/completions` and `POST /v1/completions` over the runtime's `pgml.transform`.

A request is one `pgml.transform` call (task `conversational` for chat, `text-generation`
for completions) through `Runtime.call_batch`, so it shares the model and the batcher with
SQL callers; `stream: true` goes through `Runtime.stream`, as `pgml.transform_stream` does,
and is sent as server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`.
Sampling follows OpenAI: `temperature` 0 is greedy decoding, anything else samples (default
1). `stop` strings cut the answer where they first appear. Token counts come from the model's
own tokenizer (`Runtime.count_tokens`): the prompt as templated, and the answer's text
tokenised again; an answer of `max_tokens` tokens ends with finish_reason "length".
`seed` seeds the sampling (torch's generator, under the model's lock; requests with different
arguments never share a batch), so a seeded sampling request answers the same twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.errors import PgError
from core.stop import Stop
from proxy.http.common import HttpState, api_user, context, read_json, state_of, until_disconnect
from proxy.http.embeddings import model_name
from proxy.http.errors import ApiError, bad, from_pg


@dataclass(frozen=True)
class Generation:
    """The generation fields of a request, checked."""

    model: str
    n: int
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    args: dict[str, Any]  # pgml.transform's args: max_new_tokens, do_sample, temperature, top_p


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"{key} must be a number from {low} to {high}", key)
    return float(value)


def _count(body: dict[str, Any], key: str, cap: int, default: int, setting: str) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"{key} must be a positive integer", key)
    if value > cap:
        raise bad(f"{key} is {value}; this server allows at most {cap} ({setting})", key)
    return value


def parse_generation(body: dict[str, Any], state: HttpState) -> Generation:
    settings = state.settings
    model = model_name(body)
    n = _count(body, "n", settings.max_n, 1, "http.max_n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _count(body, key, settings.max_tokens, min(settings.default_max_tokens, settings.max_tokens),
                        "http.max_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop must be a string or an array of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    if stream and n > 1:
        raise bad("n > 1 is not supported with stream: true", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed must be an integer", "seed")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user must be a string", "user")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    args: dict[str, Any] = {"max_new_tokens": max_tokens}
    if temperature == 0:
        args["do_sample"] = False
    else:
        args.update(do_sample=True, temperature=1.0 if temperature is None else temperature)
        if top_p is not None:
            args["top_p"] = top_p
        if seed is not None:  # greedy decoding needs none
            args["seed"] = seed
    return Generation(model, n, max_tokens, stops, stream, bool(options.get("include_usage")), args)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty array", "messages",
                  "missing_required_parameter" if raw is None else "invalid_value")
    out = []
    for i, m in enumerate(raw):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: the text ones, joined
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise bad(f"messages[{i}] must have a role and text content", f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _finish(raw_tokens: int, stopped: bool, gen: Generation) -> str:
    return "stop" if stopped or raw_tokens < gen.max_tokens else "length"


async def _usage(runtime: Any, gen: Generation, kind: str, prompts: Sequence[Any],
                 raw: list[str], kept: list[str]) -> tuple[list[int], dict[str, int]]:
    """Raw answer token counts (for finish_reason) and OpenAI's usage object."""
    prompt = sum(await runtime.count_tokens(kind, gen.model, prompts))
    counts = await runtime.count_tokens("completion", gen.model, raw + kept)
    raw_counts, kept_counts = counts[: len(raw)], counts[len(raw):]
    completion = sum(kept_counts)
    return raw_counts, {"prompt_tokens": prompt, "completion_tokens": completion,
                        "total_tokens": prompt + completion}


async def chat_completions(request: Request) -> Response:
    user = api_user(request)
    state = state_of(request)
    runtime = state.runtime
    body = await read_json(request)
    gen = parse_generation(body, state)
    messages = _messages(body)
    task = {"task": "conversational", "model": gen.model}
    if gen.stream:
        call: dict[str, Any] = {"task": task, "args": gen.args, "inputs": messages}
        return await _stream(request, runtime, gen, call, user, chat=True, prompt=messages)
    stop = Stop()
    call = {"task": task, "args": gen.args, "inputs": [messages] * gen.n}
    try:
        [answers] = await until_disconnect(request, stop, runtime.call_batch("transform", [call],
                                                                           context(user, stop)))
        kept = [cut_at_stop(a, gen.stop) for a in answers]
        raw_counts, usage = await _usage(runtime, gen, "chat", [messages], answers,
                                         [k for k, _ in kept])
    except PgError as exc:
        raise from_pg(exc, "model" if exc.code == "42704" else "messages") from None
    choices = [{"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": _finish(raw_counts[i], found, gen)}
               for i, (text, found) in enumerate(kept)]
    return JSONResponse({"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
                         "created": int(time.time()), "model": gen.model, "choices": choices,
                         "usage": usage})


async def completions(request: Request) -> Response:
    user = api_user(request)
    state = state_of(request)
    runtime = state.runtime
    body = await read_json(request)
    gen = parse_generation(body, state)
    raw = body.get("prompt")
    prompts = [raw] if isinstance(raw, str) else raw
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompt must be a string or an array of strings (token arrays are not supported)",
                  "prompt", "missing_required_parameter" if raw is None else "invalid_value")
    task = {"task": "text-generation", "model": gen.model}
    if gen.stream:
        if len(prompts) != 1:
            raise bad("stream: true takes one prompt", "prompt")
        call = {"task": task, "args": gen.args, "input": prompts[0]}
        return await _stream(request, runtime, gen, call, user, chat=False, prompt=prompts[0])
    stop = Stop()
    inputs = [p for p in prompts for _ in range(gen.n)]
    call = {"task": task, "args": {**gen.args, "return_full_text": False}, "inputs": inputs}
    try:
        [outputs] = await until_disconnect(request, stop, runtime.call_batch("transform", [call],
                                                                           context(user, stop)))
        answers = [o[0]["generated_text"] for o in outputs]
        kept = [cut_at_stop(a, gen.stop) for a in answers]
        raw_counts, usage = await _usage(runtime, gen, "prompt", prompts, answers, [k for k, _ in kept])
    except PgError as exc:
        raise from_pg(exc, "model" if exc.code == "42704" else "prompt") from None
    choices = [{"index": i, "text": text, "logprobs": None,
                "finish_reason": _finish(raw_counts[i], found, gen)} for i, (text, found) in enumerate(kept)]
    return JSONResponse({"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion",
                         "created": int(time.time()), "model": gen.model, "choices": choices,
                         "usage": usage})


async def _stream(request: Request, runtime: Any, gen: Generation, call: dict[str, Any], user: str,
                  *, chat: bool, prompt: Any) -> Response:
    """Server-sent events; errors before the first piece (an unknown model) are plain answers."""
    stop = Stop()
    pieces = runtime.stream("transform_stream", call, context(user, stop))
    try:
        first: Any = await pieces.__anext__()
    except StopAsyncIteration:
        first = None
    except PgError as exc:
        raise from_pg(exc, "model" if exc.code == "42704" else "messages" if chat else "prompt") from None
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())

    def chunk(text: str | None, finish: str | None, usage: dict[str, int] | None = None,
              role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            choices: list[Any] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        obj: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": gen.model,
                               "choices": choices if usage is None else []}
        if usage is not None:
            obj["usage"] = usage
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        text, sent, found = "", 0, False
        hold = max((len(s) for s in gen.stop), default=1) - 1  # a stop string may span pieces
        try:
            if chat:
                yield chunk("", None, role=True)
            piece = first
            while piece is not None:
                text += piece[0] if isinstance(piece, list) else piece
                kept, found = cut_at_stop(text, gen.stop)
                end = len(kept) if found else max(sent, len(text) - hold)
                if end > sent:
                    yield chunk(kept[sent:end], None)
                    sent = end
                if found:
                    break
                piece = await anext(pieces, None)
            if not found and sent < len(text):
                yield chunk(text[sent:], None)
            kept, _ = cut_at_stop(text, gen.stop)
            kind = "chat" if chat else "prompt"
            raw_counts, usage = await _usage(runtime, gen, kind, [prompt], [text], [kept])
            yield chunk(None, _finish(raw_counts[0], found, gen))
            if gen.include_usage:
                yield chunk(None, None, usage)
            yield b"data: [DONE]\n\n"
        finally:
            stop.stop()
            await pieces.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


__all__ = ["ApiError", "chat_completions", "completions"]
