"""Cross-shard reads as a demanding SQLAlchemy 2.x ORM user writes them, each compared
with the same query on ONE plain database holding every row (``so6e_oracle``, on shard
s0's server): exactly the same answer, or ``ScatterRefused`` naming the construct.

- Rows of a merged result are found by the objects selected, as on one database
  (``row._mapping[Model.col]``, ``result.scalars(Model.col)``, ``result.columns(...)``,
  ``row._mapping[Model]``, a label, a Core table's column), not only by name.
- ``GROUP BY`` a table's primary key with other columns of that table in the select list,
  ORDER BY or HAVING (PostgreSQL accepts them: functionally dependent) is merged.
- A mapping's own joined eager load (``relationship(..., lazy="joined")``) of a
  collection with LIMIT/OFFSET (``Query.first()``) merges as ``joinedload()`` does, and
  with ``innerjoin=True`` is refused as ``joinedload(..., innerjoin=True)`` is.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import one_database, truncate_everywhere
from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    Numeric,
    Text,
    desc,
    func,
    insert,
    inspect,
    select,
    text,
    union_all,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, Row
from sqlalchemy.orm import (
    DeclarativeBase,
    Session,
    aliased,
    lazyload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import shardkit

pytestmark = pytest.mark.integration

D = decimal.Decimal


class Base(DeclarativeBase):
    pass


class Par(Base):
    __tablename__ = "so6e_p"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name = mapped_column(Text)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    amt = mapped_column(Numeric(12, 3))
    flag = mapped_column(Boolean)
    kids = relationship("Kid", back_populates="par", order_by="Kid.no")


class Kid(Base):
    """Colocated with so6e_p (sharded by p_id)."""

    __tablename__ = "so6e_k"
    p_id = mapped_column(ForeignKey("so6e_p.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    v = mapped_column(Text)
    par = relationship(Par, back_populates="kids")


class JBase(DeclarativeBase):
    """The same tables, mapped with joined eager loads of the mapping's own."""


class JPar(JBase):
    __tablename__ = "so6e_p"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name = mapped_column(Text)
    qty = mapped_column(Integer)
    kids = relationship("JKid", order_by="JKid.no", lazy="joined")


class JKid(JBase):
    __tablename__ = "so6e_k"
    p_id = mapped_column(ForeignKey("so6e_p.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    v = mapped_column(Text)


class IJPar(JBase):
    """so6e_p again, its children joined INNER by the mapping."""

    __table__ = JPar.__table__
    kids = relationship(JKid, order_by=JKid.no, lazy="joined", innerjoin=True, viewonly=True)


GROUPS = {"groups": {"so6e": {"strategy": "hash", "tables": {"so6e_p": "id", "so6e_k": "p_id"}}}}


@dataclass
class Env:
    cluster: shardkit.Cluster
    jcluster: shardkit.Cluster     # the same servers and tables, for JBase's mapping
    oracle: Engine

    def Session(self, joined: bool = False) -> Any:
        return sessionmaker(class_=shardkit.ShardedSession,
                            cluster=self.jcluster if joined else self.cluster)()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=Base.metadata)
    jcluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=JBase.metadata)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    oracle = one_database(dev, "so6e_oracle", Base.metadata)
    e = Env(cluster, jcluster, oracle)
    _load(e)
    yield e
    oracle.dispose()
    jcluster.dispose()
    cluster.dispose()


