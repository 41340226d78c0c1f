"""Cross-shard reads that name ORDER BY / GROUP BY terms by a string, and merged results'
metadata, each compared with the same query on ONE plain database holding every row
(``so6f_oracle``, on shard s0's server): the same answer (or the same error), or
``ScatterRefused`` naming the construct; ``explain()`` agreeing with execution.

- ``group_by("name")`` where ``name`` is both a label of the select list and a column of
  its FROM: SQLAlchemy renders ``GROUP BY name``, which PostgreSQL takes as the FROM's
  column (input columns win in GROUP BY; output columns win in ORDER BY).
- A string ORDER BY / GROUP BY in an ORM statement with ``.join(Model.rel)`` or a join to
  an entity already selected.
- A Core result with two columns of the same name: looking one up by that name is
  ambiguous on one database.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import one_database, truncate_everywhere
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    Text,
    desc,
    func,
    insert,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, Row
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, relationship, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Par(Base):
    __tablename__ = "so6f_p"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name = mapped_column(Text)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    kids = relationship("Kid", order_by="Kid.no")


class Kid(Base):
    __tablename__ = "so6f_k"
    p_id = mapped_column(ForeignKey("so6f_p.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    v = mapped_column(Text)


GROUPS = {"groups": {"so6f": {"strategy": "hash", "tables": {"so6f_p": "id", "so6f_k": "p_id"}}}}
T, K = Par.__table__, Kid.__table__


@dataclass
class Env:
    cluster: shardkit.Cluster
    oracle: Engine

    def Session(self) -> Any:
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster)()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    oracle = one_database(dev, "so6f_oracle", Base.metadata)
    e = Env(cluster, oracle)
    # Names differing only in case ('A', 'a'), spread over the shards.
    words = ["A", "a", "b", "B", None, "a", "c", "A", "b", "C", "a", "b"]
    parents = [{"id": i + 1, "name": words[i % len(words)], "grp": i % 3, "qty": (i * 7) % 5}
               for i in range(24)]
    kids = [{"p_id": p["id"], "no": no, "v": f"v{(p['id'] * 5 + no) % 7}"}
            for p in parents for no in range(p["id"] % 3)]
    truncate_everywhere(cluster, "so6f_k", "so6f_p")
    with oracle.begin() as c:
        c.execute(insert(T), parents)
        c.execute(insert(K), kids)
    with e.Session() as s:
        s.execute(insert(Par), parents)
        s.execute(insert(Kid), kids)
        s.commit()
    assert len({cluster.shard_for("so6f_p", p["id"]) for p in parents}) == 3
    yield e
    oracle.dispose()
    cluster.dispose()


def exact(v: Any) -> Any:
    if isinstance(v, (Row, list, tuple)):
        return tuple(exact(x) for x in v)
    return (type(v).__name__, v)


def outcome(session: Any, fn: Any) -> Any:
    try:
        return ("ok", exact(fn(session)))
    except shardkit.ScatterRefused:
        raise
    except Exception as e:  # noqa: BLE001 - the error itself is compared
        return ("error", type(e).__name__, str(e).split("\n")[0])


def same(env: Env, fn: Any, ok: bool = True) -> Any:
    with Session(env.oracle) as s:
        want = outcome(s, fn)
    with env.Session() as s:
        got = outcome(s, fn)
    assert got == want
    assert (want[0] == "ok") == ok, want
    return want


def same_or_refused(env: Env, fn: Any) -> str | None:
    try:
        same(env, fn)
    except shardkit.ScatterRefused as e:
        assert e.construct
        return e.construct
    return None


# ---------------------------------------------------------------------------
# GROUP BY a name that is both a label and a FROM column
# ---------------------------------------------------------------------------


def test_group_by_a_name_of_a_label_and_a_column_groups_by_the_column(env):
    """``SELECT name AS id, count(*) ... GROUP BY id``: PostgreSQL groups by the table's
    column id (name depends on the primary key): one row per parent, as one database
    returns; the merge grouped by the label's column (name), one row per name."""
    stmt = select(Par.name.label("id"), func.count().label("n")).group_by("id")
    rows = same(env, lambda s: sorted(s.execute(stmt).all(), key=lambda r: (r[0] is None, r[0] or "")))
    assert len(rows[1]) == 24
    merge = env.cluster.explain(stmt).merge
    assert merge.startswith("group-by merge"), merge


