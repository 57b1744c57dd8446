"""`pgml.tune`'s arguments checked before any work: task, columns, hyperparams, secrets.

Everything a client can get wrong is refused here with 22023 naming it, so a bad call
never creates a project, a model row or a process. Secrets (`hub_token`, `token`) are
split off: they reach the training process in its environment, never the registry.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.errors import FeatureNotSupported, InvalidParameterValue

TASKS = ("text-classification", "text-pair-classification", "conversation")
ALGORITHM = "transformers"
# dataset_args keys per task, with the extension's defaults.
COLUMNS: Mapping[str, Mapping[str, str | None]] = {
    "text-classification": {"text_column": "text", "class_column": "class"},
    "text-pair-classification": {"text1_column": "text1", "text2_column": "text2", "class_column": "class"},
    "conversation": {"system_column": "system", "user_column": "user", "assistant_column": "assistant"},
}
_HYPERPARAMS = frozenset(
    {
        "training_args",
        "dataset_args",
        "lora_config",
        "max_seq_length",
        "token",
        "merge_weights",
        "tokenizer_args",
        "prompt_template",
        "load_in_8bit",
    }
)
SECRETS = frozenset({"hub_token", "token"})
# Keys we set ourselves (where the files go, no checkpoints, no reporting): a client value is ignored.
_OURS = frozenset({"output_dir", "logging_dir", "report_to", "save_strategy", "disable_tqdm"})
_HUB = frozenset({"push_to_hub", "hub_private_repo", "hub_model_id", "hub_strategy"})


@dataclass
class TuneArgs:
    """A checked `pgml.tune` call."""

    project: str
    task: str
    relation: str
    model_name: str
    columns: dict[str, str]
    training_args: dict[str, Any]
    hyperparams: dict[str, Any]  # as stored: secrets removed
    test_size: float
    sampling: str
    automatic_deploy: bool
    materialize: bool
    push_to_hub: bool = False
    hub_private_repo: bool = False
    token: str | None = field(default=None, repr=False)


@functools.cache
def training_arg_names() -> frozenset[str]:
    """The fields of the installed transformers' TrainingArguments."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidParameterValue(f"pgml.tune: {what} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def parse(call: Mapping[str, Any]) -> TuneArgs:
    """Check a call's values (defaults applied by the planner); raises 22023 naming what is wrong."""
    project = call.get("project_name")
    if not isinstance(project, str) or not project:
        raise InvalidParameterValue("pgml.tune: project_name must be a non-empty text value")
    task = call.get("task")
    if task not in TASKS:
        raise InvalidParameterValue(
            f"pgml.tune: task {task!r} is not supported", hint=f"accepted: {', '.join(TASKS)}"
        )
    relation = call.get("relation_name")
    if not isinstance(relation, str) or not relation:
        raise InvalidParameterValue("pgml.tune: relation_name must name the table or view to train on")
    model_name = call.get("model_name")
    if not isinstance(model_name, str) or not model_name:
        raise InvalidParameterValue(
            "pgml.tune: model_name must name the base model (or a previous tuned project to continue from)"
        )
    hyper = _object(call.get("hyperparams"), "hyperparams")
    unknown = sorted(set(hyper) - _HYPERPARAMS)
    if unknown:
        raise InvalidParameterValue(
            f"pgml.tune: unknown hyperparams key(s) {', '.join(map(repr, unknown))}",
            hint=f"accepted: {', '.join(sorted(_HYPERPARAMS))}",
        )
    columns = _columns(
        str(task), _object(hyper.get("dataset_args"), "dataset_args"), call.get("y_column_name")
    )
    training = _object(hyper.get("training_args"), "training_args")
    token = training.pop("hub_token", None) or hyper.get("token")
    push = bool(training.pop("push_to_hub", False))
    private = bool(training.pop("hub_private_repo", False))
    for key in _HUB - {"push_to_hub", "hub_private_repo"}:
        training.pop(key, None)
    bad = sorted(set(training) - training_arg_names())
    if bad:
        raise InvalidParameterValue(
            f"pgml.tune: training_args key(s) {', '.join(map(repr, bad))} are not arguments of "
            "transformers.TrainingArguments in the installed version",
            hint="see https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments",
        )
    for key in _OURS & set(training):
        training.pop(key)
    _check_optimizer(training.get("optim"))
    sampling = str(call.get("test_sampling") or "stratified")
    if sampling not in ("stratified", "random", "last"):
        raise InvalidParameterValue(
            f"pgml.tune: test_sampling {sampling!r} is unknown", hint="accepted: stratified, random, last"
        )
    test_size = 0.25 if call.get("test_size") is None else float(call["test_size"])
    if test_size <= 0:
        raise InvalidParameterValue(
            f"pgml.tune: test_size must be > 0 (the evaluation needs rows), got {test_size}"
        )
    return TuneArgs(
        project=project,
        task=str(task),
        relation=relation,
        model_name=model_name,
        columns=columns,
        training_args=training,
        hyperparams=redact(hyper),
        test_size=test_size,
        sampling=sampling,
        automatic_deploy=call.get("automatic_deploy") is not False,
        materialize=bool(call.get("materialize_snapshot", False)),
        push_to_hub=push,
        hub_private_repo=private,
        token=str(token) if token else None,
    )


def _check_optimizer(optim: Any) -> None:
    """0A000 naming bitsandbytes for its 8-bit/paged optimizers when it is not installed.

    Checked before any work: the Trainer would otherwise fail inside the worker, after the data
    was read and the model row written, with an error that looks like ours (XX000).
    """
    name = str(optim or "").lower()
    if not any(part in name for part in ("bnb", "8bit", "paged")):
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FeatureNotSupported(
            f"pgml.tune: training_args.optim {optim!r} needs the bitsandbytes package (not installed)",
            hint="install bitsandbytes (it needs a CUDA GPU), or use optim 'adamw_torch'",
        )


def _columns(task: str, dataset_args: dict[str, Any], y_column: Any) -> dict[str, str]:
    known = COLUMNS[task]
    unknown = sorted(set(dataset_args) - set(known))
    if unknown:
        raise InvalidParameterValue(
            f"pgml.tune: dataset_args key(s) {', '.join(map(repr, unknown))} do not apply to {task}",
            hint=f"accepted: {', '.join(known)}",
        )
    out = {key: str(dataset_args.get(key) or default) for key, default in known.items()}
    if (
        "class_column" in known
        and "class_column" not in dataset_args
        and isinstance(y_column, str)
        and y_column
    ):
        out["class_column"] = y_column  # y_column_name, as in pgml.train, when dataset_args does not say
    return out


def redact(value: Any) -> Any:
    """`value` without secret keys at any depth: what the registry stores and notices show."""
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items() if k not in SECRETS}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
