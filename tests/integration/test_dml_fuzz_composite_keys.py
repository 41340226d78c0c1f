"""A random statement fuzzer for WRITES, second part (after ``test_dml_fuzz``):
composite shard keys (a hash group over ``(bigint, text)``, a range group over
``(integer, integer)`` tuples, a list group over ``(text, integer)`` pairs with a default
shard), a ``custom`` strategy (``groups.<name>.function``), a reference table, statements
mixing a sharded table with the reference table, and writes inside ``shardkit.scope(key=...)``,
``shardkit.scope(shard=...)`` and with a named shard (``execution_options(shardkit_shard=...)``,
``bind_arguments={"shard_id": ...}``).

Each statement runs through a ``ShardedSession`` and on ONE unsharded database holding every
row (``dq8_oracle``); it must give the same ``rowcount``, the same ``RETURNING`` rows (as
multisets), the same session objects after ``synchronize_session``, then the same table
contents, each sharded row on the shard that owns its key (a NULL-key row on the shard it was
put on), every copy of the reference table the same as the one database's — or raise a
shardkit error and change nothing on any shard.

Where a statement runs on part of the shards by design (README "Routing rules"):
``scope(shard=S)`` and a named shard run an UPDATE/DELETE of a sharded table on S only, and a
key-less one inside ``scope(key=K)`` runs on K's shard only.  The one database then runs the
statement restricted to the rows those shards hold (``rid IN (...)``), and the shards other
than those must have run no write.  A reference table's write goes to every shard (also
inside ``scope(shard=...)``); with a named shard it changes that shard's copy alone.

``SHARDKIT_DML_FUZZ2_STATEMENTS`` sets the number of statements (default 150, times
``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py),
``SHARDKIT_DML_FUZZ2_SEED`` the seed (default 9).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_size import fuzz_size
from dml_fuzz_common import GenBase
from dml_oracle import (
    OracleEnv,
    oracle_env,
    preload,
    ran_more_than_once,
    result_problems,
    returned,
    rows_diff,
    run_both,
    session_view,
    sorted_rows,
)
from dml_oracle import Tally as OracleTally
from sqlalchemy import (
    BigInteger,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

import shardkit

pytestmark = pytest.mark.integration

STATEMENTS = fuzz_size("SHARDKIT_DML_FUZZ2_STATEMENTS", 150)
SEED = int(os.environ.get("SHARDKIT_DML_FUZZ2_SEED", "9"))
LOG = os.environ.get("SHARDKIT_DML_FUZZ2_LOG")   # a file to append each statement's outcome to
SHARDS = ("s0", "s1", "s2")


class Base(DeclarativeBase):
    pass


def _model(name: str, cols: dict[str, Any]) -> Any:
    attrs = {"__tablename__": name, "rid": mapped_column(Integer, primary_key=True, autoincrement=False)}
    attrs.update({c: mapped_column(t) for c, t in cols.items()})
    return type("M_" + name, (Base,), attrs)


CH = _model("dq8_ch", {"a": BigInteger, "b": Text, "v": Integer, "t": Text})
CHC = _model("dq8_chc", {"a": BigInteger, "b": Text, "w": Integer})
CR = _model("dq8_cr", {"a": Integer, "b": Integer, "v": Integer, "t": Text})
CRC = _model("dq8_crc", {"a": Integer, "b": Integer, "w": Integer})
CL = _model("dq8_cl", {"a": Text, "b": Integer, "v": Integer, "t": Text})
CLC = _model("dq8_clc", {"a": Text, "b": Integer, "w": Integer})
CU = _model("dq8_cu", {"k": BigInteger, "v": Integer, "t": Text})
CUC = _model("dq8_cuc", {"k": BigInteger, "w": Integer})


class Ref(Base):
    """The reference table: a copy on every shard."""
    __tablename__ = "dq8_ref"
    rid = mapped_column(Integer, primary_key=True, autoincrement=False)
    k = mapped_column(BigInteger)          # a key of the custom group
    a = mapped_column(BigInteger)          # with b: a key of the composite hash group
    b = mapped_column(Text)
    v = mapped_column(Integer)
    t = mapped_column(Text)
    z = mapped_column(Integer, server_default=text("0"))   # a constant server default


def custom_shard(k: Any) -> str:
    """The custom strategy: negative keys on s2, others by their tens."""
    if k < 0:
        return "s2"
    return SHARDS[(k // 10) % 3]


CONFIG = {
    "reference_tables": ["dq8_ref"],
    "groups": {
        "cqh": {"strategy": "hash", "tables": {"dq8_ch": ["a", "b"], "dq8_chc": ["a", "b"]}},
        "cqr": {"strategy": "range", "tables": {"dq8_cr": ["a", "b"], "dq8_crc": ["a", "b"]},
                "ranges": [{"to": [0, 0], "shard": "s0"},
                           {"from": [0, 0], "to": [10, 5], "shard": "s1"},
                           {"from": [10, 5], "to": [20, 0], "shard": "s2"},
                           {"from": [20, 0], "shard": "s0"}]},
        "cql": {"strategy": "list", "tables": {"dq8_cl": ["a", "b"], "dq8_clc": ["a", "b"]},
                "values": {"s0": [["eu", 1], ["uk", 1]], "s1": [["us", 1], ["eu", 2]]}, "default": "s2"},
        "cqu": {"strategy": "custom", "tables": {"dq8_cu": "k", "dq8_cuc": "k"}, "function": custom_shard},
    },
}


@dataclass(frozen=True)
class Grp:
    name: str
    parent: Any
    child: Any
    kc: tuple[str, ...]              # the key columns
    keys: tuple[tuple[Any, ...], ...]   # keys rows hold (as tuples)
    extra: tuple[tuple[Any, ...], ...]  # keys no row holds (yet)
    odd: tuple[tuple[Any, ...], ...]    # values of other types compared with the key

    def kv(self, key: tuple[Any, ...]) -> Any:
        """The key as shardkit takes it: a tuple for a composite key, else the value."""
        return key if len(self.kc) > 1 else key[0]


GROUPS = [
    Grp("ch", CH, CHC, ("a", "b"),
        tuple((a, b) for a in (0, 1, 2, 3, 7, 2**40) for b in ("x", "y", "X")) + ((-5, ""), (5, "x ")),
        ((100, "x"), (101, "y"), (3, "z")),
        (("5", "x"), (5.0, "x"), (1, 1))),
    Grp("cr", CR, CRC, ("a", "b"),
        ((-3, 0), (-1, 9), (0, 0), (0, -1), (5, 5), (9, 9), (10, 4), (10, 5), (10, 6), (15, 0),
         (19, 99), (20, -1), (20, 0), (25, 3), (100, 100)),
        ((1, 1), (12, 0), (30, 30), (-10, -10)),
        (("5", 5), (9.5, 1), (10, 4.5))),
    Grp("cl", CL, CLC, ("a", "b"),
        (("eu", 1), ("uk", 1), ("us", 1), ("eu", 2), ("ca", 1), ("eu", 3), ("us", 2), ("EU", 1),
         ("eu ", 1), ("", 0)),
        (("fr", 1), ("uk", 2), ("jp", 7)),
        (("eu", "1"), ("eu", 1.0), ("Eu", 1))),
    Grp("cu", CU, CUC, ("k",),
        tuple((k,) for k in (0, 1, 5, 9, 10, 11, 19, 20, 25, 29, 30, 45, -1, -30, 1000)),
        ((2,), (12,), (22,), (-2,), (99,)),
        (("5",), (5.0,), ("x",))),
]
GROUP_OF = {g.parent.__tablename__: g for g in GROUPS}
WRITTEN = [g.parent for g in GROUPS] + [Ref]


# ---------------------------------------------------------------------------
# The cluster and the one database
# ---------------------------------------------------------------------------


@dataclass
class Env(OracleEnv):
    next_rid: list[int] = field(default_factory=lambda: [50_000])
    select_rid: list[int] = field(default_factory=lambda: [1_000_000])   # INSERT ... SELECT's rids (minus 9000)
    far_rid: list[int] = field(default_factory=lambda: [100_000_000])   # INSERT ref SELECT FROM sharded's
    null_home: dict[tuple[str, int], str] = field(default_factory=dict)   # NULL-key rows' shards


def _rows(g: Grp, rng: random.Random, start: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    parents, children = [], []
    rid = start
    for i, key in enumerate(g.keys):
        kd = dict(zip(g.kc, key))
        for _ in range(1 + i % 2):
            rid += 1
            parents.append({"rid": rid, **kd, "v": rng.randrange(6), "t": rng.choice(["x", "y", None])})
        if i % 2 == 0:
            rid += 1
            children.append({"rid": rid, **kd, "w": rng.randrange(6)})
    for j in range(3):
        rid += 1
        parents.append({"rid": rid, **{c: None for c in g.kc}, "v": j, "t": "n"})
    return parents, children


def _ref_rows(rng: random.Random) -> list[dict[str, Any]]:
    ch, cu = GROUPS[0], GROUPS[3]
    out = []
    for i in range(24):
        a, b = rng.choice(ch.keys + ch.extra)
        out.append({"rid": 9000 + i, "k": rng.choice(cu.keys + cu.extra)[0], "a": a, "b": b,
                    "v": rng.randrange(6), "t": rng.choice(["x", "y", None]), "z": i % 3})
    return out


def _is_null_key(g: Grp, row: Any) -> bool:
    return any(getattr(row, c) is None for c in g.kc)


def _key_of(g: Grp, row: Any) -> Any:
    return g.kv(tuple(getattr(row, c) for c in g.kc))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    with oracle_env(shardkit_module_cluster_factory, Env, CONFIG, Base.metadata, "dq8_oracle") as e:
        cluster, oracle = e.cluster, e.oracle
        rng = random.Random(1)
        with oracle.begin() as c, e.Session() as s:
            for n, g in enumerate(GROUPS):
                parents, children = _rows(g, rng, 1000 * (n + 1))
                for model, rows in ((g.parent, parents), (g.child, children)):
                    c.execute(insert(model), rows)
                    keyed = [r for r in rows if r[g.kc[0]] is not None]
                    s.execute(insert(model), keyed)
                    for i, r in enumerate(r for r in rows if r[g.kc[0]] is None):
                        home = SHARDS[r["rid"] % 3]
                        with shardkit.scope(shard=home):
                            s.execute(insert(model), [r])
                        e.null_home[model.__tablename__, r["rid"]] = home
            refs = _ref_rows(rng)
            c.execute(insert(Ref), refs)
            s.execute(insert(Ref), refs)
            s.commit()
        for g in GROUPS:
            assert {cluster.shard_for(g.parent, g.kv(k)) for k in g.keys} == set(SHARDS), g.name
        yield e


def snapshot(env: Env) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    """Every written table's rows on every shard, and on the one database (shard "")."""
    out = {}
    for name, eng in [("", env.oracle)] + [(s, env.cluster.primary(s)) for s in SHARDS]:
        with eng.connect() as c:
            for m in WRITTEN:
                t = m.__table__
                out[name, t.name] = sorted_rows(c.execute(select(t).order_by(t.c.rid)))
    return out


