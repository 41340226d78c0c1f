"""``shardkit verify``: compare what each shard holds with where the map says it belongs.

For every sharded table, every shard's rows are grouped by owner: rows whose
key maps to another shard are *misplaced*; a misplaced row whose primary key
also exists on its owner is a *duplicate*.  Hash groups are checked inside
PostgreSQL with ``shardkit.bucket()`` when shardkit's SQL functions are
installed on the shard (``op.install_shardkit_sql()``), else by streaming the
keys through the Python hash; range, list and custom groups stream their keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from ._cluster import Cluster
from ._config import ClusterConfig, _compress, counted
from ._guard import SQL_HASHABLE_TYPES, bucket_expression, guard_installed, table_shape, table_sql
from ._routing import Router
from ._slices import SLICE_BASE
from ._strategies import HashStrategy
from .errors import NoShardForKey, ShardKeyError

__all__ = ["TableReport", "VerifyReport", "verify"]



@dataclass
class TableReport:
    table: str
    shard: str
    rows: int = 0
    misplaced: Counter[str] = field(default_factory=Counter)   # owner shard -> rows
    duplicates: int = 0
    #: How many misplaced rows were looked for on their owner (``duplicates`` counts those
    #: found): at most ``sample`` per table and shard, none for a table without a primary key.
    duplicates_checked: int = 0
    method: str = ""
    in_flight: int = 0   # rows of buckets a move in progress has copied here / not cleaned up yet

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "shard": self.shard, "rows": self.rows,
                "misplaced": dict(self.misplaced), "duplicates": self.duplicates,
                "duplicates_checked": self.duplicates_checked,
                "in_flight": self.in_flight, "method": self.method}


@dataclass
class VerifyReport:
    tables: list[TableReport]
    missing_tables: list[str]
    #: Per shard with an ownership guard, where its owned buckets (and slices of
    #: range and list groups) differ from the map: ``{"shard", "missing": [...],
    #: "extra": [...]}`` (those the map gives it that it does not own; those it
    #: owns that the map gives another shard), and ``"slices"``, the slices among them
    #: the map knows (number -> its group and keys), when there are any.
    ownership: list[dict[str, Any]] = field(default_factory=list)
    map_version: int | None = None
    #: The catalog's state changed during every attempt (a move kept taking
    #: steps): problems reported may be rows of that move.
    map_changed: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing_tables and not self.ownership and \
            all(not t.misplaced for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "map_version": self.map_version, "map_changed": self.map_changed,
                "missing_tables": self.missing_tables, "ownership": self.ownership,
                "tables": [t.as_dict() for t in self.tables]}

    def render(self) -> str:
        lines = []
        for t in self.tables:
            bad = sum(t.misplaced.values())
            status = "ok" if not bad else (
                f"{bad} misplaced (" + ", ".join(_describe(s, n) for s, n in sorted(t.misplaced.items()))
                + f"), {_duplicates(t)}")
            if t.in_flight:
                status += f", {t.in_flight} rows of a move in progress (or left by an aborted one)"
            rows = "row " if t.rows == 1 else "rows"
            lines.append(f"{t.shard:<8} {t.table:<24} {t.rows:>10} {rows}  {status}  [{t.method}]")
        for m in self.missing_tables:
            lines.append(f"missing: {m}")
        for o in self.ownership:
            for key, what in (("missing", "does not own {} the map gives it"),
                              ("extra", "owns {} the map gives another shard")):
                # Hash buckets, then slices of range and list groups (numbered from SLICE_BASE).
                buckets = [b for b in o[key] if b < SLICE_BASE]
                slices = [b for b in o[key] if b >= SLICE_BASE]
                if buckets:
                    lines.append(f"ownership: {o['shard']} {what.format(counted(len(buckets), 'bucket'))}: "
                                 f"{_compress(buckets)}")
                if slices:
                    named = o.get("slices", {})
                    lines.append(f"ownership: {o['shard']} {what.format(counted(len(slices), 'slice'))}: "
                                 + ", ".join(f"{i} ({named[i]})" if i in named else str(i) for i in slices))
        if self.map_changed:
            lines.append("the shard map changed while the shards were read, each time (a move is taking "
                         "steps): the problems above may be rows of that move; run verify again once it "
                         "has finished (`shardkit rebalance status`)")
        if self.ok and not self.tables and not self.missing_tables:
            # (clean, but say why: a config without groups gives verify no table to read)
            lines.append("verify: clean (no sharded table is configured: nothing was checked)")
        else:
            lines.append("verify: clean" if self.ok else "verify: PROBLEMS FOUND")
        return "\n".join(lines)


def _duplicates(t: TableReport) -> str:
    placed = sum(n for s, n in t.misplaced.items() if not _ownerless(s))
    if t.duplicates_checked >= placed:
        return f"{t.duplicates} also present on their owner"
    if not t.duplicates_checked:
        return "not looked for on their owner (no primary key, sample=0, or the owner lacks the table)"
    return (f"{t.duplicates} of the {t.duplicates_checked} looked for (of {placed}) also present "
            "on their owner")


def _ownerless(owner: str) -> bool:
    return owner in (_NO_OWNER, _NULL_KEY) or owner.startswith((_RAISED, _REFUSED))


def _describe(owner: str, n: int) -> str:
    if owner == _NULL_KEY:
        return f"{n} with a NULL shard key"
    if owner == _NO_OWNER:
        return f"{n} whose key no shard owns"
    if owner.startswith(_RAISED):
        return f"{n} for whose key the group's custom function raised {owner[len(_RAISED):-1]}"
    if owner.startswith(_REFUSED):
        return f"{n} whose key the group's {owner[len(_REFUSED):-1]}"
    return f"{n} {'belongs' if n == 1 else 'belong'} on {owner}"


def verify(cluster: Cluster, *, batch: int = 10_000, sample: int = 100_000,
           attempts: int = 3) -> VerifyReport:
    """Check every configured sharded table on every shard's primary.

    Read-only.  At most ``sample`` misplaced primary keys per table and shard
    are kept to look for duplicates on their owners.

    With a catalog, the shards are compared with one state of it (the map, and
    the buckets whose rows a move in progress has copied or not yet cleaned
    up, or an abort with ``target_lost`` left on its target).  A move that reaches its next step while the shards are read can make
    rows look misplaced; so when problems are found and the catalog's state has
    changed meanwhile, the check runs again, up to ``attempts`` times in all.  A
    report whose state kept changing says so (``map_changed``).
    """
    cluster.refresh_map()  # with a catalog: the live map, and the buckets of moves in flight
    for _ in range(max(1, attempts)):
        router = cluster.router
        report = _verify_by(cluster, router, batch, sample)
        if report.ok:
            return report
        cluster.refresh_map()  # a new state replaces the router: check again by it
        if cluster.router is router:
            return report
    report.map_changed = True
    return report


def _verify_by(cluster: Cluster, router: Router, batch: int, sample: int) -> VerifyReport:
    """One check of every shard against the map (and moves' state) of ``router``."""
    config = router.config
    reports: list[TableReport] = []
    missing: list[str] = []
    ownership = _check_ownership(cluster, config)
    for group in config.groups:
        for table, cols in group.tables.items():
            for shard in config.shard_names:
                with cluster.primary(shard).connect() as conn:
                    exists = conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"),
                                          {"t": table_sql(table)}).scalar()
                    if not exists:
                        missing.append(f"{table} on {shard}")
                        continue
                    rep = TableReport(table, shard)
                    # (A custom strategy may place keys as the database compares them.)
                    _, pk, types = table_shape(
                        conn, table, keys=cols if group.strategy.kind != "custom" else ())
                    strays: dict[str, list[tuple[Any, ...]]] = {}
                    # Copies (or leftovers) of a move in progress are expected here.
                    foreign = router.foreign_buckets.get(shard, frozenset())
                    sql_type = types.get(cols[0]) if len(cols) == 1 else None
                    if isinstance(group.strategy, HashStrategy) and sql_type in SQL_HASHABLE_TYPES \
                            and _sql_hash_installed(conn):
                        _check_hash_in_sql(config, conn, rep, table, cols[0], sql_type, pk,
                                           strays, sample, foreign)
                    else:
                        padded = frozenset(i for i, c in enumerate(cols) if types.get(c) == "bpchar")
                        _check_streaming(conn, rep, table, cols, group.strategy, batch, pk,
                                         strays, sample, foreign, padded)
                reports.append(rep)
                if pk:
                    rep.duplicates_checked = _count_duplicates(cluster, rep, pk, strays, batch)
    return VerifyReport(reports, missing, ownership, router.map_version)


