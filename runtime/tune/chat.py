"""Conversation tuning with LoRA (peft) and answering with the tuned model (`pgml.generate`).

`train` runs inside the worker process: each row becomes the model's chat template
applied to (system, user) with the assistant's answer appended; only the answer's
tokens count in the loss. The adapter is saved (or, with `merge_weights`, the merged
model). `merged_folder` turns a stored adapter into a plain model folder once, so
`pgml.transform` and `pgml.generate` load tuned chat models like any other.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import InvalidParameterValue, UndefinedModel

_LORA_DEFAULTS = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.05}  # the extension's defaults


def _messages(system: str | None, user: str) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    return [*out, {"role": "user", "content": user}]


def _turn(tok: Any, system: str | None, user: str, answer: str) -> tuple[str, str]:
    """The prompt (ending where the assistant speaks) and the target: the answer as the chat
    template closes an assistant turn (`<|im_end|>` for ChatML), so the model learns to end
    its turn the way generation stops. The tokenizer's eos is not that token for every
    model (SmolLM2 converted from GGUF names `<|im_start|>`), so it is only the fallback."""
    messages = _messages(system, user)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if (
        full.startswith(prompt)
        and full[len(prompt) :].startswith(answer)
        and len(full) > len(prompt) + len(answer)
    ):
        return prompt, full[len(prompt) :].rstrip("\n")
    return prompt, answer + (tok.eos_token or "")


def _stop_ids(tok: Any, model: Any) -> list[int]:
    """Token ids that end an answer: the model's own eos ids and the chat template's end of turn."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [] if configured is None else [configured]
    _, target = _turn(tok, None, "q", "a")
    suffix = tok(target[1:], add_special_tokens=False)["input_ids"]
    if suffix:
        ids.append(suffix[0])
    if tok.eos_token_id is not None and not suffix:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def train(job: dict[str, Any], folder: Path, training_args: Any, callback: Any) -> dict[str, Any]:
    """Train a LoRA adapter on the job's rows; save it under `<folder>/model`; returns summaries."""
    _peft: Any = importlib.import_module("peft")
    LoraConfig, get_peft_model = _peft.LoraConfig, _peft.get_peft_model
    _transformers: Any = importlib.import_module("transformers")
    AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer = (
        _transformers.AutoModelForCausalLM,
        _transformers.AutoTokenizer,
        _transformers.DataCollatorForSeq2Seq,
        _transformers.Trainer,
    )

    base = job["base"]
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = {**_LORA_DEFAULTS, **dict(job.get("lora_config") or {}), "task_type": "CAUSAL_LM"}
    model = get_peft_model(model, LoraConfig(**lora))
    max_length = int(job.get("max_seq_length") or 512)

    def encode(part: dict[str, list[Any]]) -> Any:
        from runtime.tune.worker import _Rows

        ids: list[list[int]] = []
        labels: list[list[int]] = []
        systems = part.get("system") or [None] * len(part["user"])
        for system, user, answer in zip(systems, part["user"], part["assistant"], strict=True):
            prompt, target = _turn(tok, system, user, str(answer))
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(target, add_special_tokens=False)["input_ids"]
            p_ids = p_ids[: max(max_length - len(a_ids), 0)]  # keep the answer: it is what is learnt
            full = (p_ids + a_ids)[:max_length]
            ids.append(full)
            labels.append(([-100] * len(p_ids) + a_ids)[:max_length])
        return _Rows(
            {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels}, None
        )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encode(job["train"]),
        eval_dataset=encode(job["test"]),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[callback],
    )
    summary = trainer.train()
    evaluation = trainer.evaluate()
    out = folder / "model"
    if job.get("merge_weights"):
        model.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {"train": dict(summary.metrics), "eval": dict(evaluation)}


def merge_adapter(adapter: Path, base: str, target: Path) -> None:
    """Write base + adapter, merged, as a plain model folder at `target` (run in a thread)."""
    PeftModel: Any = importlib.import_module("peft").PeftModel
    _transformers: Any = importlib.import_module("transformers")
    AutoModelForCausalLM, AutoTokenizer = _transformers.AutoModelForCausalLM, _transformers.AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(target))


def base_of(adapter: Path) -> str:
    return str(json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")


class Generator:
    """A tuned chat model loaded once; answers a list of prompts greedily by default."""

    def __init__(self, folder: Path) -> None:
        _transformers: Any = importlib.import_module("transformers")
        AutoModelForCausalLM, AutoTokenizer = _transformers.AutoModelForCausalLM, _transformers.AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(folder))
        self.model.eval()
        self.stop_ids = _stop_ids(self.tok, self.model)

    def __call__(self, prompts: Sequence[str], config: Mapping[str, Any]) -> list[str]:
        import torch

        options = {k: v for k, v in config.items() if k != "system"}
        options.setdefault("max_new_tokens", 64)
        options.setdefault("do_sample", False)
        options.setdefault("eos_token_id", self.stop_ids)
        texts = [
            self.tok.apply_chat_template(
                _messages(config.get("system"), p), add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = self.model.generate(**enc, pad_token_id=self.tok.pad_token_id, **options)
        return [self.tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True) for row in out]


async def generate(rt: Any, call: Mapping[str, Any]) -> Any:
    """`pgml.generate(project_name, inputs text | text[], config)`: the tuned chat model's answers."""
    project = call.get("project_name")
    if not isinstance(project, str) or not project:
        raise InvalidParameterValue("pgml.generate: project_name must be a non-empty text value")
    config = call.get("config") or {}
    if not isinstance(config, Mapping):
        raise InvalidParameterValue("pgml.generate: config must be a JSON object")
    found = await rt.tuned_folder(project, ("conversation",))
    if found is None:
        raise UndefinedModel(
            f"pgml.generate: project {project!r} has no deployed conversation model",
            hint="tune one with pgml.tune(..., task => 'conversation', ...)",
        )
    inputs = call.get("inputs")
    many = isinstance(inputs, list)
    prompts = [str(x) for x in inputs] if isinstance(inputs, list) else [str(inputs)]
    model = await rt.generator(found[0])
    try:
        answers = await asyncio.to_thread(model, prompts, dict(config))
    except (TypeError, ValueError) as exc:  # a generation option the model does not take
        raise InvalidParameterValue(f"pgml.generate: {exc}") from exc
    return answers if many else answers[0]
