"""Key routing as a demanding SQLAlchemy user checks it: every statement's rows (and a
write's rowcount and effect) compared with the same statement on ONE plain database
holding every row (``kr6f_oracle``, on shard s0's server), and the shards it touched
counted: an equality or IN may touch only the shards that can hold its keys.

WHERE shapes: empty / duplicate / NULL IN lists, NOT IN, OR and AND of keys, a key
ANDed with an OR of other columns, reversed BETWEEN, IS NULL, ``tuple_().in_()`` of a
composite key, bind parameters reused with other values, expanding IN, a literal
column; keys of hash (bigint, text, uuid, composite), range (int, timestamptz, date)
and list (with a default) groups; UPDATE/DELETE of the same shapes; ``session.get``
with a composite primary key; ``cluster.explain()`` and ``shardkit route``.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import one_database, statements_per_shard, truncate_everywhere
from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Integer,
    Text,
    Uuid,
    and_,
    bindparam,
    delete,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc


class Base(DeclarativeBase):
    pass


class H(Base):
    __tablename__ = "kr6f_h"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    other = mapped_column(Integer)
    name = mapped_column(Text)


class HT(Base):
    __tablename__ = "kr6f_ht"
    code = mapped_column(Text, primary_key=True)
    v = mapped_column(Integer)


class HU(Base):
    __tablename__ = "kr6f_hu"
    id = mapped_column(Uuid, primary_key=True)
    v = mapped_column(Integer)


class C(Base):
    __tablename__ = "kr6f_c"
    a = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    b = mapped_column(Text, primary_key=True)
    v = mapped_column(Integer)


class R(Base):
    __tablename__ = "kr6f_r"
    n = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v = mapped_column(Integer)


class RT(Base):
    __tablename__ = "kr6f_rt"
    at = mapped_column(DateTime(timezone=True), primary_key=True)
    v = mapped_column(Integer)


class RD(Base):
    __tablename__ = "kr6f_rd"
    d = mapped_column(Date, primary_key=True)
    v = mapped_column(Integer)


class L(Base):
    __tablename__ = "kr6f_l"
    region = mapped_column(Text, primary_key=True)
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v = mapped_column(Integer)


T1 = dt.datetime(2024, 1, 1, tzinfo=UTC)
T2 = dt.datetime(2024, 7, 1, tzinfo=UTC)
D1, D2 = dt.date(2024, 1, 1), dt.date(2024, 7, 1)

GROUPS = {
    "groups": {
        "kr6f_h": {"strategy": "hash", "tables": {"kr6f_h": "id"}},
        "kr6f_ht": {"strategy": "hash", "tables": {"kr6f_ht": "code"}},
        "kr6f_hu": {"strategy": "hash", "tables": {"kr6f_hu": "id"}},
        "kr6f_c": {"strategy": "hash", "tables": {"kr6f_c": ["a", "b"]}},
        "kr6f_r": {"strategy": "range", "tables": {"kr6f_r": "n"}, "ranges": [
            {"to": 100, "shard": "s0"}, {"from": 100, "to": 200, "shard": "s1"},
            {"from": 200, "shard": "s2"}]},
        "kr6f_rt": {"strategy": "range", "tables": {"kr6f_rt": "at"}, "ranges": [
            {"to": T1, "shard": "s0"}, {"from": T1, "to": T2, "shard": "s1"},
            {"from": T2, "shard": "s2"}]},
        "kr6f_rd": {"strategy": "range", "tables": {"kr6f_rd": "d"}, "ranges": [
            {"to": D1, "shard": "s0"}, {"from": D1, "to": D2, "shard": "s1"},
            {"from": D2, "shard": "s2"}]},
        "kr6f_l": {"strategy": "list", "tables": {"kr6f_l": "region"},
                   "values": {"s0": ["eu"], "s1": ["us"]}, "default": "s2"},
    },
}

UUIDS = [uuid.UUID(int=(i * 0x9E3779B97F4A7C15) % (1 << 128)) for i in range(1, 13)]
ROWS: dict[Any, list[dict[str, Any]]] = {
    H: [{"id": i, "other": i % 4, "name": f"n{i % 5}"} for i in range(1, 31)],
    HT: [{"code": c, "v": i} for i, c in enumerate(["1", "2", "01", "10", "a", "b", "x y", "é", "7", "42"])],
    HU: [{"id": u, "v": i} for i, u in enumerate(UUIDS)],
    C: [{"a": a, "b": b, "v": a * 10 + i} for a in range(1, 7) for i, b in enumerate(["x", "y", "z"])],
    R: [{"n": n, "v": n % 7} for n in (-5, 0, 1, 50, 99, 100, 101, 150, 199, 200, 201, 500)],
    RT: [{"at": t, "v": i} for i, t in enumerate([
        T1 - dt.timedelta(days=1), T1 - dt.timedelta(microseconds=1), T1,
        T1 + dt.timedelta(hours=5), T2 - dt.timedelta(microseconds=1), T2, T2 + dt.timedelta(days=3)])],
    RD: [{"d": d, "v": i} for i, d in enumerate([
        D1 - dt.timedelta(days=1), D1, D1 + dt.timedelta(days=1), D2 - dt.timedelta(days=1), D2,
        D2 + dt.timedelta(days=9)])],
    L: [{"region": r, "id": i, "v": i} for i, r in enumerate(["eu", "eu", "us", "us", "br", "jp", "br"])],
}


@dataclass
class Env:
    cluster: shardkit.Cluster
    oracle: Engine
    config: dict[str, Any]

    def Session(self) -> Any:
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster)()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    config = {**dev.config_dict(), **GROUPS}
    cluster = shardkit.Cluster.from_config(config, metadata=Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.drop_all(cluster.primary(s))
        Base.metadata.create_all(cluster.primary(s))
    oracle = one_database(dev, "kr6f_oracle", Base.metadata)
    e = Env(cluster, oracle, config)
    truncate_everywhere(cluster, *(t.name for t in Base.metadata.sorted_tables))
    with oracle.begin() as c:
        for model, rows in ROWS.items():
            c.execute(insert(model), rows)
    with e.Session() as s:
        for model, rows in ROWS.items():
            s.execute(insert(model), rows)
        s.commit()
    yield e
    oracle.dispose()
    cluster.dispose()


def _plain(v: Any) -> Any:
    if isinstance(v, Base):
        return tuple((c.key, getattr(v, c.key)) for c in v.__mapper__.column_attrs)
    return v


def _sorted(rows: list[Any]) -> list[Any]:
    return sorted((tuple(_plain(v) for v in r) for r in rows), key=repr)


def owners(env: Env, model: Any, keys: list[Any]) -> set[str]:
    return {env.cluster.shard_for(model, k) for k in keys}


def same_rows(env: Env, stmt: Any, params: Any = None, may_touch: set[str] | None = None) -> list[Any]:
    """The statement's rows through the cluster are the oracle's; with ``may_touch``, the
    shards it ran on are among those."""
    with Session(env.oracle) as s:
        want = _sorted(s.execute(stmt, params).all())
    with env.Session() as s, statements_per_shard(env.cluster) as hits:
        got = _sorted(s.execute(stmt, params).all())
    assert got == want
    if may_touch is not None:
        assert set(hits) <= may_touch, (dict(hits), may_touch)
    return want


def same_write(env: Env, stmt: Any, model: Any, params: Any = None,
               may_touch: set[str] | None = None) -> int:
    """The write's rowcount and the table after it are the oracle's (both rolled back)."""
    with Session(env.oracle) as s:
        want_n = s.execute(stmt, params).rowcount
        want = _sorted(s.execute(select(*model.__table__.c)).all())
        s.rollback()
    with env.Session() as s:
        with statements_per_shard(env.cluster) as hits:
            got_n = s.execute(stmt, params).rowcount
        got = _sorted(s.execute(select(*model.__table__.c)).all())
        s.rollback()
    assert (got_n, got) == (want_n, want)
    if may_touch is not None:
        assert set(hits) <= may_touch, (dict(hits), may_touch)
    return want_n


# ---------------------------------------------------------------------------
# WHERE shapes on a bigint hash key
# ---------------------------------------------------------------------------


def test_in_shapes(env):
    same_rows(env, select(H.id).where(H.id.in_([])), may_touch=set(env.cluster.shard_names))
    same_rows(env, select(H.id).where(H.id.in_([3, 3, None])), may_touch=owners(env, H, [3]))
    same_rows(env, select(H.id).where(H.id.in_([None])))
    same_rows(env, select(H.id).where(H.id.not_in([1, 2, 3])))
    same_rows(env, select(H.id).where(H.id.not_in([])))
    same_rows(env, select(H.id).where(H.id.not_in([1, None])))
    same_rows(env, select(H.id).where(~H.id.in_([1, 2])))
    same_rows(env, select(H.id, H.name).where(H.id.in_([1, 2, 3, 4, 5, 6, 99])),
              may_touch=owners(env, H, [1, 2, 3, 4, 5, 6, 99]))


def test_or_and_shapes(env):
    same_rows(env, select(H.id).where(or_(H.id == 1, H.id == 2)), may_touch=owners(env, H, [1, 2]))
    same_rows(env, select(H.id).where(and_(H.id == 1, H.id == 2)))
    same_rows(env, select(H.id).where(H.id == 1, H.id == 2))
    same_rows(env, select(H.id).where(H.id == 4, or_(H.other == 0, H.name == "n1")),
              may_touch=owners(env, H, [4]))
    same_rows(env, select(H.id).where(or_(H.id == 4, H.other == 1)))
    same_rows(env, select(H.id).where(H.id.is_(None)))
    same_rows(env, select(H.id).where(H.id.is_not(None)))
    same_rows(env, select(H.id).where(H.id.between(20, 10)))
    same_rows(env, select(H.id).where(H.id.between(10, 20)))
    same_rows(env, select(H.id).where(H.id == literal_column("5")))
    same_rows(env, select(H.id).where(H.id.in_([1, 2]), H.id.in_([2, 3])), may_touch=owners(env, H, [2]))
    same_rows(env, select(H.id).where(or_(H.id.in_([1, 2]), H.id.in_([5]))),
              may_touch=owners(env, H, [1, 2, 5]))


def test_reused_bind_parameters_follow_the_value(env):
    """One statement object, executed again with other values: each run goes where its
    own value lives (the plan is cached by shape, never the first run's shard)."""
    stmt = select(H.id, H.name).where(H.id == bindparam("k"))
    for k in (1, 2, 3, 4, 5, 6, 7, 8, 1000):
        same_rows(env, stmt, {"k": k}, may_touch=owners(env, H, [k]))
    stmt = select(H.id).where(H.id.in_(bindparam("ks", expanding=True)))
    for ks in ([1, 2], [3], [4, 5, 6, 7], [], [None, 8]):
        same_rows(env, stmt, {"ks": ks}, may_touch=owners(env, H, [k for k in ks if k is not None])
                  or set(env.cluster.shard_names))
    # select(...).where(key == v) built anew each time: the keyed short path.
    for k in (9, 10, 11, 12):
        same_rows(env, select(H).where(H.id == k), may_touch=owners(env, H, [k]))
        same_rows(env, select(H.__table__).where(H.__table__.c.id == k), may_touch=owners(env, H, [k]))


def test_updates_and_deletes(env):
    for stmt in (
        update(H).where(H.id.in_([1, 2, 3, 3, None])).values(other=9),
        update(H).where(H.id.in_([])).values(other=9),
        update(H).where(or_(H.id == 4, H.id == 5)).values(other=9),
        update(H).where(and_(H.id == 4, H.id == 5)).values(other=9),
        update(H).where(H.id == 6, or_(H.other == 2, H.other == 3)).values(other=9),
        delete(H).where(H.id.in_([7, 8, 9, 7])),
        delete(H).where(H.id == 10, H.id == 11),
        delete(H).where(H.id.in_([None])),
    ):
        same_write(env, stmt.execution_options(synchronize_session=False), H)
    stmt = update(H).where(H.id == bindparam("k")).values(other=bindparam("o"))
    for k in (12, 13, 14):
        with Session(env.oracle) as s:
            want = s.execute(stmt, {"k": k, "o": 5}).rowcount
            s.rollback()
        with env.Session() as s, statements_per_shard(env.cluster) as hits:
            assert s.execute(stmt, {"k": k, "o": 5}).rowcount == want == 1
            s.rollback()
        assert set(hits) <= owners(env, H, [k]), dict(hits)


# ---------------------------------------------------------------------------
# Key types
# ---------------------------------------------------------------------------


def test_text_keys_that_look_numeric(env):
    for c in ("1", "01", "10", "42", "7"):
        same_rows(env, select(HT).where(HT.code == c), may_touch=owners(env, HT, [c]))
    same_rows(env, select(HT.code).where(HT.code.in_(["1", "01", "x y", "é"])),
              may_touch=owners(env, HT, ["1", "01", "x y", "é"]))
    with env.Session() as s:
        with pytest.raises(shardkit.ShardKeyError):
            s.execute(select(HT).where(HT.code == 1)).all()


def test_uuid_keys_as_str_and_uuid(env):
    u = UUIDS[3]
    for k in (u, str(u), str(u).upper()):
        same_rows(env, select(HU).where(HU.id == k), may_touch=owners(env, HU, [u]))
    same_rows(env, select(HU.id).where(HU.id.in_([str(UUIDS[0]), UUIDS[1]])),
              may_touch=owners(env, HU, [UUIDS[0], UUIDS[1]]))
    same_write(env, update(HU).where(HU.id == str(u)).values(v=99), HU, may_touch=owners(env, HU, [u]))


def test_composite_keys(env):
    same_rows(env, select(C).where(C.a == 2, C.b == "y"), may_touch=owners(env, C, [(2, "y")]))
    same_rows(env, select(C.a, C.b).where(tuple_(C.a, C.b).in_([(1, "x"), (3, "z"), (9, "q")])))
    same_rows(env, select(C.a, C.b).where(C.a == 2))
    same_rows(env, select(C.a, C.b).where(and_(C.a == 2, C.b.in_(["x", "y"]))))
    same_write(env, update(C).where(tuple_(C.a, C.b).in_([(1, "x"), (3, "z")])).values(v=0)
               .execution_options(synchronize_session=False, shardkit_all_shards=True), C)
    same_write(env, delete(C).where(C.a == 4, C.b == "z"), C, may_touch=owners(env, C, [(4, "z")]))
    with env.Session() as s, statements_per_shard(env.cluster) as hits:
        assert s.get(C, (5, "x")).v == 50
        assert s.get(C, {"a": 5, "b": "y"}).v == 51
        assert s.get(C, (5, "nope")) is None
    assert set(hits) <= owners(env, C, [(5, "x"), (5, "y"), (5, "nope")]), dict(hits)


def test_range_boundaries(env):
    for n in (-5, 99, 100, 199, 200, 1000):
        same_rows(env, select(R).where(R.n == n), may_touch=owners(env, R, [n]))
    same_rows(env, select(R.n).where(R.n.between(99, 100)), may_touch={"s0", "s1"})
    same_rows(env, select(R.n).where(R.n.between(200, 100)))
    same_rows(env, select(R.n).where(R.n >= 100, R.n < 200), may_touch={"s1"})
    same_rows(env, select(R.n).where(R.n > 99, R.n <= 199), may_touch={"s0", "s1"})
    same_rows(env, select(R.n).where(R.n < 100), may_touch={"s0"})
    same_rows(env, select(R.n).where(R.n >= 200), may_touch={"s2"})
    same_rows(env, select(R.n).where(or_(R.n < 0, R.n > 300)), may_touch={"s0", "s2"})
    same_write(env, update(R).where(R.n.between(150, 250)).values(v=0), R, may_touch={"s1", "s2"})
    same_write(env, delete(R).where(R.n >= 100, R.n < 200), R, may_touch={"s1"})
    same_write(env, delete(R).where(R.n.between(300, 100)), R)


def test_timestamptz_range_keys(env):
    for t in (T1, T1 - dt.timedelta(microseconds=1), T2, T2.astimezone(dt.timezone(dt.timedelta(hours=2)))):
        same_rows(env, select(RT.v).where(RT.at == t), may_touch=owners(env, RT, [t]))
    same_rows(env, select(RT.v).where(RT.at >= T1, RT.at < T2), may_touch={"s1"})
    same_rows(env, select(RT.v).where(RT.at.between(T1, T2)), may_touch={"s1", "s2"})
    same_write(env, update(RT).where(RT.at < T1).values(v=0), RT, may_touch={"s0"})


def test_date_range_keys(env):
    for d in (D1, D1 - dt.timedelta(days=1), D2, D2 - dt.timedelta(days=1)):
        same_rows(env, select(RD.v).where(RD.d == d), may_touch=owners(env, RD, [d]))
    same_rows(env, select(RD.v).where(RD.d >= D1, RD.d < D2), may_touch={"s1"})
    same_rows(env, select(RD.v).where(RD.d.between(D1, D2)), may_touch={"s1", "s2"})
    same_rows(env, select(RD.v).where(RD.d > D1 - dt.timedelta(days=1), RD.d <= D1), may_touch={"s0", "s1"})


def test_list_keys_and_default(env):
    for r in ("eu", "us", "br", "jp", "zz"):
        same_rows(env, select(L.id).where(L.region == r), may_touch=owners(env, L, [r]))
    same_rows(env, select(L.id).where(L.region.in_(["eu", "br", "zz"])), may_touch={"s0", "s2"})
    same_rows(env, select(L.id).where(L.region.not_in(["eu"])))
    same_write(env, update(L).where(L.region.in_(["us", "jp"])).values(v=0), L, may_touch={"s1", "s2"})
    same_write(env, delete(L).where(L.region == "br"), L, may_touch={"s2"})
    with env.Session() as s, statements_per_shard(env.cluster) as hits:
        assert s.get(L, ("jp", 5)).v == 5
        assert s.get(L, {"region": "eu", "id": 0}).v == 0
    assert set(hits) <= {"s0", "s2"}, dict(hits)


# ---------------------------------------------------------------------------
# explain() and `shardkit route` agree with where execution went
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: select(H).where(H.id == 7),
    lambda: select(H.id).where(H.id.in_([1, 2, 3, 4])),
    lambda: select(R.n).where(R.n.between(150, 250)),
    lambda: select(L.id).where(L.region == "zz"),
    lambda: select(C).where(C.a == 3, C.b == "x"),
    lambda: select(HU).where(HU.id == str(UUIDS[5])),
])
def test_explain_agrees_with_execution(env, make):
    route = env.cluster.explain(make())
    with env.Session() as s, statements_per_shard(env.cluster) as hits:
        s.execute(make()).all()
    assert set(hits) == set(route.shards), (dict(hits), route)


