"""SQLAlchemy 2 (psycopg and asyncpg dialects, pool_pre_ping=True) direct vs through the proxy.

The same ORM and Core work (create_all, executemany inserts, ORM queries re-executed past the
drivers' prepare thresholds, update/delete rowcounts, a rolled-back and a committed transaction,
an IntegrityError, drop_all) runs against direct Postgres, the session proxy and the transaction
proxy; every step's observations (rows, rowcounts, column names, SQLSTATEs) must equal direct's.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    ForeignKey,
    String,
    create_engine,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from tests.fix_proxy import ProxyProcess


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "drv_sa_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "drv_sa_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(ForeignKey("drv_sa_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def orm_work(engine: Engine | Connection) -> list[Any]:
    """The same work on an engine or a connection; returns what the application sees, step by step."""
    out: list[Any] = []
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    if isinstance(engine, Connection):  # on a connection the DDL is in its open transaction
        engine.commit()
    try:
        with Session(engine) as s:
            s.add_all([Author(id=i, name=f"a{i}", books=[Book(title=f"b{i}-{j}") for j in range(3)])
                       for i in range(1, 6)])
            s.commit()
            for i in range(8):  # re-executed: psycopg prepares from the 6th, asyncpg always
                q = select(Book.title).join(Author).where(Author.id == i % 5 + 1).order_by(Book.id)
                out.append(s.scalars(q).all())
            authors = s.scalars(select(Author).order_by(Author.id))
            out.append([(a.name, [b.title for b in a.books]) for a in authors])
            changed = cast(CursorResult[Any], s.execute(update(Book).where(Book.id > 12).values(title="x")))
            out.append(changed.rowcount)
            s.rollback()
            out.append(s.scalar(select(func.count()).where(Book.title == "x")))
            s.execute(delete(Book).where(Book.author_id == 5))
            s.commit()
            try:
                s.add(Author(id=99, name="a1"))
                s.commit()
            except DBAPIError as err:
                orig = err.orig  # psycopg's errors carry .sqlstate, asyncpg's .sqlstate too (via the dialect)
                out.append(("error", getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)))
                s.rollback()
            res = s.execute(text("SELECT count(*) AS n, max(title) AS m FROM drv_sa_book WHERE id > :k"),
                            {"k": 3})
            out.append((list(res.keys()), [tuple(r) for r in res.all()]))
            s.commit()
    finally:
        Base.metadata.drop_all(engine)
        if isinstance(engine, Connection):
            engine.commit()
    return out


def async_orm_work(url: str) -> list[Any]:
    async def main() -> list[Any]:
        engine = create_async_engine(url, pool_pre_ping=True, pool_size=2)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(orm_work)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _url(driver: str, host: str, port: int) -> str:
    return f"postgresql+{driver}://postgres@{host}:{port}/postgres"


@pytest.fixture(scope="module")
def direct_results(pg_server: Any) -> dict[str, list[Any]]:
    # also in the database the proxies' migrations made: the tables are dropped after each run
    return {driver: run(driver, "127.0.0.1", pg_server.port) for driver in ("psycopg", "asyncpg")}


def run(driver: str, host: str, port: int) -> list[Any]:
    if driver == "asyncpg":
        return async_orm_work(_url(driver, host, port))
    engine = create_engine(_url(driver, host, port), pool_pre_ping=True, pool_size=2)
    try:
        return orm_work(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("pool", ["session", "transaction"])
def test_sqlalchemy_matches_direct(direct_results: dict[str, list[Any]], driver: str, pool: str,
                                   proxy: ProxyProcess, proxy_tx: ProxyProcess) -> None:
    px = proxy if pool == "session" else proxy_tx
    want = direct_results[driver]
    assert want[11] == ("error", "23505") and len(want) == 13, want
    assert run(driver, px.host, px.port) == want
    assert run(driver, px.host, px.port) == want  # again: the proxy's server connections now hold state