def _load(e: Env) -> None:
    """8 parents on each shard, taken in turn; 0, 1 or 2 children each; NULLs everywhere."""
    names = e.cluster.shard_names
    per: dict[str, list[int]] = {s: [] for s in names}
    k = 1
    while min(len(v) for v in per.values()) < 8:
        shard = e.cluster.shard_for("so6e_p", k)
        if len(per[shard]) < 8:
            per[shard].append(k)
        k += 1
    ids = [k for turn in zip(*per.values()) for k in turn]
    words = [None, "b", "A", "a", "Zed", "", "b", "c"]
    parents, kids = [], []
    for i, pid in enumerate(ids):
        parents.append({"id": pid, "name": words[i % 8], "grp": None if i % 7 == 3 else i % 3,
                        "qty": None if i % 5 == 2 else (i * 7) % 5,
                        "amt": None if i % 6 == 1 else D((i * 1237) % 9999) / 1000,
                        "flag": None if i % 4 == 1 else bool(i % 3)})
        kids.extend({"p_id": pid, "no": no, "v": f"v{i}-{no}"} for no in range(i % 3))
    truncate_everywhere(e.cluster, "so6e_k", "so6e_p")
    with e.oracle.begin() as c:
        c.execute(text("TRUNCATE so6e_k, so6e_p"))
        c.execute(insert(Par.__table__), parents)
        c.execute(insert(Kid.__table__), kids)
    with e.Session() as s:
        s.execute(insert(Par), parents)
        s.execute(insert(Kid), kids)
        s.commit()


def exact(v: Any) -> Any:
    """A value with its type and exact digits; an entity as its loaded columns and
    collections; rows and lists element by element."""
    if isinstance(v, D):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, (Base, JBase)):
        st = inspect(v)
        out: tuple[Any, ...] = (type(v).__name__,) + tuple(
            exact(st.dict.get(a.key, "<not loaded>")) for a in st.mapper.column_attrs)
        if "kids" in st.dict:
            out += (tuple(exact(k) for k in st.dict["kids"]),)
        return out
    if isinstance(v, (Row, list, tuple)):
        return tuple(exact(x) for x in v)
    return (type(v).__name__, v)


def outcome(session: Any, fn: Any) -> Any:
    try:
        return ("ok", exact(fn(session)))
    except shardkit.ScatterRefused:
        raise
    except Exception as e:  # noqa: BLE001 - the error itself is compared
        return ("error", type(e).__name__)


def same(env: Env, fn: Any, joined: bool = False) -> Any:
    """``fn(session)`` on the cluster equals ``fn(session)`` on the one database."""
    with Session(env.oracle) as s:
        want = outcome(s, fn)
    with env.Session(joined) as s:
        got = outcome(s, fn)
    assert got == want
    assert want[0] == "ok", want
    return want[1]


def same_or_refused(env: Env, fn: Any, joined: bool = False) -> str | None:
    try:
        same(env, fn, joined)
    except shardkit.ScatterRefused as e:
        assert e.construct
        return e.construct
    return None


# ---------------------------------------------------------------------------
# Rows found by the objects selected
# ---------------------------------------------------------------------------


LAB = Par.name.label("nm")
PA = aliased(Par)
T = Par.__table__


@pytest.mark.parametrize("fn", [
    # ordered merge (with hidden sort columns), by an attribute and a label
    lambda s: [(r._mapping[Par.name], r._mapping[LAB]) for r in
               s.execute(select(Par.id, Par.name, LAB).order_by(Par.qty.desc().nulls_last(), Par.id))],
    lambda s: s.execute(select(Par.id, Par.name).order_by(Par.name, Par.id)).scalars(Par.name).all(),
    lambda s: s.execute(select(Par.id, Par.name, Par.qty).order_by(Par.id)).columns(Par.qty, Par.id).all(),
    # concatenation
    lambda s: sorted(r._mapping[Par.id] for r in s.execute(select(Par.id, Par.name).where(Par.qty > 1))),
    # aggregates and groups: the group key by its attribute, the aggregate by its label
    lambda s: [(r._mapping[Par.grp], r._mapping["n"]) for r in s.execute(
        select(Par.grp, func.count().label("n")).group_by(Par.grp).order_by(Par.grp))],
    # entities, aliased entities, an entity beside a column
    lambda s: [r._mapping[Par].id for r in s.execute(select(Par).order_by(Par.qty, Par.id))],
    lambda s: [r._mapping[PA].id for r in s.execute(select(PA).order_by(PA.name, PA.id).limit(5))],
    lambda s: [(r._mapping[Par].id, r._mapping[Kid.no]) for r in s.execute(
        select(Par, Kid.no).join(Par.kids).order_by(Kid.no, Par.id))],
    # a Core table's columns
    lambda s: [r._mapping[T.c.name] for r in s.execute(select(T).order_by(T.c.qty, T.c.id))],
    # streamed in partitions
    lambda s: [list(p) for p in s.execute(select(Par.id, Par.name).order_by(Par.id).execution_options(
        yield_per=5)).columns(Par.name).partitions()],
    # a UNION ALL's rows, by name as one database finds them
    lambda s: [r._mapping["id"] for r in s.execute(
        union_all(select(Par.id).where(Par.qty > 2), select(Par.id).where(Par.qty < 1)).order_by("id"))],
], ids=["ordered-mapping", "ordered-scalars", "ordered-columns", "concat", "groups", "entity",
        "aliased-entity", "entity-and-column", "core-table", "partitions", "union"])