def _check_ownership(cluster: Cluster, config: ClusterConfig) -> list[dict[str, Any]]:
    problems = []
    bucket_map = config.bucket_map
    for shard in config.shard_names:
        with cluster.primary(shard).connect() as conn:
            if not guard_installed(conn):
                continue
            owned = {r[0] for r in conn.execute(text("SELECT bucket FROM shardkit.owned_buckets"))}
        want = {b for b, s in enumerate(bucket_map) if s == shard} | \
            {sl.id for sl in config.slices if sl.shard == shard}
        if owned != want:
            # What the slices among them are (their group and keys), for the report's text.
            named = {sl.id: sl.describe() for sl in config.slices if sl.id in owned ^ want}
            problems.append({"shard": shard, "missing": sorted(want - owned), "extra": sorted(owned - want),
                             **({"slices": named} if named else {})})
    return problems


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_hash_installed(conn: Any) -> bool:
    return bool(conn.execute(text(
        "SELECT to_regprocedure('shardkit.bucket(bigint, integer)') IS NOT NULL")).scalar())


_NO_OWNER = "(no owner)"   # no shard is mapped for the key
_NULL_KEY = "(null key)"   # the shard key is NULL
_RAISED = "(function raised "  # + the exception's class and ")": a custom function failed
_REFUSED = "(refused: "  # + the strategy's kind, "strategy refuses: ", its message and ")"