def _rids_on(snap: dict[tuple[str, str], list[Any]], table: str, shards: tuple[str, ...]) -> list[int]:
    return [r[0] for s in shards for r in snap[s, table]]


# ---------------------------------------------------------------------------
# Statements
# ---------------------------------------------------------------------------


@dataclass
class Stmt:
    what: str
    target: Any                    # the model written
    stmt: Any
    params: Any = None
    orm: bool = False
    returning: bool = False
    executemany: bool = False
    preload: list[int] = field(default_factory=list)   # rids of the target loaded into the sessions first
    mode: str = "plain"            # plain | key | shard | named | bind
    arg: Any = None                # the scope's key, or the shard
    all_shards: bool = False
    must_refuse: str = ""          # README: shardkit refuses this statement (why)
    restrict: tuple[str, ...] | None = None   # decided when run: the shards it runs on by design
    null_home: str | None = None   # where a new row with a NULL key goes
    no_oracle: bool = False        # decided when run: no one database runs it as the shards do


class Gen(GenBase):
    same_shape_share = 0.25
    extra_below = 0.92
    max_new_rows = 4
    executemany_orm_returning = False

    def key_columns(self, g: Grp) -> tuple[str, ...]:
        return g.kc

    # -- WHERE over a sharded table ----------------------------------------
    def full_eq(self, g: Grp, T: Any, key: tuple[Any, ...], params: dict[str, Any] | None = None) -> Any:
        parts = [getattr(T, c) == (self.bind(params, v) if params is not None else v) for c, v in zip(g.kc, key)]
        self.rng.shuffle(parts)
        return and_(*parts)

    def leaf(self, g: Grp, T: Any, params: dict[str, Any]) -> tuple[Any, str]:
        rng = self.rng
        C = g.child if isinstance(T, type) else g.child.__table__.c
        R = Ref if isinstance(T, type) else Ref.__table__.c
        k0 = getattr(T, g.kc[0])
        comp = len(g.kc) > 1
        kind = rng.choice(["eq", "eq", "eq", "eq", "eq_bind", "eq_other", "part_eq", "part_in", "tuple_in",
                           "or_eq", "in", "ne", "lt", "between", "isnull", "v", "v", "t", "exists_child",
                           "exists_child_part", "in_child", "in_ref", "exists_ref", "scalar_ref", "eq_odd",
                           "eq_and_ref", "not_distinct"])
        if kind == "eq":
            key = self.key(g)
            return self.full_eq(g, T, key), f"key = {key!r}"
        if kind == "eq_bind":
            key = self.key(g)
            return self.full_eq(g, T, key, params), f"key = :p {key!r}"
        if kind == "eq_other":
            key = self.key(g)
            return and_(self.full_eq(g, T, key), T.v < rng.randrange(6)), f"key = {key!r} AND v < n"
        if kind == "eq_odd":
            key = rng.choice(g.odd)
            return self.full_eq(g, T, key), f"key = {key!r}"
        if kind == "eq_and_ref":
            key = self.key(g)
            n = rng.randrange(6)
            return and_(self.full_eq(g, T, key), T.v.in_(select(R.v).where(R.z == n % 3))), \
                f"key = {key!r} AND v IN (SELECT ref.v WHERE z = {n % 3})"
        if kind == "part_eq":
            key = self.key(g)
            return k0 == key[0], f"{g.kc[0]} = {key[0]!r}"
        if kind == "part_in":
            vs = [self.key(g)[0] for _ in range(rng.randint(1, 3))]
            return k0.in_(vs), f"{g.kc[0]} IN {vs!r}"
        if kind == "tuple_in" and comp:
            ks = [self.plain_key(g) for _ in range(rng.randint(1, 3))]
            return tuple_(*(getattr(T, c) for c in g.kc)).in_(ks), f"(a, b) IN {ks!r}"
        if kind == "or_eq":
            ks = [self.key(g) for _ in range(rng.randint(2, 3))]
            return or_(*(self.full_eq(g, T, k) for k in ks)), f"key = any of {ks!r}"
        if kind == "in" and not comp:
            ks = [self.key(g)[0] if self.vrng.random() > 0.1 else None for _ in range(rng.randint(0, 5))]
            return k0.in_(ks), f"k IN {ks!r}"
        if kind == "ne":
            key = self.key(g)
            return k0 != key[0], f"{g.kc[0]} != {key[0]!r}"
        if kind == "lt":
            key = self.key(g)
            if comp and rng.random() < 0.5:
                return tuple_(*(getattr(T, c) for c in g.kc)) < tuple_(*(literal(v) for v in key)), f"(a, b) < {key!r}"
            return k0 < key[0], f"{g.kc[0]} < {key[0]!r}"
        if kind == "between":
            x, y = self.key(g)[0], self.key(g)[0]
            return k0.between(x, y), f"{g.kc[0]} BETWEEN {x!r} AND {y!r}"
        if kind == "isnull":
            return k0.is_(None), f"{g.kc[0]} IS NULL"
        if kind == "not_distinct":
            key = self.key(g)
            return and_(*(getattr(T, c).is_not_distinct_from(v) for c, v in zip(g.kc, key))), \
                f"key IS NOT DISTINCT FROM {key!r}"
        if kind == "v":
            n = rng.randrange(6)
            return (T.v == n if rng.random() < 0.5 else T.v < n), f"v ~ {n}"
        if kind == "t":
            return T.t == "x", "t = 'x'"
        if kind == "exists_child":
            n = rng.randrange(6)
            return exists().where(*(getattr(C, c) == getattr(T, c) for c in g.kc), C.w > n), \
                f"EXISTS(child on the key AND w > {n})"
        if kind == "exists_child_part" and comp:
            n = rng.randrange(6)
            return exists().where(C.a == T.a, C.w > n), f"EXISTS(child on a alone AND w > {n})"
        if kind == "in_child":
            n = rng.randrange(6)
            cols = [getattr(C, c) for c in g.kc]
            lhs = tuple_(*(getattr(T, c) for c in g.kc)) if comp else k0
            return lhs.in_(select(*cols).where(C.w > n)), f"key IN (SELECT child key WHERE w > {n})"
        if kind == "in_ref":
            n = rng.randrange(6)
            if g.name == "cu":
                return T.k.in_(select(R.k).where(R.v > n)), f"k IN (SELECT ref.k WHERE v > {n})"
            if g.name == "ch":
                return tuple_(T.a, T.b).in_(select(R.a, R.b).where(R.v > n)), f"(a, b) IN (SELECT ref.a, ref.b WHERE v > {n})"
            return T.v.in_(select(R.v).where(R.t == "x")), "v IN (SELECT ref.v WHERE t = 'x')"
        if kind == "exists_ref":
            n = rng.randrange(6)
            return exists().where(R.v == T.v, R.z == n % 3), f"EXISTS(ref.v = v AND ref.z = {n % 3})"
        if kind == "scalar_ref":
            return T.v < select(func.max(R.z)).where(R.t == "x").scalar_subquery(), "v < (SELECT max(ref.z))"
        return self.leaf(g, T, params)

    def ref_where(self, R: Any, params: dict[str, Any]) -> tuple[Any, str]:
        rng = self.rng
        kind = rng.choice(["rid", "rid_in", "v", "t", "k", "or", "all", "in_ref", "rid_bind"])
        if kind == "rid":
            n = rng.randrange(9000, 9030)
            return R.rid == n, f"rid = {n}"
        if kind == "rid_bind":
            n = rng.randrange(9000, 9030)
            return R.rid == self.bind(params, n), f"rid = :p {n}"
        if kind == "rid_in":
            ns = [rng.randrange(9000, 9030) for _ in range(3)]
            return R.rid.in_(ns), f"rid IN {ns}"
        if kind == "v":
            n = rng.randrange(6)
            return R.v < n, f"v < {n}"
        if kind == "t":
            return R.t == "x", "t = 'x'"
        if kind == "k":
            k = self.plain_key(GROUPS[3])[0]
            return R.k == k, f"k = {k}"
        if kind == "or":
            n = rng.randrange(6)
            return or_(R.v == n, R.t.is_(None)), f"v = {n} OR t IS NULL"
        if kind == "in_ref":
            n = rng.randrange(3)
            R2 = Ref.__table__.alias("r2")
            return R.v.in_(select(R2.c.v).where(R2.c.z == n)), f"v IN (SELECT r2.v WHERE z = {n})"
        return R.rid > 0, "rid > 0"

    # -- statements ------------------------------------------------------
    def _statement(self) -> Stmt:
        kind = self.rng.choice(["update", "update", "update", "delete", "delete", "insert", "insert", "upsert",
                                "update_from", "update_from_ref", "insert_select", "em_update",
                                "ref_update", "ref_update", "ref_delete", "ref_insert", "ref_upsert",
                                "ref_from_sharded", "ref_insert_select"])
        g = self.rng.choice(GROUPS)
        self._mode(g)
        st = getattr(self, "_" + kind)(g)
        if kind != "insert_select":
            st.mode, st.arg = self.mode, self.arg
            st.what += f" [{st.mode} {st.arg!r}]"
        return st

    def _mode(self, g: Grp) -> None:
        """Run it plainly, inside a scope, or on a named shard."""
        r = self.rng.random()
        self.mode, self.arg = "plain", None
        if r < 0.55:
            return
        if r < 0.72:
            self.mode, self.arg = "key", g.kv(self.plain_key(g))
        elif r < 0.9:
            self.mode, self.arg = "shard", self.rng.choice(SHARDS)
        else:
            self.mode, self.arg = self.rng.choice(["named", "bind"]), self.rng.choice(SHARDS)

    def _named_rows(self, g: Grp, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """On a named shard an INSERT writes its rows there, and one with a key another shard
        owns is refused (tested in test_named_shard_writes): keep the rows that
        shard owns, or without a key, whose outcome the one database can mirror."""
        if self.mode not in ("named", "bind"):
            return rows
        cl = self.env.cluster

        def mine(r: dict[str, Any]) -> bool:
            key = tuple(r[c] for c in g.kc)
            if any(v is None for v in key):
                return True
            try:
                return cl.shard_for(g.parent, g.kv(key)) == self.arg
            except shardkit.ShardkitError:
                return False
        kept = [r for r in rows if mine(r)]
        if not kept:
            self.env.next_rid[0] += 1
            kept = [{**rows[0], "rid": self.env.next_rid[0], **{c: None for c in g.kc}}]
        return kept

    def _stmt(self, what: str, g: Grp, stmt: Any, params: Any = None, orm: bool = False, returning: bool = False,
              executemany: bool = False, preload: list[int] | None = None, all_shards: bool = False) -> Stmt:
        return Stmt(what, g.parent, stmt, params, orm, returning, executemany, preload or [], all_shards=all_shards)

    def _own_key(self, g: Grp) -> tuple[Any, ...]:
        """A key to SET: on a named shard one of that shard (a key of another shard is
        refused there: see test_a_named_shard_refuses_an_update_moving_the_key_to_another_shard)."""
        key = self.plain_key(g)
        if self.mode in ("named", "bind"):
            mine = [k for k in g.keys + g.extra if self.env.cluster.shard_for(g.parent, g.kv(k)) == self.arg]
            key = self.vrng.choice(mine)
        return key

    def _setvalues(self, g: Grp, T: Any) -> tuple[dict[str, Any], str]:
        r = self.rng.random()
        if r < 0.15:
            key = self._own_key(g)
            return {**dict(zip(g.kc, key)), "v": T.v + 1}, f"SET key={key!r}, v=v+1"
        if r < 0.2 and len(g.kc) > 1 and self.mode not in ("named", "bind"):
            key = self.plain_key(g)
            return {g.kc[1]: key[1]}, f"SET {g.kc[1]}={key[1]!r} (part of the key)"
        if r < 0.25:
            return {c: getattr(T, c) for c in g.kc}, "SET key=key"
        return self._set_other(T, r)

    def _preload(self, g: Grp | None) -> list[int]:
        if g is None:
            return self.rng.sample(range(9000, 9030), 6)
        base = 1000 * (GROUPS.index(g) + 1)
        return self.rng.sample(range(base + 1, base + 30), 6)

    def _update_from(self, g: Grp) -> Stmt:
        """UPDATE ... FROM / DELETE ... USING the colocated child (on the whole key, or on a part)."""
        orm = self.rng.random() < 0.5
        T = g.parent if orm else g.parent.__table__.c
        C = g.child if orm else g.child.__table__.c
        params: dict[str, Any] = {}
        w, d = self.where(g, T, 1, params)
        n = self.rng.randrange(6)
        part = len(g.kc) > 1 and self.rng.random() < 0.25
        on = [getattr(T, c) == getattr(C, c) for c in (g.kc[:1] if part else g.kc)]
        j = "child on a alone" if part else "child on the key"
        if self.rng.random() < 0.5:
            stmt = update(g.parent if orm else g.parent.__table__).where(*on, C.w > n, w).values(v=T.v + 7)
            d = f"UPDATE ... FROM {j} AND w > {n} AND {d}"
        else:
            stmt = delete(g.parent if orm else g.parent.__table__).where(*on, C.w > n, w)
            d = f"DELETE ... USING {j} AND w > {n} AND {d}"
        stmt, od, al = self._options(stmt, orm and self.rng.random() < 0.5)
        return Stmt(f"{'ORM' if orm else 'Core'} {g.name} {d}{od}", g.parent, stmt, params or None, orm,
                    all_shards=al)

    def _update_from_ref(self, g: Grp) -> Stmt:
        """UPDATE sharded ... FROM the reference table / DELETE sharded ... USING it."""
        orm = self.rng.random() < 0.5
        T = g.parent if orm else g.parent.__table__.c
        R = Ref if orm else Ref.__table__.c
        params: dict[str, Any] = {}
        w, d = self.where(g, T, 1, params)
        r = self.rng.random()
        if g.name == "cu" and r < 0.5:
            on, j = [T.k == R.k], "ref.k = k"
        elif g.name == "ch" and r < 0.5:
            on, j = [T.a == R.a, T.b == R.b], "ref.(a, b) = (a, b)"
        else:
            on, j = [T.v == R.v, R.z == self.rng.randrange(3)], "ref.v = v AND ref.z = n"
        ret = self.rng.random() < 0.3
        if self.rng.random() < 0.6:
            # (SET from the ref's columns would be nondeterministic when several ref rows
            # match one row: PostgreSQL updates it from any one of them.)
            stmt = update(g.parent if orm else g.parent.__table__).where(*on, w).values(v=T.v + 1, t="rf")
            d = f"UPDATE ... FROM ref ON {j} AND {d}"
        else:
            stmt = delete(g.parent if orm else g.parent.__table__).where(*on, w)
            d = f"DELETE ... USING ref ON {j} AND {d}"
        if ret:
            stmt = stmt.returning(T.rid, T.v)
        stmt, od, al = self._options(stmt, orm and self.rng.random() < 0.5)
        return Stmt(f"{'ORM' if orm else 'Core'} {g.name} {d}{od}{' RETURNING' if ret else ''}", g.parent, stmt,
                    params or None, orm, ret, all_shards=al)

    def _em_update(self, g: Grp) -> Stmt:
        table = g.parent.__table__
        keys = [self.key(g) for _ in range(self.rng.randint(1, 4))]
        params = [{**{f"b{c}": v for c, v in zip(g.kc, k)}, "nv": self.vrng.randrange(200, 210)} for k in keys]
        stmt = update(table).where(*(table.c[c] == bindparam(f"b{c}") for c in g.kc)).values(v=bindparam("nv"))
        stmt, od, al = self._options(stmt, False)
        return Stmt(f"Core executemany UPDATE {g.name} SET v=:nv WHERE key = :bkey {params!r}{od}", g.parent,
                    stmt, params, executemany=True, all_shards=al)

    def _new_row(self, g: Grp, rid: int) -> dict[str, Any]:
        r = self.rng.random()
        key = self.plain_key(g) if r < 0.88 else self.vrng.choice(g.odd) if r < 0.94 else (None,) * len(g.kc)
        return {"rid": rid, **dict(zip(g.kc, key)), "v": self.vrng.randrange(90, 99), "t": "ins"}

    def _insert_rows(self, g: Grp, existing: bool) -> list[dict[str, Any]]:
        return self._named_rows(g, self._new_rows(g, existing))

    def _upsert(self, g: Grp) -> Stmt:
        rows = self._insert_rows(g, existing=True)
        orm = self.rng.random() < 0.3
        table = g.parent.__table__
        ins = postgresql.insert(g.parent if orm else table)

        def set_key() -> tuple[Any, str]:
            key = self._own_key(g)
            return (ins.on_conflict_do_update(index_elements=["rid"], set_={**dict(zip(g.kc, key)), "v": 1}),
                    f"DO UPDATE key={key!r}")
        stmt, d = self._on_conflict(ins, set_key)
        ret = self.rng.random() < 0.4 and not orm
        many = self.rng.random() < 0.6
        if ret:
            stmt = stmt.returning(table.c.rid, table.c.v, sort_by_parameter_order=many and self.rng.random() < 0.5)
        if many:
            params = rows
        else:
            stmt, params = stmt.values(rows), None
        stmt, od, al = self._options(stmt, False)
        return Stmt(f"{'ORM' if orm else 'Core'} UPSERT {g.name} {d} {'many' if many else 'values'} {rows!r}{od}"
                    f"{' RETURNING' if ret else ''}", g.parent, stmt, params, orm, ret, executemany=many,
                    all_shards=al)

    def _insert_select(self, g: Grp) -> Stmt:
        """INSERT INTO sharded SELECT ... FROM the reference table: refused unless a shard is
        named (then it runs there: here its rows are ones that shard owns)."""
        R = Ref.__table__
        shard = self.rng.choice(SHARDS)
        with self.env.oracle.connect() as c:
            refs = c.execute(select(R).where(R.c.rid < 9100).order_by(R.c.rid)).all()
        mine = [r.rid for r in refs if g.name == "cu" and r.k is not None and custom_shard(r.k) == shard
                or g.name == "ch" and r.a is not None and r.b is not None
                and self.env.cluster.shard_for(g.parent, (r.a, r.b)) == shard]
        off = self.env.select_rid[0] - 9000
        self.env.select_rid[0] += 100
        cols = ["rid", *g.kc, "v", "t"]
        if g.name == "cu":
            sel = select(R.c.rid + off, R.c.k, R.c.v, literal("is"))
        elif g.name == "ch":
            sel = select(R.c.rid + off, R.c.a, R.c.b, R.c.v, literal("is"))
        else:   # keys of the group's own type, from the reference rows' numbers
            sel = select(R.c.rid + off, *([literal(None, Text), literal(None, Integer)]), R.c.v, literal("is"))
            mine = [r.rid for r in refs][:3]
        rids = self.rng.sample(mine, min(len(mine), self.rng.randint(1, 3))) if mine else []
        stmt = insert(g.parent.__table__).from_select(cols, sel.where(R.c.rid.in_(rids)))
        st = Stmt(f"Core INSERT {g.name} SELECT FROM ref WHERE rid IN {rids} (rows of {shard})", g.parent, stmt)
        r = self.rng.random()
        if r < 0.4:
            st.mode, st.arg = "shard", shard
        elif r < 0.6:
            st.mode, st.arg = "named", shard
        else:
            st.must_refuse = "INSERT ... SELECT into a sharded table"
            if r < 0.8:
                st.mode, st.arg = "key", g.kv(self.plain_key(g))
        st.what += f" [{st.mode} {st.arg!r}]"
        return st

    # -- the reference table -------------------------------------------------
    def _ref_update(self, g: Grp) -> Stmt:
        orm = self.rng.random() < 0.5
        R = Ref if orm else Ref.__table__.c
        params: dict[str, Any] = {}
        w, d = self.ref_where(R, params)
        r = self.rng.random()
        if r < 0.5:
            values, sd = {"v": R.v + 1}, "SET v=v+1"
        elif r < 0.8:
            n = self.rng.randrange(50)
            values, sd = {"v": n, "t": "u", "z": R.z + 1}, f"SET v={n}, t='u', z=z+1"
        else:
            k = self.plain_key(GROUPS[3])[0]
            values, sd = {"k": k}, f"SET k={k}"
        stmt = update(Ref if orm else Ref.__table__).where(w).values(**values)
        ret = self.rng.random() < 0.4
        if ret:
            stmt = stmt.returning(R.rid, R.v, R.k)
        stmt, od, al = self._options(stmt, orm)
        return Stmt(f"{'ORM' if orm else 'Core'} UPDATE ref {sd} WHERE {d}{od}{' RETURNING' if ret else ''}",
                    Ref, stmt, params or None, orm, ret, preload=self._preload(None) if orm else [], all_shards=al)

    def _ref_delete(self, g: Grp) -> Stmt:
        orm = self.rng.random() < 0.5
        R = Ref if orm else Ref.__table__.c
        params: dict[str, Any] = {}
        w, d = self.ref_where(R, params)
        if d == "rid > 0":
            w, d = R.rid == 9000 + self.rng.randrange(30), "rid = n"
        stmt = delete(Ref if orm else Ref.__table__).where(w)
        ret = self.rng.random() < 0.4
        if ret:
            stmt = stmt.returning(R.rid, R.v)
        stmt, od, al = self._options(stmt, orm)
        return Stmt(f"{'ORM' if orm else 'Core'} DELETE ref WHERE {d}{od}{' RETURNING' if ret else ''}",
                    Ref, stmt, params or None, orm, ret, preload=self._preload(None) if orm else [], all_shards=al)

    def _ref_rows(self, existing: bool) -> list[dict[str, Any]]:
        rows = []
        with_z = self.rng.random() < 0.7
        for _ in range(self.rng.randint(1, 4)):
            if existing and self.rng.random() < 0.5:
                rid = 9000 + self.vrng.randrange(30)
            else:
                self.env.next_rid[0] += 1
                rid = self.env.next_rid[0]
            if any(r["rid"] == rid for r in rows):
                continue
            a, b = self.plain_key(GROUPS[0])
            row = {"rid": rid, "k": self.plain_key(GROUPS[3])[0], "a": a, "b": b,
                   "v": self.vrng.randrange(6), "t": "ri"}
            if with_z:
                row["z"] = self.vrng.randrange(3)
            rows.append(row)
        return rows

    def _ref_insert(self, g: Grp) -> Stmt:
        rows = self._ref_rows(existing=self.rng.random() < 0.1)
        orm = self.rng.random() < 0.5
        shape = self.rng.choice(["values", "many", "one"])
        R = Ref if orm else Ref.__table__.c
        target = Ref if orm else Ref.__table__
        ret = self.rng.random() < 0.4 and not (orm and shape == "many")
        if shape == "one":
            rows = rows[:1]
            stmt, params = insert(target).values(**rows[0]), None
        elif shape == "values":
            stmt, params = insert(target).values(rows), None
        else:
            stmt, params = insert(target), rows
        if ret:
            stmt = stmt.returning(R.rid, R.v, R.z)
        stmt, od, al = self._options(stmt, False)
        return Stmt(f"{'ORM' if orm else 'Core'} INSERT ref {shape} {rows!r}{od}{' RETURNING' if ret else ''}",
                    Ref, stmt, params, orm, ret, executemany=shape == "many", all_shards=al)

    def _ref_upsert(self, g: Grp) -> Stmt:
        rows = self._ref_rows(existing=True)
        orm = self.rng.random() < 0.3
        ins = postgresql.insert(Ref if orm else Ref.__table__)
        stmt, d = self._on_conflict(ins, lambda: (
            ins.on_conflict_do_update(index_elements=["rid"], set_={"z": Ref.__table__.c.z + 1},
                                      where=Ref.__table__.c.v < 3), "DO UPDATE z=z+1 WHERE v < 3"))
        ret = self.rng.random() < 0.4 and not orm
        many = self.rng.random() < 0.5
        if ret:
            stmt = stmt.returning(Ref.__table__.c.rid, Ref.__table__.c.v, Ref.__table__.c.z)
        if many:
            params = rows
        else:
            stmt, params = stmt.values(rows), None
        stmt, od, al = self._options(stmt, False)
        return Stmt(f"{'ORM' if orm else 'Core'} UPSERT ref {d} {'many' if many else 'values'} {rows!r}{od}"
                    f"{' RETURNING' if ret else ''}", Ref, stmt, params, orm, ret, executemany=many,
                    all_shards=al)

    def _ref_from_sharded(self, g: Grp) -> Stmt:
        """A write of the reference table that reads a sharded table: refused."""
        R = Ref.__table__
        T = g.parent.__table__
        r = self.rng.random()
        if r < 0.35:
            stmt = update(R).where(R.c.v == T.c.v, T.c.t == "x").values(z=R.c.z + 1)
            d = "UPDATE ref FROM sharded ON v"
        elif r < 0.7:
            stmt = delete(R).where(R.c.v.in_(select(T.c.v).where(T.c.t == "y")))
            d = "DELETE ref WHERE v IN (SELECT sharded.v)"
        else:
            self.env.far_rid[0] += 2_000_000
            stmt = insert(R).from_select(["rid", "v", "t"], select(T.c.rid + self.env.far_rid[0], T.c.v, T.c.t))
            d = "INSERT ref SELECT FROM sharded"
        stmt, od, al = self._options(stmt, False)
        return Stmt(f"Core {d} ({g.name}){od}", Ref, stmt, must_refuse="a reference write reading a sharded "
                    "table", all_shards=al)

    def _ref_insert_select(self, g: Grp) -> Stmt:
        """INSERT INTO ref SELECT ... FROM ref (every copy computes the same rows)."""
        R = Ref.__table__
        off = self.env.select_rid[0] - 9000
        self.env.select_rid[0] += 100
        n = self.rng.randrange(6)
        stmt = insert(R).from_select(["rid", "k", "a", "b", "v", "t", "z"],
                                     select(R.c.rid + off, R.c.k, R.c.a, R.c.b, R.c.v, literal("rs"), R.c.z)
                                     .where(R.c.v == n, R.c.rid < 10_000))
        ret = self.rng.random() < 0.4
        if ret:
            stmt = stmt.returning(R.c.rid, R.c.v)
        stmt, od, al = self._options(stmt, False)
        return Stmt(f"Core INSERT ref SELECT FROM ref WHERE v = {n}{od}{' RETURNING' if ret else ''}", Ref, stmt,
                    returning=ret, all_shards=al)


# ---------------------------------------------------------------------------
# Running one statement on both sides (dml_oracle)
# ---------------------------------------------------------------------------


@dataclass
class Tally(OracleTally):
    no_oracle: int = 0
    restricted: int = 0     # of the same: run on part of the shards by design (scope, named shard)
    by_mode: Counter = field(default_factory=Counter)
    width: int = 100        # (refusals counted by the first 100 characters of their error)


def _context(st: Stmt) -> Any:
    if st.mode == "key":
        return shardkit.scope(key=st.arg)
    if st.mode == "shard":
        return shardkit.scope(shard=st.arg)
    return contextlib.nullcontext()


def _run(s: Session, st: Stmt, stmt: Any, sharded: bool) -> tuple[Any, Any, Any]:
    preload(s, st.target, st.preload)
    kw: dict[str, Any] = {}
    if sharded and st.mode == "named":
        stmt = stmt.execution_options(shardkit_shard=st.arg)
    if sharded and st.mode == "bind":
        kw["bind_arguments"] = {"shard_id": st.arg}
    with _context(st) if sharded else contextlib.nullcontext():
        rc, rows = returned(s.execute(stmt, st.params, **kw), st.returning)
    return rc, rows, session_view(s, st.target, st.preload)


def _expected_shards(env: Env, st: Stmt) -> tuple[str, ...] | None:
    """The shards an UPDATE/DELETE of a sharded table runs on by design, when not every
    shard its WHERE needs (README "Routing rules", scope()): None for "where its WHERE says"."""
    if st.target is Ref or isinstance(st.stmt, type(insert(Ref))):
        return None
    if st.mode in ("shard", "named", "bind"):
        try:
            env.cluster.explain(st.stmt, st.params, all_shards=True)
        except shardkit.ScatterRefused:
            # Not colocated on the key (refused outside): on the named shard it reads that
            # shard's rows of the other table, which no one database holds alone.
            st.no_oracle = True
        except shardkit.ShardkitError:
            pass
        return (st.arg,)
    if st.mode == "key" and not st.all_shards:
        try:
            route = env.cluster.explain(st.stmt, st.params, all_shards=True)
        except shardkit.ShardkitError:
            route = None
        if route is None or not route.keys:
            return (env.cluster.shard_for(st.target, st.arg),)
    return None


def _run_one(env: Env, st: Stmt, tally: Tally) -> None:
    tally.by_mode[st.mode] += 1
    tname = st.target.__tablename__
    is_ref = st.target is Ref
    is_insert = isinstance(st.stmt, type(insert(Ref)))
    snap0 = snapshot(env)
    st.restrict = _expected_shards(env, st)
    if is_ref and st.mode in ("named", "bind") and st.must_refuse:
        # A reference write reading a sharded table, on one named shard: over its rows.
        st.no_oracle, st.restrict = True, (st.arg,)
    if st.mode in ("shard", "named", "bind") and is_insert and not is_ref:
        st.null_home = st.arg
    ostmt = st.stmt
    if st.restrict is not None and not st.no_oracle:
        rids = _rids_on(snap0, tname, st.restrict)
        # (An executemany takes no expanding IN: = ANY(array), a plain parameter.)
        ostmt = ostmt.where(st.target.__table__.c.rid == any_(literal(rids, postgresql.ARRAY(Integer)))
                            if st.executemany else st.target.rid.in_(rids))

    def on_oracle(so: Session) -> Any:
        want = _run(so, st, ostmt, False)
        so.flush()
        return want

    both = run_both(env, on_oracle, lambda ss: _run(ss, st, st.stmt, True))
    hits = both.hits
    snap1 = snapshot(env)
    shards_changed = {s for s in SHARDS for m in WRITTEN if snap0[s, m.__tablename__] != snap1[s, m.__tablename__]}
    if st.no_oracle and both.sharded_error is None:
        problems: list[str] = []
        tally.no_oracle += 1
        others = {s for s in shards_changed if s not in st.restrict}
        if others or {s for (s, _w) in hits} - set(st.restrict):
            problems.append(f"on {st.restrict} alone by design, changed {sorted(shards_changed)}")
        _misplaced(env, st, snap1, problems)
        _oracle_from_shards(env)
        if is_ref:
            _resync(env)   # (every copy the named shard's again)
        if problems:
            tally.mismatch(st, problems)
        return
    if tally.judge_errors(st.what, both, f"shards {sorted(shards_changed)}" if shards_changed else ""):
        return
    problems = []
    if st.must_refuse and not (st.mode in ("shard", "named", "bind") and "sharded table" in st.must_refuse):
        problems.append(f"ran; README: {st.must_refuse} is refused")
    problems += result_problems(both.want, both.got)
    named_ref = is_ref and st.mode in ("named", "bind")
    for m in WRITTEN:
        t = m.__tablename__
        want_rows = snap1["", t]
        if m is Ref:
            for s in SHARDS:
                if named_ref and st.must_refuse and s == st.arg:
                    continue   # (computed over that shard's rows: no one database has them)
                expect = snap0[s, t] if named_ref and s != st.arg else want_rows
                if snap1[s, t] != expect:
                    problems.append(f"ref copy on {s}: {rows_diff(expect, snap1[s, t])}")
            continue
        got_rows = sorted_rows(r for s in SHARDS for r in snap1[s, t])
        if got_rows != want_rows:
            problems.append(f"{t} contents {rows_diff(want_rows, got_rows)}")
    _misplaced(env, st, snap1, problems)
    if st.restrict is not None:
        others = {s for (s, _w) in hits if s not in st.restrict}
        if others:
            problems.append(f"wrote on {sorted(others)}, by design only on {st.restrict}")
    if named_ref and {s for (s, _w) in hits} - {st.arg}:
        problems.append(f"reference write on named shard {st.arg} ran on {sorted({s for (s, _w) in hits})}")
    if not st.executemany:
        problems += ran_more_than_once(hits)
    if named_ref:
        _resync(env)   # (the other copies are the one database's again)
    if tally.judged(st, problems, snap1 != snap0):
        tally.restricted += st.restrict is not None


def _misplaced(env: Env, st: Stmt, snap1: dict[tuple[str, str], list[Any]], problems: list[str]) -> None:
    """Every sharded row on the shard its key maps to (a NULL-key row on its recorded one)."""
    for m in WRITTEN[:-1]:
        t = m.__tablename__
        g = GROUP_OF[t]
        cols = [c.key for c in m.__table__.columns]
        for s in SHARDS:
            for row in snap1[s, t]:
                r = dict(zip(cols, row))
                if any(r[c] is None for c in g.kc):
                    home = env.null_home.get((t, r["rid"]))
                    if home is None:
                        if st.null_home is None:
                            problems.append(f"{t} row {row} with a NULL key written on {s} (no shard named)")
                        elif s != st.null_home:
                            problems.append(f"{t} row {row} with a NULL key on {s}, not on the named {st.null_home}")
                        env.null_home[t, r["rid"]] = s
                    elif home != s:
                        problems.append(f"{t} row {row} with a NULL key moved from {home} to {s}")
                elif env.cluster.shard_for(t, g.kv(tuple(r[c] for c in g.kc))) != s:
                    problems.append(f"misplaced: {t} {row} on {s}")


def _oracle_from_shards(env: Env) -> None:
    """Make the one database hold the shards' rows (after a statement no one database can run)."""
    with env.oracle.begin() as c:
        for m in WRITTEN:
            t = m.__table__
            rows = []
            for s in SHARDS if m is not Ref else SHARDS[:1]:
                with env.cluster.primary(s).connect() as sc:
                    rows += [dict(r._mapping) for r in sc.execute(select(t))]
            c.execute(delete(t))
            if rows:
                c.execute(insert(t), rows)


def _resync(env: Env) -> None:
    """Make the shards hold the one database's rows again (each on its key's shard, NULL-key
    rows on their recorded shards, the reference table everywhere)."""
    with env.oracle.connect() as c:
        data = {m: [dict(r._mapping) for r in c.execute(select(m.__table__))] for m in WRITTEN}
    for s in SHARDS:
        with env.cluster.primary(s).begin() as c:
            for m, rows in data.items():
                t = m.__table__
                c.execute(delete(t))
                if m is Ref:
                    mine = rows
                else:
                    g = GROUP_OF[t.name]
                    mine = [r for r in rows if (
                        env.null_home.get((t.name, r["rid"]), SHARDS[r["rid"] % 3]) == s
                        if any(r[k] is None for k in g.kc)
                        else env.cluster.shard_for(t.name, g.kv(tuple(r[k] for k in g.kc))) == s)]
                if mine:
                    c.execute(insert(t), mine)


def test_writes_change_what_one_database_changes(env):
    gen = Gen(env, random.Random(SEED))
    tally = Tally()
    tally.run(STATEMENTS, gen.statement, lambda st: _run_one(env, st, tally), lambda: _resync(env), LOG)
    report = tally.report(f"{tally.ran} statements ({dict(tally.by_mode)}): {tally.same} the same "
                          f"({tally.changed} changing rows), {tally.both_failed} failed on both, "
                          f"{tally.no_oracle} checked on their shard alone (no one-database equivalent), "
                          f"{sum(tally.refused.values())} refused by shardkit, {len(tally.mismatches)} mismatches; "
                          f"{tally.restricted} of the same ran on part of the shards by design")
    print(report)
    assert tally.changed > STATEMENTS // 5, report
    assert not tally.mismatches, report


# ---------------------------------------------------------------------------
# What the fuzzer found, minimised
# ---------------------------------------------------------------------------


def _fresh_rid(env: Env) -> int:
    env.next_rid[0] += 1
    return env.next_rid[0]


def _everywhere(env: Env, model: Any, rids: list[int]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of ``rids`` on each shard's primary."""
    t = model.__table__
    out = {}
    for sh in SHARDS:
        with env.cluster.primary(sh).connect() as c:
            out[sh] = sorted_rows(c.execute(select(t).where(t.c.rid.in_(rids))))
    return out


@pytest.mark.parametrize("shape", ["executemany", "values", "one row"])
def test_insert_inside_a_shard_scope_with_a_key_it_cannot_place_is_refused(env, shape):
    """Inside ``scope(shard=S)`` an INSERT writes each keyed row where its key belongs and
    only key-less rows on S (README "Routing rules").  A row whose key shardkit cannot place
    (here ``1.0``, a float for an integer key part, refused with ``ShardKeyError`` outside a
    scope) made the router's ``ShardKeyError`` be taken for "no routable key": the WHOLE
    statement ran on S, every row of it, also rows whose valid keys another shard owns
    (from the fuzzer: an executemany upsert and a multi-row VALUES into the composite list
    group; a row ``('uk', 1)`` of s0 written on s2, where no read by key finds it).  Now it is
    refused as outside a scope, nothing written."""
    rids = [_fresh_rid(env) for _ in range(2)]
    good = {"rid": rids[0], "a": "uk", "b": 1, "v": 1, "t": "sc"}    # ('uk', 1) -> s0
    bad = {"rid": rids[1], "a": "eu", "b": 1.0, "v": 2, "t": "sc"}   # not an int
    assert env.cluster.shard_for(CL, ("uk", 1)) == "s0"
    with env.Session() as s:
        with pytest.raises(shardkit.ShardKeyError):
            s.execute(insert(CL.__table__), [good, bad])      # outside a scope: refused
        s.rollback()
    with env.Session() as s, shardkit.scope(shard="s2"):
        with pytest.raises(shardkit.ShardKeyError, match="float"):
            if shape == "executemany":
                s.execute(insert(CL.__table__), [good, bad])
            elif shape == "values":
                s.execute(insert(CL).values([good, bad]))
            else:
                s.execute(insert(CU).values(rid=rids[0], k=15.0, v=1, t="sc"))   # 15 -> s1
            s.commit()
    assert _everywhere(env, CL, rids) == {sh: [] for sh in SHARDS}
    assert _everywhere(env, CU, rids) == {sh: [] for sh in SHARDS}
    # Key-less rows still go to the scope's shard, keyed ones to their owners.
    with env.Session() as s, shardkit.scope(shard="s2"):
        s.execute(insert(CL.__table__), [good, {**bad, "a": None, "b": None}])
        s.commit()
    got = _everywhere(env, CL, rids)
    assert [r[0] for r in got["s0"]] == [rids[0]] and [r[0] for r in got["s2"]] == [rids[1]], got
    env.null_home[CL.__tablename__, rids[1]] = "s2"
    with env.oracle.begin() as c:
        c.execute(insert(CL.__table__), [good, {**bad, "a": None, "b": None}])


@pytest.mark.parametrize("how", ["shardkit_shard", "bind_arguments", "upsert"])
def test_a_named_shard_refuses_an_update_moving_the_key_to_another_shard(env, how):
    rid = _fresh_rid(env)
    assert custom_shard(0) == "s0" and custom_shard(10) == "s1"
    with env.Session() as s:
        s.execute(insert(CU), [{"rid": rid, "k": 0, "v": 1, "t": "nm"}])
        s.commit()
    with env.oracle.begin() as c:
        c.execute(insert(CU), [{"rid": rid, "k": 0, "v": 1, "t": "nm"}])
    stmt = update(CU).where(CU.rid == rid).values(k=10)
    kw: dict[str, Any] = {}
    if how == "shardkit_shard":
        stmt = stmt.execution_options(shardkit_shard="s0")
    elif how == "bind_arguments":
        kw["bind_arguments"] = {"shard_id": "s0"}
    else:
        ins = postgresql.insert(CU.__table__)
        stmt = ins.on_conflict_do_update(index_elements=["rid"], set_={"k": 10}).values(
            rid=rid, k=0, v=1, t="nm").execution_options(shardkit_shard="s0")
    try:
        with env.Session() as s:
            with pytest.raises(shardkit.CrossShardWriteError):
                s.execute(stmt, **kw)
                s.commit()
        assert _everywhere(env, CU, [rid])["s0"] == [(rid, 0, 1, "nm")]
    finally:
        _resync(env)
