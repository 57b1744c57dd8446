"""Writes 0002_functions.sql: the model-free pgml functions as plain SQL functions.

Kept in the repo (STYLE.md: tables from a standard are generated, not typed by hand):
every vector function exists for real[] and float8[], so the SQL is produced from one
template per function. Run `python runtime/sql/gen_functions.py` after editing it;
migrations are append-only, so a change to already-applied SQL needs a new file.
"""

from __future__ import annotations

from pathlib import Path

OPTS = "LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE"
TYPES = ("real", "float8")

# (name, element expression over v (and w or s), "scalar" | "array")
ELEMENTWISE = [("add", "+"), ("subtract", "-"), ("multiply", "*"), ("divide", "/")]

# Reductions: name -> SQL over u(v).
NORMS = {
    "norm_l0": "SELECT count(*) FILTER (WHERE v <> 0)::{t} FROM unnest(vector) u(v)",
    "norm_l1": "SELECT coalesce(sum(abs(v)), 0)::{t} FROM unnest(vector) u(v)",
    "norm_l2": "SELECT coalesce(sqrt(sum(v * v)), 0)::{t} FROM unnest(vector) u(v)",
    "norm_max": "SELECT coalesce(max(abs(v)), 0)::{t} FROM unnest(vector) u(v)",
}
NORMALIZE = {"normalize_l1": "norm_l1", "normalize_l2": "norm_l2", "normalize_max": "norm_max"}
PAIRS = {
    "distance_l1": "SELECT coalesce(sum(abs(a.v - b.v)), 0)::{t}",
    "distance_l2": "SELECT coalesce(sqrt(sum((a.v - b.v) * (a.v - b.v))), 0)::{t}",
    "dot_product": "SELECT coalesce(sum(a.v * b.v), 0)::{t}",
    "cosine_similarity": (
        "SELECT (sum(a.v * b.v) / nullif(sqrt(sum(a.v * a.v)) * sqrt(sum(b.v * b.v)), 0))::{t}"
    ),
}
PAIR_FROM = (
    " FROM unnest(vector_a) WITH ORDINALITY a(v, i) JOIN unnest(vector_b) WITH ORDINALITY b(v, i) USING (i)"
)
AGGREGATES = {  # name -> element-wise combine of the state (a.v) and the next value (b.v)
    "sum": "a.v + b.v",
    "min": "least(a.v, b.v)",
    "max": "greatest(a.v, b.v)",
    "min_abs": "least(a.v, abs(b.v))",
    "max_abs": "greatest(a.v, abs(b.v))",
}
FIRST = {"sum": "v", "min": "v", "max": "v", "min_abs": "abs(v)", "max_abs": "abs(v)"}


def _vector_functions(t: str) -> list[str]:
    out = []
    for name, op in ELEMENTWISE:
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[], scalar {t}) RETURNS {t}[] {OPTS} AS $$\n"
            f"  SELECT coalesce(array_agg(v {op} scalar ORDER BY i), '{{}}')"
            f" FROM unnest(vector) WITH ORDINALITY u(v, i) $$;"
        )
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[], other {t}[]) RETURNS {t}[] {OPTS} AS $$\n"
            f"  SELECT coalesce(array_agg(a.v {op} b.v ORDER BY i), '{{}}')"
            f" FROM unnest(vector) WITH ORDINALITY a(v, i) JOIN unnest(other) WITH ORDINALITY b(v, i)"
            f" USING (i) $$;"
        )
    for name, body in NORMS.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[]) RETURNS {t} {OPTS} AS $$\n"
            f"  {body.format(t=t)} $$;"
        )
    for name, norm in NORMALIZE.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector {t}[]) RETURNS {t}[] {OPTS} AS $$\n"
            f"  SELECT coalesce(array_agg(v / nullif(pgml.{norm}(vector), 0) ORDER BY i), '{{}}')"
            f" FROM unnest(vector) WITH ORDINALITY u(v, i) $$;"
        )
    for name, body in PAIRS.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml.{name}(vector_a {t}[], vector_b {t}[]) RETURNS {t} {OPTS}"
            f" AS $$\n  {body.format(t=t)}{PAIR_FROM} $$;"
        )
    for name, combine in AGGREGATES.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION pgml._agg_{name}(state {t}[], value {t}[]) RETURNS {t}[]\n"
            f"  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$\n"
            f"  SELECT CASE WHEN value IS NULL THEN state\n"
            f"    WHEN state IS NULL THEN (SELECT array_agg({FIRST[name]} ORDER BY i)"
            f" FROM unnest(value) WITH ORDINALITY u(v, i))\n"
            f"    ELSE (SELECT array_agg({combine} ORDER BY i)"
            f" FROM unnest(state) WITH ORDINALITY a(v, i) JOIN unnest(value) WITH ORDINALITY b(v, i)"
            f" USING (i)) END $$;"
        )
        out.append(f"DROP AGGREGATE IF EXISTS pgml.{name}({t}[]);")
        out.append(
            f"CREATE AGGREGATE pgml.{name}({t}[]) (SFUNC = pgml._agg_{name}, STYPE = {t}[],"
            f" COMBINEFUNC = pgml._agg_{name}, PARALLEL = SAFE);"
        )
    return out


