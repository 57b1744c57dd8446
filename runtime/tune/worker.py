"""The training process of `pgml.tune`: `python -m runtime.tune.worker <job folder>`.

Runs in its own process, never in the proxy's: a training takes every core for minutes,
and a cancel must be able to stop it outright (the proxy kills this process). Reads
`job.json` from the folder, trains with Hugging Face's `Trainer`, writes the final
model (safetensors, config, tokenizer; for conversation the LoRA adapter or the merged
weights) to `<folder>/model`, and reports on its stdout, one JSON object per line:
``{"log": {...}}`` for each logging step and summary, ``{"warning": "..."}``, and
finally ``{"result": {...}}`` or ``{"error": "...", "sqlstate": "..."}``. Everything else
the libraries print goes to stderr. It never talks to the database.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

_OUT: TextIO = sys.stdout


def send(message: dict[str, Any]) -> None:
    _OUT.write(json.dumps(message, default=_jsonable) + "\n")
    _OUT.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _relay_callback() -> Any:
    TrainerCallback: Any = importlib.import_module("transformers").TrainerCallback

    class Relay(TrainerCallback):  # type: ignore[misc]
        """Each logging step (and the train/eval summaries) to the proxy, with step and time."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            out = dict(logs or {})
            out.update(
                step=state.global_step,
                max_steps=state.max_steps,
                timestamp=str(datetime.datetime.now()),
            )
            send({"log": out})

    return Relay()


class _Rows:
    """A map-style dataset of tokenised rows (a torch Dataset needs only these two methods)."""

    def __init__(self, encoded: dict[str, list[Any]], labels: list[int] | None) -> None:
        self.encoded = encoded
        self.labels = labels

    def __len__(self) -> int:
        return len(next(iter(self.encoded.values())))

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = {k: v[i] for k, v in self.encoded.items()}
        if self.labels is not None:
            row["labels"] = self.labels[i]
        return row


def _metrics(pred: Any) -> dict[str, float]:
    """f1 and accuracy computed here with scikit-learn (no `evaluate`, which downloads)."""
    from sklearn.metrics import accuracy_score, f1_score

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    guess = np.argmax(logits, axis=-1)
    truth = pred.label_ids
    binary = len(np.unique(truth)) <= 2 and int(max(truth.max(initial=0), guess.max(initial=0))) <= 1
    return {
        "f1": float(f1_score(truth, guess, average="binary" if binary else "macro")),
        "accuracy": float(accuracy_score(truth, guess)),
    }


def _training_args(job: dict[str, Any], folder: Path) -> Any:
    TrainingArguments: Any = importlib.import_module("transformers").TrainingArguments

    given = dict(job["training_args"])
    forced = {
        "output_dir": str(folder / "checkpoints"),
        "logging_dir": str(folder / "logs"),
        "report_to": [],
        # The final model is stored in pgml.files; checkpoints would only fill the disk.
        "save_strategy": "no",
        "disable_tqdm": True,
        "push_to_hub": False,
    }
    return TrainingArguments(**{**given, **forced})


def _classify(job: dict[str, Any], folder: Path) -> dict[str, Any]:
    _transformers: Any = importlib.import_module("transformers")
    AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer = (
        _transformers.AutoModelForSequenceClassification,
        _transformers.AutoTokenizer,
        _transformers.DataCollatorWithPadding,
        _transformers.Trainer,
    )

    labels: list[str] = job["labels"]
    base = job["base"]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    max_length = int(job.get("max_seq_length") or min(tok.model_max_length, 512))

    def encode(part: dict[str, Any]) -> _Rows:
        if job["task"] == "text-pair-classification":
            enc = tok(part["text1"], part["text2"], truncation=True, max_length=max_length)
        else:
            enc = tok(part["text"], truncation=True, max_length=max_length)
        return _Rows(dict(enc), part["label"])

    trainer = Trainer(
        model=model,
        args=_training_args(job, folder),
        train_dataset=encode(job["train"]),
        eval_dataset=encode(job["test"]),
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=_metrics,
        callbacks=[_relay_callback()],
    )
    train = trainer.train()
    evaluation = trainer.evaluate()
    model.save_pretrained(str(folder / "model"), safe_serialization=True)
    tok.save_pretrained(str(folder / "model"))
    return {"train": dict(train.metrics), "eval": dict(evaluation)}


def _conversation(job: dict[str, Any], folder: Path) -> dict[str, Any]:
    from runtime.tune import chat

    return chat.train(job, folder, _training_args(job, folder), _relay_callback())


def _push(job: dict[str, Any], folder: Path) -> None:
    """Honour push_to_hub where a hub is reachable; a failure is a warning, never an error."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        send(
            {
                "warning": "push_to_hub: the Hugging Face hub is offline (HF_HUB_OFFLINE); "
                "the model is kept in pgml.files only"
            }
        )
        return
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("PGML_TUNE_HUB_TOKEN") or None)
        repo = api.create_repo(job["project_name"], private=bool(job.get("hub_private_repo")), exist_ok=True)
        api.upload_folder(folder_path=str(folder / "model"), repo_id=repo.repo_id)
    except Exception as exc:  # any network or auth failure: the model is still stored
        send(
            {
                "warning": f"push_to_hub failed ({type(exc).__name__}: {exc});"
                " the model is kept in pgml.files only"
            }
        )


def main(folder: Path) -> int:
    job = json.loads((folder / "job.json").read_text())
    try:
        result = _conversation(job, folder) if job["task"] == "conversation" else _classify(job, folder)
    except TypeError as exc:  # a training argument of the wrong type, say
        send({"error": f"training failed: {exc}", "sqlstate": "22023"})
        return 1
    except Exception as exc:
        send({"error": f"training failed: {type(exc).__name__}: {exc}", "sqlstate": "XX000"})
        return 1
    if job.get("push_to_hub"):
        _push(job, folder)
    send({"result": result})
    return 0


if __name__ == "__main__":
    from runtime import processes

    processes.as_worker()
    # The protocol goes on the real stdout; whatever the libraries print goes to stderr.
    _OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # One core is left to the proxy (and the database): other clients' statements must not
    # wait behind a training. (A lower priority was tried: on a busy host it starves the training.)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    sys.exit(main(Path(sys.argv[1])))
