"""Optional third-party libraries: looked for once, named when a function needs one.

A missing one is not an error at start (the proxy serves everything else); a call that
needs it gets 0A000 naming the package to install. `check` runs at the runtime's start and
logs what is missing; `installed` answers from that one look (`importlib.util.find_spec`,
not an import: importing catboost costs seconds).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping

from core.errors import FeatureNotSupported

log = logging.getLogger(__name__)

# package -> what needs it
PACKAGES: Mapping[str, str] = {
    "catboost": "pgml.train's catboost algorithm and the models trained with it",
    "nltk": "pgml.chunk's nltk splitter",
    "spacy": "pgml.chunk's spacy splitter",
}
_found: dict[str, bool] = {}


def installed(package: str) -> bool:
    found = _found.get(package)
    if found is None:
        found = _found[package] = importlib.util.find_spec(package) is not None
    return found


def check() -> dict[str, bool]:
    """Look for every optional package once; log the missing ones and what they serve."""
    found = {name: installed(name) for name in PACKAGES}
    for name, present in found.items():
        if not present:
            log.info("optional package %r is not installed: %s will answer 0A000", name, PACKAGES[name])
    return found


def require(package: str, what: str) -> None:
    """Raise 0A000 naming `package` when it is not installed; `what` is the thing that needs it."""
    if not installed(package):
        raise FeatureNotSupported(
            f'{what} needs the Python package "{package}", which is not installed',
            hint=f"pip install {package} in the proxy's environment",
        )
