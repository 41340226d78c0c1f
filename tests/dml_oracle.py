"""Writes compared with one unsharded database (the "oracle"), for the random statement
fuzzers of writes (test_dml_fuzz, test_dml_fuzz_composite_keys): a module's
own three-shard cluster and one database holding every row, each statement run on both
sides, and the two outcomes judged — the same ``rowcount``, ``RETURNING`` rows (as
multisets) and session objects, or a refusal by shardkit that changed nothing — in a tally
that reports what it counted."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from own_tables import one_database, statements_counted
from sqlalchemy import inspect, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.orm import exc as orm_exc

import shardkit

SHARDS = ("s0", "s1", "s2")

# What a shardkit session may answer instead of running a statement: its own errors (which
# say what to do), and the ORM's StaleDataError of a bulk UPDATE whose shard key is not
# the row's (documented).
REFUSALS = (shardkit.ShardkitError, orm_exc.StaleDataError)
# What the one database may answer instead: the statement is wrong on any database.
ORACLE_ERRORS = (sa_exc.DBAPIError, sa_exc.InvalidRequestError, sa_exc.ArgumentError, sa_exc.CompileError,
                 orm_exc.StaleDataError)


# ---------------------------------------------------------------------------
# The cluster and the one database
# ---------------------------------------------------------------------------


@dataclass
class OracleEnv:
    """A module's cluster, a session maker of ``ShardedSession`` over it, and the one
    database (a fuzzer's own Env adds its fields, each with a default)."""
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine


E = TypeVar("E", bound=OracleEnv)


@contextlib.contextmanager
def oracle_env(cluster_factory: Any, env_class: type[E], config: dict[str, Any], metadata: Any,
               oracle_name: str) -> Iterator[E]:
    """A cluster of three shards (``shardkit_module_cluster_factory``'s, no replicas) with
    ``config`` (groups, reference tables), ``metadata``'s tables created empty on every shard
    and on one database ``oracle_name`` (on shard s0's server), as ``env_class``."""
    dev = cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **config}, metadata=metadata)
    assert cluster.shard_names == SHARDS
    for s in cluster.shard_names:
        metadata.drop_all(cluster.primary(s))
        metadata.create_all(cluster.primary(s))
    oracle = one_database(dev, oracle_name, metadata)
    try:
        yield env_class(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle)
    finally:
        oracle.dispose()
        cluster.dispose()


def sortkey(row: tuple[Any, ...]) -> Any:
    """Orders rows whose values may be None or of several types."""
    return tuple((v is None, str(type(v)), v) for v in row)


def sorted_rows(rows: Any) -> list[tuple[Any, ...]]:
    return sorted((tuple(r) for r in rows), key=sortkey)


def rows_diff(want: list[Any], got: list[Any]) -> str:
    """What ``got`` misses of ``want`` and has beyond it (as multisets)."""
    missing = Counter(want) - Counter(got)
    extra = Counter(got) - Counter(want)
    return f"missing {sorted(missing, key=sortkey)} extra {sorted(extra, key=sortkey)}"


# ---------------------------------------------------------------------------
# Running one statement on both sides
# ---------------------------------------------------------------------------


def preload(s: Session, model: Any, rids: list[int]) -> None:
    """Load the objects of ``model`` with these ``rid`` into ``s``."""
    if rids:
        s.execute(select(model).where(model.rid.in_(rids))).all()


def _plain(row: Any) -> tuple[Any, ...]:
    return tuple(tuple((c.key, getattr(v, c.key)) for c in v.__table__.columns)
                 if isinstance(v, DeclarativeBase) else v for v in row)


def returned(r: Any, returning: bool) -> tuple[Any, Counter | None]:
    """A result's ``rowcount`` (None if it has none) and, if the statement has ``RETURNING``,
    its rows as a multiset (ORM objects as their column values)."""
    rows = Counter(_plain(x) for x in r.all()) if returning else None
    return getattr(r, "rowcount", None), rows


def session_view(s: Session, model: Any, rids: list[int]) -> dict[int, Any] | None:
    """What the session holds of the preloaded objects, without loading anything (None if
    none were preloaded)."""
    if not rids:
        return None
    out = {}
    cols = [c.key for c in model.__table__.columns if c.key != "rid"]
    for rid in rids:
        for key, obj in s.identity_map.items():
            if key[0] is model and key[1] == (rid,):
                st = inspect(obj)
                out[rid] = ("deleted" if st.was_deleted or st.deleted else "present",
                            tuple(sorted((a, st.dict[a]) for a in cols if a in st.dict)))
    return out


def _writes(sql: str) -> str | None:
    word = sql.split()[0].upper()
    return word if word in ("UPDATE", "DELETE", "INSERT", "WITH") else None


@dataclass
class Both:
    """One statement's outcome on the one database and through shardkit."""
    want: Any = None                          # what on_oracle returned
    oracle_error: BaseException | None = None
    got: Any = None                           # what on_shards returned
    sharded_error: BaseException | None = None
    hits: Counter = field(default_factory=Counter)   # (shard, UPDATE|DELETE|INSERT|WITH): statements run


