"""The ground floor: what proxy/, planner/ and runtime/ share, importing nothing of theirs.

`core.errors` (every SQLSTATE as a class), `core.interfaces` (the contracts between the
layers and the wire value types). tests/test_layering.py keeps it that way.
"""
