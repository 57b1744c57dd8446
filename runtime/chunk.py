"""`pgml.chunk`: text splitters by PostgresML's names, built on langchain-text-splitters.

Owns the splitter table and kwarg validation. `nltk` and `spacy` work only when those
packages are installed; otherwise the error names the package to install (0A000).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from core.errors import InvalidParameterValue
from runtime import optional

_SPLITTERS: Mapping[str, str] = {
    "character": "CharacterTextSplitter",
    "recursive_character": "RecursiveCharacterTextSplitter",
    "markdown": "MarkdownTextSplitter",
    "python": "PythonCodeTextSplitter",
    "latex": "LatexTextSplitter",
    "nltk": "NLTKTextSplitter",
    "spacy": "SpacyTextSplitter",
}
_NEEDS = {"nltk": "nltk", "spacy": "spacy"}
# The TextSplitter base-class options every splitter accepts.
_BASE_KWARGS = frozenset(
    {"chunk_size", "chunk_overlap", "keep_separator", "strip_whitespace", "add_start_index"}
)


def split(splitter: str, text: str, kwargs: Mapping[str, Any]) -> list[str]:
    """Split `text`; raises InvalidParameterValue (22023) or FeatureNotSupported (0A000)."""
    if splitter not in _SPLITTERS:
        raise InvalidParameterValue(
            f'pgml.chunk: unknown splitter "{splitter}"', hint="accepted: " + ", ".join(_SPLITTERS)
        )
    needed = _NEEDS.get(splitter)
    if needed is not None:
        optional.require(needed, f'pgml.chunk: the "{splitter}" splitter')
    import langchain_text_splitters as lts

    klass = getattr(lts, _SPLITTERS[splitter])
    accepted = set(inspect.signature(klass.__init__).parameters) | _BASE_KWARGS
    accepted.discard("self")
    accepted.discard("kwargs")
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise InvalidParameterValue(
            f'pgml.chunk: unknown kwarg "{unknown[0]}" for splitter "{splitter}"',
            hint="accepted: " + ", ".join(sorted(accepted)),
        )
    try:
        instance = klass(**kwargs)
        return [str(piece) for piece in instance.split_text(text)]
    except (TypeError, ValueError) as exc:
        raise InvalidParameterValue(f"pgml.chunk: {exc}") from exc
