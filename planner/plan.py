"""The plan: what `analyze` decides and the executor carries out. Data only, no behaviour.

A statement's plan says where each argument of each pgml call comes from (a literal,
a client parameter, a one-off upstream evaluation, or a column of rows streamed from
upstream), which temporary tables are filled before the final statement runs, and how
the final statement's rows are merged with model results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from planner.catalog import Signature


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class ClientParam:
    number: int  # 1-based $n of the client's statement
    sql_type: str  # the declared type of the pgml argument, used when the client gave OID 0


@dataclass(frozen=True)
class Evaluated:
    index: int  # column of the statement's one-off evaluation query


@dataclass(frozen=True)
class RowColumn:
    index: int  # column of the streamed rows


ArgSource = Literal | ClientParam | Evaluated | RowColumn


@dataclass
class CallPlan:
    """One pgml call: its overload and where each given argument's value comes from."""

    id: int
    sig: Signature
    sources: dict[str, ArgSource]
    defaults: dict[str, Any]
    label: str  # for EXPLAIN and errors: "pgml.embed #1"


@dataclass
class ConstCall:
    """A call with row-independent arguments: evaluated once, passed as parameter `param`."""

    call: CallPlan
    param: int
    out_type: str


@dataclass
class TempStep:
    """Materialise a call: distinct arguments into `keys`, results into `results`."""

    call: CallPlan
    keys: str | None  # temp table of (k, a1..an); None when every argument is row-independent
    create_keys: str | None  # CREATE TEMP TABLE keys AS SELECT row_number() ..., DISTINCT args ...
    fetch_keys: str | None  # SELECT k, a1.. FROM keys
    results: str
    create_results: str
    index_sql: list[str]
    srf: bool
    position: str  # where the call stands, for EXPLAIN
    post_sql: list[str] = field(default_factory=list)
    # The SELECT inside create_keys, and the $n it reads: CREATE TABLE AS infers no parameter
    # types, so the executor asks Postgres to Describe this SELECT for those the client left open.
    keys_select: str = ""
    keys_params: list[int] = field(default_factory=list)


@dataclass
class StreamCallPlan:
    """A call streamed from the top SELECT list: its row-dependent arguments are upstream
    columns named ``__pgml_<call id>_<k>`` standing where the call stood."""

    call: CallPlan
    name: str
    out_type: str  # SQL type the client sees (the call's, or its cast's)
    n_args: int


@dataclass
class LocalTarget:
    call: CallPlan
    name: str
    out_type: str


@dataclass
class StatementPlan:
    text: str  # the client's text of this statement
    kind: str  # passthrough | local | local_table | upstream | explain
    n_params: int = 0
    sql: str = ""  # the final statement sent upstream
    describe_sql: str = ""  # the statement with calls replaced by typed NULLs (for Describe)
    eval_sql: str | None = None  # SELECT of row-independent, non-literal arguments
    consts: list[ConstCall] = field(default_factory=list)
    steps: list[TempStep] = field(default_factory=list)
    stream: list[StreamCallPlan] | None = None  # set: the final SELECT's rows are merged with calls
    local: list[LocalTarget] | None = None
    local_columns: list[tuple[str, str]] | None = None  # local_table: output column names/types
    param_types: dict[int, str] = field(default_factory=dict)  # $n used in pgml args -> SQL type
    explain_sql: str | None = None  # EXPLAIN (options) of the final statement
    explain_analyze: bool = False
    command: str = ""  # the statement's node name, for transaction-control checks
    # CREATE TABLE AS: (table, column) of embeddings made `vector`, typed `vector(N)` once N is known.
    vector_columns: list[tuple[str, str]] = field(default_factory=list)
    copy_out: bool = False  # COPY ... TO STDOUT: relay the upstream's CopyOut messages
    # DECLARE name CURSOR FOR SELECT ... pgml ...: the cursor's name and WITH HOLD. Its temp
    # tables outlive the statement (the cursor reads them at each FETCH): ON COMMIT DROP,
    # named after the statement so two cursors of one transaction never share them.
    cursor: str | None = None
    cursor_hold: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def needs_temp(self) -> bool:
        return bool(self.steps)

    @property
    def calls(self) -> list[CallPlan]:
        out = [c.call for c in self.consts] + [s.call for s in self.steps]
        out += [c.call for c in self.stream or []]
        out += [t.call for t in self.local or []]
        return out