def _without_key(e: ShardKeyError) -> str:
    """``e``'s message with its key (and the parts of a composite one) left out, so that the
    rows it refuses for one reason are counted together."""
    msg = e.message
    parts = e.key if isinstance(e.key, tuple) else ()
    for k in (e.key, *parts):
        if k is not None:
            msg = msg.replace(repr(k), "...")
    return msg


def _check_hash_in_sql(config: ClusterConfig, conn: Any, rep: TableReport, table: str, column: str,
                       sql_type: str, pk: list[str], strays: dict[str, list[tuple[Any, ...]]],
                       sample: int, foreign: frozenset[int]) -> None:
    rep.method = "sql"
    n = config.bucket_count
    bucket_expr = bucket_expression(column, sql_type, n)
    owned = [b for b, s in enumerate(config.bucket_map) if s == rep.shard or b in foreign]
    for bucket, count in conn.execute(text(
            f"SELECT {bucket_expr}, count(*) FROM {table_sql(table)} GROUP BY 1")).all():
        rep.rows += count
        if bucket in foreign:
            rep.in_flight += count
            continue
        owner = _NULL_KEY if bucket is None else config.bucket_map[bucket]
        if owner != rep.shard:
            rep.misplaced[owner] += count
    if rep.misplaced and pk:
        result = conn.execute(text(
            f"SELECT {bucket_expr}, {', '.join(_q(c) for c in pk)} FROM {table_sql(table)} "
            f"WHERE {_q(column)} IS NOT NULL AND NOT ({bucket_expr} = ANY(:owned)) "
            f"LIMIT {int(sample)}"), {"owned": owned})
        for row in result:
            strays.setdefault(config.bucket_map[row[0]], []).append(tuple(row[1:]))


def _check_streaming(conn: Any, rep: TableReport, table: str, cols: tuple[str, ...],
                     strategy: Any, batch: int, pk: list[str],
                     strays: dict[str, list[tuple[Any, ...]]], sample: int,
                     foreign: frozenset[int], padded: frozenset[int] = frozenset()) -> None:
    """``padded``: the positions in ``cols`` of char(n) columns, whose values come back
    padded with blanks that the key (as PostgreSQL compares it, and as the router and the
    SQL functions hash it) does not have."""
    rep.method = "python"
    width = len(cols)
    select_cols = ", ".join(_q(c) for c in (*cols, *pk))
    kept = 0
    result = conn.execution_options(yield_per=batch).execute(
        text(f"SELECT {select_cols} FROM {table_sql(table)}"))
    for row in result:
        rep.rows += 1
        parts = row[:width]
        if padded:
            parts = tuple(v.rstrip(" ") if i in padded and v is not None else v
                          for i, v in enumerate(parts))
        key = parts[0] if width == 1 else tuple(parts)
        if foreign and key is not None and strategy.unit_for_key(key) in foreign:
            rep.in_flight += 1
            continue
        if key is None or (width > 1 and None in key):
            owner = _NULL_KEY
        else:
            try:
                owner = strategy.shard_for_key(key)
            except NoShardForKey:
                owner = _NO_OWNER
            except ShardKeyError as e:
                if strategy.kind == "custom":
                    owner = f"{_RAISED}{type(e.__cause__ or e).__name__})"  # (the function's own)
                else:  # a key the strategy refuses (a list group's date of another kind)
                    owner = f"{_REFUSED}{strategy.kind} strategy refuses: {_without_key(e)})"
            except Exception as e:  # noqa: BLE001 - a custom function's own error: reported
                # per row, not a crash that hides every other table's report.
                owner = f"{_RAISED}{type(e.__cause__ or e).__name__})"  # (the function's own)
        if owner != rep.shard:
            rep.misplaced[owner] += 1
            if pk and not _ownerless(owner) and kept < sample:
                strays.setdefault(owner, []).append(tuple(row[width:]))
                kept += 1


def _count_duplicates(cluster: Cluster, rep: TableReport, pk: list[str],
                      strays: dict[str, list[tuple[Any, ...]]], batch: int) -> int:
    """Count misplaced rows whose primary key is also present on their owner; return how
    many were looked for (not those of an owner that lacks the table: reported missing)."""
    cols = ", ".join(_q(c) for c in pk)
    # PostgreSQL takes at most 65,535 parameters in a statement, and a long IN list of
    # row values runs out of parser stack before that.
    batch = max(1, min(batch, 1000))
    checked = 0
    for owner, keys in strays.items():
        with cluster.primary(owner).connect() as conn:
            if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"),
                                {"t": table_sql(rep.table)}).scalar():
                continue
            checked += len(keys)
            for i in range(0, len(keys), batch):
                chunk = keys[i:i + batch]
                values = ", ".join(
                    "(" + ", ".join(f":k{j}_{c}" for c in range(len(pk))) + ")"
                    for j in range(len(chunk)))
                params = {f"k{j}_{c}": v for j, k in enumerate(chunk) for c, v in enumerate(k)}
                rep.duplicates += conn.execute(text(
                    f"SELECT count(*) FROM {table_sql(rep.table)} WHERE ({cols}) IN ({values})"),
                    params).scalar_one()
    return checked