@pytest.mark.parametrize("table,args,key", [
    ("kr6f_h", ["17"], 17),
    ("kr6f_ht", ["42"], "42"),
    ("kr6f_hu", [str(UUIDS[2])], UUIDS[2]),
    ("kr6f_c", ["3", "y"], (3, "y")),
    ("kr6f_r", ["200"], 200),
    ("kr6f_rt", ["2024-07-01T00:00:00+00:00"], T2),
    ("kr6f_rt", ["2024-01-01T01:00:00+02:00"], T1 - dt.timedelta(hours=1)),
    ("kr6f_rd", ["2024-07-01"], D2),
    ("kr6f_l", ["zz"], "zz"),
])
def test_route_cli_agrees_with_execution(env, tmp_path, capsys, table, args, key):
    """`shardkit route TABLE KEY` names the shard a keyed read runs on."""
    from shardkit import cli
    from shardkit.devcluster import to_toml

    path = tmp_path / "shardkit.toml"
    plain = {**env.config, "groups": {k: v for k, v in env.config["groups"].items()
                                      if k not in ("kr6f_rt", "kr6f_rd")}}
    path.write_text(to_toml(plain) + """
[groups.kr6f_rt]
strategy = "range"
tables = { kr6f_rt = "at" }
ranges = [ { to = 2024-01-01T00:00:00Z, shard = "s0" },
           { from = 2024-01-01T00:00:00Z, to = 2024-07-01T00:00:00Z, shard = "s1" },
           { from = 2024-07-01T00:00:00Z, shard = "s2" } ]

[groups.kr6f_rd]
strategy = "range"
tables = { kr6f_rd = "d" }
ranges = [ { to = 2024-01-01, shard = "s0" }, { from = 2024-01-01, to = 2024-07-01, shard = "s1" },
           { from = 2024-07-01, shard = "s2" } ]
""")
    extra = ["--type", "str"] if table == "kr6f_ht" else []
    assert cli.main(["route", table, *args, "--config", str(path), "--json", *extra]) == 0
    shard = json.loads(capsys.readouterr().out)["shard"]
    model = next(m for m in ROWS if m.__tablename__ == table)
    cols = [c for c in model.__table__.primary_key.columns if c.name in {
        "kr6f_h": ["id"], "kr6f_ht": ["code"], "kr6f_hu": ["id"], "kr6f_c": ["a", "b"],
        "kr6f_r": ["n"], "kr6f_rt": ["at"], "kr6f_rd": ["d"], "kr6f_l": ["region"]}[table]]
    parts = key if isinstance(key, tuple) else (key,)
    stmt = select(model).where(*[c == v for c, v in zip(cols, parts)])
    with env.Session() as s, statements_per_shard(env.cluster) as hits:
        s.execute(stmt).all()
    assert set(hits) == {shard}, (dict(hits), shard)