def run_both(env: OracleEnv, on_oracle: Callable[[Session], Any], on_shards: Callable[[Session], Any]) -> Both:
    """``on_oracle`` in a session of the one database, and ``on_shards`` in a
    ``ShardedSession`` (committed), counting the writes each shard's primary runs; the one
    database's session is committed if neither failed, else rolled back."""
    out = Both()
    with Session(env.oracle) as so:
        try:
            out.want = on_oracle(so)
        except ORACLE_ERRORS as e:
            out.oracle_error = e
            so.rollback()
        with env.Session() as ss, statements_counted(env.cluster, _writes) as hits:
            out.hits = hits
            try:
                out.got = on_shards(ss)
                ss.commit()
            except Exception as e:  # noqa: BLE001 - judged by judge_errors
                out.sharded_error = e
                ss.rollback()
        if out.sharded_error is not None or out.oracle_error is not None:
            so.rollback()
        else:
            so.commit()
    return out


# ---------------------------------------------------------------------------
# Judging the outcome
# ---------------------------------------------------------------------------


def reason(e: BaseException, width: int) -> str:
    msg = str(e).split("\n")[0]
    return f"{type(e).__name__}: {msg[:width]}"


@dataclass
class Tally:
    ran: int = 0
    same: int = 0
    changed: int = 0        # of the same: statements that changed rows
    both_failed: int = 0
    refused: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    width: int = 110        # how much of an error's first line a refusal is counted by

    def run(self, statements: int, statement: Callable[[], Any], run_one: Callable[[Any], None],
            resync: Callable[[], None], log: str | None = None) -> None:
        """``run_one`` each of ``statements`` statements ``statement()`` makes, ``resync()``
        after one that gave a mismatch (so that one defect is reported once); with ``log``
        (a file name), append each statement's outcome to it."""
        for _ in range(statements):
            st = statement()
            before = self._counts()
            self.ran += 1
            try:
                run_one(st)
            finally:
                if log:
                    after = self._counts()
                    outcome = ["same", "both failed", "refused", "MISMATCH"][
                        next((i for i in range(4) if after[i] != before[i]), 0)]
                    with open(log, "a") as f:
                        f.write(f"{outcome}\t{st.what}\n")
            if len(self.mismatches) > before[3]:
                resync()

    def _counts(self) -> tuple[int, int, int, int]:
        return self.same, self.both_failed, sum(self.refused.values()), len(self.mismatches)

    def judge_errors(self, what: str, both: Both, changed: str) -> bool:
        """Whether either side failed, counted: failing on both, or refused by shardkit, if
        nothing changed (``changed`` says what did: "" for nothing), else a mismatch."""
        if both.oracle_error is not None:
            if both.sharded_error is None:
                self.mismatches.append(f"{what}: one database fails ({reason(both.oracle_error, self.width)}), "
                                       f"shardkit ran it: {both.got[:2]!r}")
            elif changed:
                self.mismatches.append(f"{what}: both fail, but {changed} changed")
            else:
                self.both_failed += 1
            return True
        if both.sharded_error is not None:
            why = reason(both.sharded_error, self.width)
            if not isinstance(both.sharded_error, REFUSALS):
                self.mismatches.append(f"{what}: one database runs it (rowcount {both.want[0]}), shardkit fails "
                                       f"with {why}")
            elif changed:
                self.mismatches.append(f"{what}: refused ({why}) but {changed} changed")
            else:
                self.refused[why] += 1
            return True
        return False

    def judged(self, st: Any, problems: list[str], changed: bool) -> bool:
        """Count a statement both sides ran: the same (``changed``: changing rows) if there
        are no ``problems``, else a mismatch.  Whether it was the same."""
        if problems:
            self.mismatch(st, problems)
            return False
        self.same += 1
        self.changed += changed
        return True

    def mismatch(self, st: Any, problems: list[str]) -> None:
        self.mismatches.append(f"{st.what} params={st.params!r}: " + "; ".join(problems))

    def report(self, head: str) -> str:
        """``head``, the refusals by reason, most frequent first, and the mismatches."""
        lines = [head]
        lines += [f"  refused x{n}: {r}" for r, n in self.refused.most_common()]
        lines += [f"  MISMATCH: {m}" for m in self.mismatches]
        return "\n".join(lines)


def result_problems(want: tuple[Any, Any, Any], got: tuple[Any, Any, Any]) -> list[str]:
    """How two (rowcount, RETURNING multiset, session view) differ."""
    problems = []
    # (A result SQLAlchemy gives no rowcount, e.g. an ORM bulk UPDATE's: not compared.)
    # (Unknown on one database, -1 as SQLAlchemy reports an executemany INSERT ... RETURNING's,
    # may be known through shardkit, whose shards each ran a part: then it is the number of
    # rows written, which RETURNING returned.)
    known = want[0] == -1 and want[1] is not None and got[0] == sum(want[1].values())
    if want[0] is not None and got[0] != want[0] and not known:
        problems.append(f"rowcount sharded {got[0]} one database {want[0]}")
    if got[1] != want[1]:
        problems.append(f"RETURNING missing {sorted(want[1] - got[1], key=sortkey)} "
                        f"extra {sorted(got[1] - want[1], key=sortkey)}")
    if got[2] != want[2]:
        problems.append(f"session objects sharded {got[2]} one database {want[2]}")
    return problems


def ran_more_than_once(hits: Counter) -> list[str]:
    """A problem if a shard ran a write statement more than once (for a statement that is
    not an executemany)."""
    twice = {s: n for (s, _w), n in hits.items() if n > 1}
    return [f"ran more than once on {twice}"] if twice else []
