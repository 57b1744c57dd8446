"""Optional libraries (runtime/optional.py): a missing one is named, with 0A000, by the call
that needs it, and everything else keeps working."""

from __future__ import annotations

import pytest

from core.errors import FeatureNotSupported
from runtime import chunk, optional
from runtime.tabular import algorithms, training


def test_check_looks_for_every_optional_package() -> None:
    assert set(optional.check()) == set(optional.PACKAGES)


def test_missing_catboost_is_named_not_an_unknown_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(optional._found, "catboost", False)
    with pytest.raises(FeatureNotSupported) as info:
        training.check_task_algorithm("classification", "catboost")
    assert info.value.fields["C"] == "0A000"
    assert '"catboost"' in info.value.message and info.value.fields["H"].startswith("pip install catboost")
    assert "catboost" not in algorithms.available("classification")
    training.check_task_algorithm("classification", "xgboost")  # the others are still offered


@pytest.mark.parametrize("package", ["nltk", "spacy"])
def test_missing_splitter_package_is_named(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    monkeypatch.setitem(optional._found, package, False)
    with pytest.raises(FeatureNotSupported) as info:
        chunk.split(package, "some text. more text.", {})
    assert f'needs the Python package "{package}"' in info.value.message
    assert chunk.split("character", "a b", {"chunk_size": 10, "chunk_overlap": 0}) == ["a b"]