METRICS = """
CREATE OR REPLACE FUNCTION pgml.version() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 'pgml-proxy 0.1.0' $$;

-- Binary F1 with 1 as the positive label, as sklearn.metrics.f1_score's default.
CREATE OR REPLACE FUNCTION pgml.sklearn_f1_score(ground_truth real[], y_hat real[]) RETURNS real
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT coalesce(2.0 * count(*) FILTER (WHERE t.v = 1 AND p.v = 1)
         / nullif(count(*) FILTER (WHERE t.v = 1) + count(*) FILTER (WHERE p.v = 1), 0), 0)::real
  FROM unnest(ground_truth) WITH ORDINALITY t(v, i) JOIN unnest(y_hat) WITH ORDINALITY p(v, i) USING (i) $$;

CREATE OR REPLACE FUNCTION pgml.sklearn_r2_score(ground_truth real[], y_hat real[]) RETURNS real
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  WITH pairs AS (
    SELECT t.v::float8 AS y, p.v::float8 AS f FROM unnest(ground_truth) WITH ORDINALITY t(v, i)
    JOIN unnest(y_hat) WITH ORDINALITY p(v, i) USING (i))
  SELECT (1 - sum((y - f) ^ 2) / nullif(sum((y - m) ^ 2), 0))::real
  FROM pairs, (SELECT avg(y) AS m FROM pairs) a $$;

CREATE OR REPLACE FUNCTION pgml.sklearn_regression_metrics(ground_truth real[], y_hat real[])
  RETURNS jsonb LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  WITH pairs AS (
    SELECT t.v::float8 AS y, p.v::float8 AS f FROM unnest(ground_truth) WITH ORDINALITY t(v, i)
    JOIN unnest(y_hat) WITH ORDINALITY p(v, i) USING (i))
  SELECT jsonb_build_object(
    'r2', 1 - sum((y - f) ^ 2) / nullif(sum((y - m) ^ 2), 0),
    'mean_absolute_error', avg(abs(y - f)),
    'mean_squared_error', avg((y - f) ^ 2))
  FROM pairs, (SELECT avg(y) AS m FROM pairs) a $$;

-- Macro-averaged precision/recall/F1 over the classes 0 .. num_classes-1, accuracy and
-- the multiclass Matthews correlation (Gorodkin's R_K, what sklearn computes).
CREATE OR REPLACE FUNCTION pgml.sklearn_classification_metrics(ground_truth real[], y_hat real[],
  num_classes bigint) RETURNS jsonb LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  WITH pairs AS (
    SELECT t.v AS y, p.v AS f FROM unnest(ground_truth) WITH ORDINALITY t(v, i)
    JOIN unnest(y_hat) WITH ORDINALITY p(v, i) USING (i)),
  per_class AS (
    SELECT c,
      (SELECT count(*) FROM pairs WHERE y = c AND f = c)::float8 AS tp,
      (SELECT count(*) FROM pairs WHERE f = c)::float8 AS predicted,
      (SELECT count(*) FROM pairs WHERE y = c)::float8 AS actual
    FROM generate_series(0, num_classes - 1) c),
  scores AS (
    SELECT c, tp, predicted, actual,
      coalesce(tp / nullif(predicted, 0), 0) AS precision,
      coalesce(tp / nullif(actual, 0), 0) AS recall FROM per_class),
  totals AS (SELECT count(*)::float8 AS n, count(*) FILTER (WHERE y = f)::float8 AS correct FROM pairs)
  SELECT jsonb_build_object(
    'precision', avg(precision),
    'recall', avg(recall),
    'f1', avg(coalesce(2 * precision * recall / nullif(precision + recall, 0), 0)),
    'accuracy', max(correct) / nullif(max(n), 0),
    'mcc', (max(correct) * max(n) - sum(predicted * actual))
           / nullif(sqrt(max(n) ^ 2 - sum(predicted ^ 2)) * sqrt(max(n) ^ 2 - sum(actual ^ 2)), 0))
  FROM scores, totals $$;
"""


def render() -> str:
    parts = [
        "-- pgml-proxy migration 0002: the model-free pgml functions, run natively by Postgres.",
        "-- GENERATED by runtime/sql/gen_functions.py; do not edit by hand.",
    ]
    for t in TYPES:
        parts.extend(_vector_functions(t))
    parts.append(METRICS.strip())
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "0002_functions.sql").write_text(render())