def test_merged_rows_are_found_by_the_objects_selected(env, fn):
    """On one database ``row._mapping[Model.col]`` (and ``scalars(Model.col)``,
    ``columns(Model.col)``, ``row._mapping[Model]``) finds the column; a cross-shard
    result only knew its names, and raised KeyError."""
    same(env, fn)


def test_hidden_merge_columns_stay_hidden(env):
    with env.Session() as s:
        r = s.execute(select(Par.id).order_by(Par.name, Par.id))
        assert list(r.keys()) == ["id"]
        row = r.first()
        with pytest.raises(KeyError):
            row._mapping[Par.name]    # a sort key the merge added, not a selected column


# ---------------------------------------------------------------------------
# GROUP BY a primary key
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [
    lambda s: s.execute(select(Par.id, Par.name, func.count(Kid.no)).outerjoin(Par.kids)
                        .group_by(Par.id).order_by(Par.id)).all(),
    lambda s: s.execute(select(Par.id, Par.name, Par.amt, func.count(Kid.no).label("n"))
                        .outerjoin(Par.kids).group_by(Par.id)
                        .order_by(func.count(Kid.no).desc(), Par.id).limit(5)).all(),
    lambda s: s.execute(select(Par.id, func.count(Kid.no)).outerjoin(Par.kids).group_by(Par.id)
                        .order_by(Par.name.desc().nulls_last(), Par.id).limit(6).offset(2)).all(),
    lambda s: s.execute(select(Par.id, func.count(Kid.no)).outerjoin(Par.kids).group_by(Par.id)
                        .having(Par.qty > 2).order_by(Par.id)).all(),
    lambda s: s.execute(select(PA.id, PA.name, func.count()).group_by(PA.id).order_by(PA.id)).all(),
    lambda s: s.execute(select(Kid.p_id, Kid.no, Kid.v, func.count()).group_by(Kid.p_id, Kid.no)
                        .order_by(Kid.p_id, Kid.no)).all(),
], ids=["selected", "order-by-count", "order-by-dependent", "having-dependent", "aliased",
        "composite-key"])
def test_group_by_primary_key_with_dependent_columns(env, fn):
    """PostgreSQL lets a grouped query name any column of a table whose primary key it
    groups by (one value per group); across shards it was refused as 'neither in GROUP BY
    nor an aggregate', as if the query were wrong."""
    same(env, fn)


def test_group_by_part_of_a_primary_key_is_still_refused(env):
    """(One database refuses it too.)"""
    with env.Session() as s:
        with pytest.raises(shardkit.ScatterRefused) as e:
            s.execute(select(Kid.p_id, Kid.v, func.count()).group_by(Kid.p_id)).all()
    assert e.value.construct == "ungrouped column"


# ---------------------------------------------------------------------------
# The mapping's own joined eager loads
# ---------------------------------------------------------------------------


def _kids(objs: Any) -> list[tuple[int, list[int]]]:
    return [(p.id, [k.no for k in p.kids]) for p in objs]