def test_orm_writes_with_split_in_lists(env):
    """ORM UPDATE/DELETE of an IN list split by shard, with each synchronize_session and
    RETURNING: the rowcount, returned rows and the objects held are one database's."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 99]
    for sync in ("auto", "evaluate", "fetch", False):
        stmt = update(H).where(H.id.in_(ids)).values(other=H.other + 100).execution_options(
            synchronize_session=sync)
        results = []
        for make in (lambda: Session(env.oracle), env.Session):
            with make() as s:
                held = s.scalars(select(H).where(H.id.in_(ids))).all()
                n = s.execute(stmt).rowcount
                results.append((n, sorted((h.id, h.other) for h in held)))
                s.rollback()
        assert results[0] == results[1], sync
    for make in (lambda: Session(env.oracle), env.Session):
        with make() as s:
            got = sorted(s.execute(update(H).where(H.id.in_(ids)).values(other=0)
                                   .returning(H.id, H.other)).all())
            s.rollback()
        results.append(got)
    assert results[-1] == results[-2]
    for make in (lambda: Session(env.oracle), env.Session):
        with make() as s:
            q = s.query(H).filter(H.id.in_(ids))
            results.append((q.update({H.other: 1}, synchronize_session="fetch"),
                            s.query(H).filter(H.id.in_(ids)).delete(synchronize_session="fetch"),
                            s.query(H).count()))
            s.rollback()
    assert results[-1] == results[-2]


def test_a_key_given_by_its_compiled_parameter_name(env):
    """SQLAlchemy lets an execution's parameters override an anonymous bound value by its
    compiled name (``{"id_1": 7}`` for ``H.id == 5``): the database runs ``id = 7``.  The
    route followed the statement's 5: the read came from 5's shard (no row, where one
    database returns 7's) and the write updated nothing there.  Routed by the value that
    runs, or refused saying why; never the wrong shard's rows."""
    a, b = 5, next(k for k in range(6, 100) if env.cluster.shard_for(H, k) != env.cluster.shard_for(H, 5))
    for stmt in (select(H.id, H.name).where(H.id == a),
                 select(H.id).where(H.id == a, H.name == bindparam("nm"))):
        params = {"id_1": b, "nm": f"n{b % 5}"}
        with Session(env.oracle) as s:
            want = s.execute(stmt, params).all()
        assert [r.id for r in want] == [b]
        with env.Session() as s:
            try:
                got = s.execute(stmt, params).all()
            except shardkit.RoutingError as e:
                assert "id_1" in str(e)
            else:
                assert got == want
    stmt = update(H).where(H.id == a).values(other=-1)
    with env.Session() as s:
        try:
            n = s.execute(stmt, {"id_1": b}).rowcount
        except shardkit.RoutingError as e:
            assert "id_1" in str(e)
        else:
            assert n == 1
        s.rollback()


def test_a_parameter_that_names_no_value_of_the_statement_is_not_refused(env):
    """``{"id_2": ...}`` for a statement with one anonymous ``id`` value (compiled ``id_1``)
    overrides nothing (SQLAlchemy ignores it): it routes by the statement's own value, as
    one database answers."""
    stmt = select(H.id, H.name).where(H.id == 5)
    with Session(env.oracle) as s:
        want = s.execute(stmt, {"id_2": 6}).all()
    with env.Session() as s:
        assert s.execute(stmt, {"id_2": 6}).all() == want
