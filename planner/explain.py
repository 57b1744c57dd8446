"""EXPLAIN of a statement with pgml calls: the proxy's part of the plan, as text lines.

Owns the wording only; the executor puts these lines above the upstream's own plan of
the rewritten statement.
"""

from __future__ import annotations

from planner.plan import StatementPlan


def proxy_lines(plan: StatementPlan, chunk_rows: int, materialise_rows: int) -> list[str]:
    lines = ["pgml-proxy plan:"]
    for const in plan.consts:
        lines.append(
            f"  {const.call.label}: arguments row-independent -> evaluated once in the proxy, "
            f"passed upstream as ${const.param}::{const.out_type}"
        )
    for step in plan.steps:
        what = "rows of a set-returning call" if step.srf else "one value per distinct argument tuple"
        if step.keys:
            lines.append(
                f"  {step.call.label} ({step.position}): distinct arguments collected upstream into "
                f"pg_temp.{step.keys}, evaluated in batches of {materialise_rows} rows, {what} "
                f"copied into pg_temp.{step.results}, joined back by a lookup"
            )
        else:
            lines.append(
                f"  {step.call.label} ({step.position}): evaluated once in the proxy, {what} copied "
                f"into pg_temp.{step.results}"
            )
    for sc in plan.stream or []:
        lines.append(
            f'  {sc.call.label} (select list, column "{sc.name}"): {sc.n_args} argument column(s) '
            f"streamed from upstream in chunks of {chunk_rows} rows, one runtime batch per chunk, "
            "merged into the rows"
        )
    lines.append("upstream plan of the rewritten statement:")
    return lines