def test_group_by_a_name_of_a_label_over_an_expression_of_the_column(env):
    """``SELECT lower(name) AS name, count(*) ... GROUP BY name``: one database groups by
    the column name ('A' and 'a' apart); the merge added the two groups up.  Merged
    exactly, or refused (an expression over a group key), never the wrong groups."""
    stmt = (select(func.lower(Par.name).label("name"), func.count().label("n"))
            .group_by("name").order_by("name", desc("n")))
    with Session(env.oracle) as s:
        assert len(s.execute(stmt).all()) > len({r[0] for r in s.execute(stmt)})
    construct = same_or_refused(env, lambda s: s.execute(stmt).all())
    merge = env.cluster.explain(stmt).merge
    assert (construct is None) == (not merge.startswith("refused")), (construct, merge)


def test_group_by_a_label_named_as_another_column_of_the_from(env):
    """``SELECT grp AS qty, count(*) ... GROUP BY qty`` groups by the column qty: one
    database refuses grp ungrouped; so must the shards (or the merge), never group by grp."""
    stmt = select(Par.grp.label("qty"), func.count()).group_by("qty")
    for make in (lambda: Session(env.oracle), env.Session):
        with make() as s:
            with pytest.raises((sa_exc.ProgrammingError, shardkit.ScatterRefused)) as e:
                s.execute(stmt).all()
        assert "must appear in the GROUP BY" in str(e.value) or e.value.construct == "ungrouped column"


# ---------------------------------------------------------------------------
# A string ORDER BY / GROUP BY in ORM statements with joins
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [
    lambda s: s.execute(select(Par.id, Par.name).join(Par.kids).order_by("name", "id", "no")).all(),
    lambda s: s.execute(select(Par.id, Kid.v.label("label")).join(Par.kids)
                        .order_by(desc("label"), Par.id, Kid.no).limit(7)).all(),
    lambda s: s.execute(select(Par.grp.label("g"), func.count(Kid.no).label("n")).join(Par.kids)
                        .group_by("g").order_by(desc("n"), "g")).all(),
    lambda s: s.query(Par.id, Kid.no).join(Par.kids).order_by("v", "id", "no").all(),
], ids=["relationship-join", "label-of-joined-table", "group-by-label", "query-api"])
def test_a_name_in_an_orm_join(env, fn):
    """``.join(Par.kids)``: SQLAlchemy's core SelectState, built on the ORM statement to
    resolve the name, cannot join a relationship and raised ArgumentError /
    InvalidRequestError where one database returns the rows."""
    same(env, fn)


# ---------------------------------------------------------------------------
# Two result columns of the same name
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [
    lambda s: [r._mapping["id"] for r in s.execute(
        select(T.c.id, K.c.p_id.label("id")).join(K, K.c.p_id == T.c.id).order_by(T.c.id, K.c.no))],
    lambda s: [r.id for r in s.execute(select(T.c.id, K.c.p_id.label("id"))
                                       .join(K, K.c.p_id == T.c.id).where(K.c.no == 1))],
    lambda s: s.execute(select(T.c.id, K.c.p_id.label("id")).join(K, K.c.p_id == T.c.id)
                        .order_by(T.c.id, K.c.no)).scalars("id").all(),
    lambda s: s.execute(select(T.c.id, K.c.p_id.label("id")).join(K, K.c.p_id == T.c.id)
                        .order_by(T.c.id, K.c.no)).columns("id", T.c.id).all(),
], ids=["mapping", "attribute", "scalars", "columns"])
def test_a_duplicate_name_is_ambiguous_as_on_one_database(env, fn):
    """Two columns named id: one database raises InvalidRequestError ('Ambiguous column
    name'); the merged result returned one of them."""
    same(env, fn, ok=False)


def test_duplicate_names_found_by_their_objects(env):
    same(env, lambda s: [(r._mapping[T.c.id], r[1]) for r in s.execute(
        select(T.c.id, K.c.p_id.label("id")).join(K, K.c.p_id == T.c.id).order_by(T.c.id, K.c.no))])