@pytest.mark.parametrize("fn", [
    lambda s: _kids(s.scalars(select(JPar).order_by(JPar.id).limit(5)).unique()),
    lambda s: _kids(s.scalars(select(JPar).order_by(JPar.name.desc().nulls_last(), JPar.id)
                              .limit(4).offset(3)).unique()),
    lambda s: _kids([s.query(JPar).order_by(JPar.qty, JPar.id).first()]),
    lambda s: _kids(s.query(JPar).order_by(JPar.id).offset(20).all()),
    lambda s: _kids(s.scalars(select(IJPar).options(selectinload(IJPar.kids)).order_by(IJPar.id)
                              .limit(5))),
    lambda s: _kids(s.scalars(select(IJPar).options(lazyload("*")).order_by(IJPar.id).limit(5))),
], ids=["limit", "limit-offset", "query-first", "query-offset", "innerjoin-overridden",
        "innerjoin-wildcard-off"])
def test_mapping_joined_collection_with_limit(env, fn):
    """``relationship(..., lazy="joined")``: the ORM puts a LIMIT'ed statement in a derived
    table to join the collection; across shards that was refused as 'not colocated on the
    shard key' ('the derived table anon_1 has LIMIT', which the caller never wrote), where
    ``joinedload()`` given as an option merges."""
    same(env, fn, joined=True)


@pytest.mark.parametrize("fn", [
    lambda s: _kids(s.scalars(select(IJPar).order_by(IJPar.id).limit(5)).unique()),
    lambda s: _kids([s.query(IJPar).order_by(IJPar.name, IJPar.id).offset(2).first()]),
], ids=["limit", "query-first"])
def test_mapping_inner_joined_collection_with_limit_is_never_a_different_page(env, fn):
    """``lazy="joined", innerjoin=True``: the inner join drops childless parents after each
    shard's LIMIT, as ``joinedload(..., innerjoin=True)`` does, which is refused; the
    mapping's own must be too (not a page one database would not return)."""
    assert same_or_refused(env, fn, joined=True) == "inner joinedload with LIMIT"


def test_mapping_inner_joined_collection_without_limit_merges(env):
    same(env, lambda s: _kids(s.scalars(select(IJPar).order_by(IJPar.id)).unique()), joined=True)


# ---------------------------------------------------------------------------
# ORDER BY / GROUP BY a label or column named by a string
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [
    lambda s: s.execute(select(Par.grp, func.count().label("n")).group_by(Par.grp)
                        .order_by(desc("n"), Par.grp.nulls_first())).all(),
    lambda s: s.execute(select(Par.grp.label("g"), func.sum(Par.qty).label("total"))
                        .group_by("g").order_by("g")).all(),
    lambda s: s.execute(select(Par.id, Par.name.label("nm")).order_by(
        desc("nm").nulls_last(), "id").limit(7).offset(3)).all(),
    # a column of the FROM, not in the select list, named by its name
    lambda s: s.execute(select(Par.id).order_by("qty", "id").limit(9)).scalars().all(),
    lambda s: s.query(Par.grp, func.max(Par.amt).label("top")).group_by(Par.grp)
                .order_by(desc("top"), Par.grp).all(),
], ids=["aggregate-label-desc", "group-and-order-by-label", "label-with-page", "from-column",
        "query-api"])
def test_order_and_group_by_a_name(env, fn):
    """``order_by("n")`` / ``desc("n")`` / ``group_by("g")`` name a label of the select
    list (or a column of the FROM), as SQLAlchemy renders them: a common idiom, refused
    across shards as 'SQL text' before."""
    same(env, fn)


def test_a_name_that_names_nothing_is_still_refused_as_sqlalchemy_refuses_it(env):
    with Session(env.oracle) as s, pytest.raises(sa_exc.CompileError) as one_database:
        s.execute(select(Par.id).order_by("no_such_label")).all()
    with env.Session() as s, pytest.raises(sa_exc.CompileError) as sharded:
        s.execute(select(Par.id).order_by("no_such_label")).all()
    assert str(sharded.value) == str(one_database.value) and "no_such_label" in str(sharded.value)
