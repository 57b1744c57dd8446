"""Offline stand-ins for Hugging Face datasets, chosen by `[runtime.tabular.dataset_substitutes]`.

A machine without a network (CI, air-gapped servers) cannot fetch `tweet_eval` or `imdb`, which the
PostgresML README loads. The config may map such a name to one of the generators below; the table
then gets the name the user asked for (`pgml.tweet_eval`), the columns the README's SQL uses, and
rows with the same role (short labelled texts, binary sentiment, nine-class financial sentiment).
`load_dataset` says in an INFO notice which substitute served the request, so nobody mistakes the
stand-in for the real data.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

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


_POSITIVE = ["a delight", "wonderful", "moving and funny", "beautifully acted", "a joy to watch", "brilliant"]
_NEGATIVE = ["a bore", "dreadful", "a waste of time", "badly acted", "painful to sit through", "a mess"]
_SUBJECTS = ["The film", "This movie", "The sequel", "The plot", "The cast", "The ending", "The script"]


def generated_reviews(name: str) -> Dataset:
    """Templated movie reviews, label 1 positive / 0 negative / -1 unlabelled: the role of imdb."""
    rng = random.Random(7)  # seeded: the same rows on every machine
    rows: list[tuple[Any, ...]] = []
    for i in range(400):
        label = 1 if i % 2 == 0 else 0
        words = _POSITIVE if label else _NEGATIVE
        first, second = rng.choice(_SUBJECTS), rng.choice(_SUBJECTS).lower()
        text = f"{first} was {rng.choice(words)}, and {second} was {rng.choice(words)}."
        rows.append((text, label))
    for _ in range(20):
        rows.append((f"{rng.choice(_SUBJECTS)} is out on {rng.choice(['Friday', 'Monday', 'DVD'])}.", -1))
    return Dataset(name, [("text", "text"), ("label", "integer")], rows)


_SENTIMENTS = [
    "strong negative",
    "moderately negative",
    "mildly negative",
    "negative",
    "neutral",
    "positive",
    "mildly positive",
    "moderately positive",
    "strong positive",
]
_COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne"]
_MOVES = {
    "strong negative": "collapsed",
    "moderately negative": "fell sharply",
    "mildly negative": "slipped",
    "negative": "fell",
    "neutral": "was unchanged",
    "positive": "rose",
    "mildly positive": "edged up",
    "moderately positive": "climbed",
    "strong positive": "soared",
}


def generated_financial_sentiment(name: str) -> Dataset:
    """Templated market news with nine sentiment classes: the role of FinGPT/fingpt-sentiment-train."""
    rng = random.Random(11)
    instruction = (
        "What is the sentiment of this news? Please choose an answer from {strong negative/"
        "moderately negative/mildly negative/negative/neutral/positive/mildly positive/"
        "moderately positive/strong positive}."
    )
    rows: list[tuple[Any, ...]] = []
    for i in range(450):
        label = _SENTIMENTS[i % len(_SENTIMENTS)]
        text = f"{rng.choice(_COMPANIES)} shares {_MOVES[label]} after the quarterly report."
        rows.append((text, label, instruction))
    return Dataset(name, [("input", "text"), ("output", "text"), ("instruction", "text")], rows)


GENERATORS: dict[str, Callable[[str], Dataset]] = {
    "bbc_news_headlines": bbc_news_headlines,
    "generated_reviews": generated_reviews,
    "generated_financial_sentiment": generated_financial_sentiment,
}
