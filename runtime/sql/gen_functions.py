"""Writes 0005_surface.sql: the model-free pgml functions as plain SQL functions, and the
extension's types.

Kept in the repo (STYLE.md: tables from a standard are generated, not typed by hand):
every vector function exists for real[] and float8[], so the SQL is produced from one
template per function. Run `python runtime/sql/gen_functions.py` after editing it.
Migrations are append-only: 0002_functions.sql is this generator's first output, kept as
applied; 0005 replaces its functions (CREATE OR REPLACE) with ones that compute in double
precision. A later change to this SQL needs a new file and a new target here.
"""

from __future__ import annotations

from pathlib import Path

OPTS = "LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE"
TYPES = ("real", "float8")

# (name, element expression over v (and w or s), "scalar" | "array")
ELEMENTWISE = [("add", "+"), ("subtract", "-"), ("multiply", "*"), ("divide", "/")]

# Every value is computed in double precision and only the result is turned back into the
# argument's type (`pgml._real` for real: a result below real's range is 0, as the extension's
# f32 arithmetic gives, where Postgres' float4 operators raise "value out of range: underflow").
def _out(t: str, expr: str) -> str:
    return f"pgml._real({expr})" if t == "real" else f"({expr})"


# Reductions: name -> SQL over u(v), as a double precision expression.
NORMS = {
    "norm_l0": "count(*) FILTER (WHERE v <> 0)",
    "norm_l1": "coalesce(sum(abs(v::float8)), 0)",
    "norm_l2": "coalesce(sqrt(sum(v::float8 * v::float8)), 0)",
    "norm_max": "coalesce(max(abs(v::float8)), 0)",
}
NORMALIZE = {f"normalize_{n}": NORMS[f"norm_{n}"] for n in ("l1", "l2", "max")}
PAIRS = {
    "distance_l1": "coalesce(sum(abs(a.v::float8 - b.v::float8)), 0)",
    "distance_l2": "coalesce(sqrt(sum((a.v::float8 - b.v::float8) ^ 2)), 0)",
    "dot_product": "coalesce(sum(a.v::float8 * b.v::float8), 0)",
    "cosine_similarity": (
        "sum(a.v::float8 * b.v::float8)"
        " / nullif(sqrt(sum(a.v::float8 ^ 2)) * sqrt(sum(b.v::float8 ^ 2)), 0)"
    ),
}
PAIR_FROM = (
    " FROM unnest(vector_a) WITH ORDINALITY a(v, i) JOIN unnest(vector_b) WITH ORDINALITY b(v, i) USING (i)"
)
AGGREGATES = {  # name -> element-wise combine of the state (a.v) and the next value (b.v)
    "sum": "a.v::float8 + b.v::float8",
    "min": "least(a.v, b.v)",
    "max": "greatest(a.v, b.v)",
    "min_abs": "least(a.v, abs(b.v))",
    "max_abs": "greatest(a.v, abs(b.v))",
}
FIRST = {"sum": "v", "min": "v", "max": "v", "min_abs": "abs(v)", "max_abs": "abs(v)"}

REAL_CAST = """
-- float8 to real without the underflow error: what is below real's smallest value is 0.
CREATE OR REPLACE FUNCTION pgml._real(x float8) RETURNS real
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN abs(x) < 1.4e-45 THEN 0::real ELSE x::real END $$;
"""


def _vector_functions(t: str) -> list[str]:
    out = []
    for name, op in ELEMENTWISE:
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[], scalar {t}) RETURNS {t}[] {OPTS} AS $$\n"
            f"  SELECT coalesce(array_agg({_out(t, f'v::float8 {op} scalar::float8')} ORDER BY i), '{{}}')"
            f" FROM unnest(vector) WITH ORDINALITY u(v, i) $$;"
        )
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[], other {t}[]) RETURNS {t}[] {OPTS} AS $$\n"
            f"  SELECT coalesce(array_agg({_out(t, f'a.v::float8 {op} b.v::float8')} ORDER BY i), '{{}}')"
            f" FROM unnest(vector) WITH ORDINALITY a(v, i) JOIN unnest(other) WITH ORDINALITY b(v, i)"
            f" USING (i) $$;"
        )
    for name, body in NORMS.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[]) RETURNS {t} {OPTS} AS $$\n"
            f"  SELECT {_out(t, body)} FROM unnest(vector) u(v) $$;"
        )
    for name, norm in NORMALIZE.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[]) RETURNS {t}[] {OPTS} AS $$\n"
            f"  SELECT coalesce(array_agg({_out(t, 'v::float8 / nullif(n.norm, 0)')} ORDER BY i), '{{}}')"
            f" FROM unnest(vector) WITH ORDINALITY u(v, i),"
            f" (SELECT {norm} AS norm FROM unnest(vector) u(v)) n $$;"
        )
    for name, body in PAIRS.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector_a {t}[], vector_b {t}[]) RETURNS {t} {OPTS}"
            f" AS $$\n  SELECT {_out(t, body)}{PAIR_FROM} $$;"
        )
    for name, combine in AGGREGATES.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml._agg_{name}(state {t}[], value {t}[]) RETURNS {t}[]\n"
            f"  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$\n"
            f"  SELECT CASE WHEN value IS NULL THEN state\n"
            f"    WHEN state IS NULL THEN (SELECT array_agg({FIRST[name]} ORDER BY i)"
            f" FROM unnest(value) WITH ORDINALITY u(v, i))\n"
            f"    ELSE (SELECT array_agg(({combine})::{t} ORDER BY i)"
            f" FROM unnest(state) WITH ORDINALITY a(v, i) JOIN unnest(value) WITH ORDINALITY b(v, i)"
            f" USING (i)) END $$;"
        )
    return out


# The extension's enum types (pgml-extension's orm: Task, Sampling, Strategy, Runtime), with
# its values, so SQL that names them (korvus: `'embedding'::pgml.task`) runs as there.
ENUMS = {
    "task": ("regression", "classification", "decomposition", "clustering", "question_answering",
             "summarization", "translation", "text_classification", "text_generation", "text2text",
             "embedding", "text_pair_classification", "conversation"),
    "sampling": ("random", "last", "stratified"),
    "strategy": ("new_score", "best_score", "most_recent", "rollback", "specific"),
    "runtime": ("python", "rust"),
}
EXTENSION_VERSION = "2.10.0"  # the PostgresML release whose SQL the proxy gives


def _enums() -> list[str]:
    out = []
    for name, values in ENUMS.items():
        labels = ", ".join(f"'{v}'" for v in values)
        out.append(
            f"DO $$ BEGIN CREATE TYPE pgml.{name} AS ENUM ({labels});\n"
            f"EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        )
    return out


VERSIONS = f"""
-- Tools probe pgml.version() for the extension's version; the proxy's own is separate.
CREATE OR REPLACE FUNCTION pgml.version() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT '{EXTENSION_VERSION}' $$;
"""


def render() -> str:
    parts = [
        "-- pgml-proxy migration 0005: the extension's types, its version, and the model-free vector\n"
        "-- functions computed in double precision (replacing 0002's, which computed in real).\n"
        "-- GENERATED by runtime/sql/gen_functions.py; do not edit by hand.",
        REAL_CAST.strip(),
    ]
    parts.extend(_enums())
    for t in TYPES:
        parts.extend(_vector_functions(t))
    parts.append(VERSIONS.strip())
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "0005_surface.sql").write_text(render())
