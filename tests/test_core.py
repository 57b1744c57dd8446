"""core.errors: generated from errcodes.txt, cross-checked against psycopg's own table."""

from __future__ import annotations

from pathlib import Path

import psycopg.errors
import pytest

from core import errors, sqlstates
from core.pgerror import PgError
from tools import gen_sqlstates

ERRCODES = gen_sqlstates.DEFAULT_SOURCE


def _generated() -> dict[str, type[PgError]]:
    return {
        cls.sqlstate: cls
        for cls in vars(sqlstates).values()
        if isinstance(cls, type) and issubclass(cls, PgError) and cls is not PgError
    }


def test_every_psycopg_sqlstate_has_our_class_of_the_same_name() -> None:
    ours = _generated()
    checked = 0
    for code, cls in ours.items():
        try:
            theirs = psycopg.errors.lookup(code)
        except KeyError:
            continue  # a code newer than the installed psycopg
        checked += 1
        assert cls.__name__.rstrip("_") == theirs.__name__.rstrip("_"), code
    assert checked > 200


def test_lookup_gives_the_canonical_class() -> None:
    assert errors.lookup("22P02") is errors.InvalidTextRepresentation
    assert errors.lookup("42704") is errors.UndefinedObject  # not the UndefinedModel subclass
    assert issubclass(errors.UndefinedModel, errors.UndefinedObject)
    assert errors.lookup("XX000") is PgError
    assert errors.lookup("ZZ999") is PgError
    err = PgError.from_fields({"C": "57014", "M": "canceling statement due to user request"})
    assert isinstance(err, errors.QueryCanceled)
    assert err.fields["C"] == "57014"


@pytest.mark.skipif(not ERRCODES.exists(), reason=f"{ERRCODES} absent (Debian's postgresql-common has it)")
def test_generated_module_is_up_to_date() -> None:
    text = gen_sqlstates.render(gen_sqlstates.parse(ERRCODES.read_text()))
    assert Path(sqlstates.__file__).read_text() == text, "run python tools/gen_sqlstates.py"
