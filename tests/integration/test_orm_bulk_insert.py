"""The less common ORM write paths of SQLAlchemy 2.x through
ShardedSession.  The ORM bulk INSERT (session.execute(insert(Model), [rows]),
bulk_insert_mappings, bulk_save_objects) must make each row's columns as SQLAlchemy's
does (a None left to the column's default unless render_nulls, a versioned class's
first version), and a refused multi-row INSERT ... RETURNING(Model) must advise
something that works.  Rows are checked on every shard's primary."""

from __future__ import annotations

import uuid

import pytest
from own_tables import cluster_with_tables, keys_per_shard, truncate_everywhere
from sqlalchemy import BigInteger, Integer, MetaData, String, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class WItem(Base):
    """An attribute named unlike its column; a nullable column with a default."""
    __tablename__ = "w5b_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column("label_text", String(40), default="")
    qty: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str | None] = mapped_column(String(10), default="new")


class WVer(Base):
    """Optimistic concurrency: SQLAlchemy gives a new row its first version."""
    __tablename__ = "w5b_versioned"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__ = {"version_id_col": version}


class WTok(Base):
    """A reference table with a value a Python default makes per call."""
    __tablename__ = "w5b_toks"
    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    token: Mapped[str | None] = mapped_column(String(40), default=lambda: uuid.uuid4().hex)


CONFIG = {
    "groups": {
        "items": {"strategy": "hash", "tables": {"w5b_items": "id", "w5b_versioned": "id"}},
    },
    "reference_tables": ["w5b_toks"],
}

TABLES = [t.name for t in Base.metadata.sorted_tables]


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def cl(env):
    truncate_everywhere(env, *TABLES)
    return env


def S(cluster, **kw):
    kw.setdefault("consistency", "strong")
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, **kw)


def rows(cluster, shard, sql):
    with cluster.primary(shard).connect() as c:
        return sorted(tuple(r) for r in c.execute(text(sql)))


def placed(cluster, table, sql):
    """{shard: rows} of every shard's primary."""
    return {s: rows(cluster, s, sql) for s in cluster.shard_names}


def two_keys(cluster, table, n=1):
    ks = keys_per_shard(cluster, table, n)
    a, b = cluster.shard_names
    return ks[a], ks[b]


def one_database(cluster, fn):
    """What a plain Session on one database (shard s0's primary) makes of ``fn(session)``;
    rolled back."""
    from sqlalchemy.orm import Session
    with cluster.primary(cluster.shard_names[0]).connect() as c:
        with Session(bind=c) as s:
            out = fn(s)
            s.rollback()
        c.rollback()
    return out


def test_orm_bulk_insert_leaves_a_none_value_to_the_columns_default(cl):
    """SQLAlchemy's ORM bulk INSERT leaves a key given as None out (the column's default
    applies) unless render_nulls=True; split by shard it was written as NULL."""
    (a,), (b,) = two_keys(cl, "w5b_items")
    one_db = one_database(cl, lambda s: (
        s.execute(insert(WItem), [{"id": a, "status": None}, {"id": b}]),
        s.execute(select(WItem.id, WItem.status).order_by(WItem.id)).all())[1])
    assert [tuple(r) for r in one_db] == [(a, "new"), (b, "new")]
    with S(cl)() as s:
        s.execute(insert(WItem), [{"id": a, "status": None}, {"id": b}])
        s.commit()
    s0, s1 = cl.shard_names
    assert placed(cl, "w5b_items", "SELECT id, status FROM w5b_items") == {
        s0: [(a, "new")], s1: [(b, "new")]}


def test_orm_bulk_insert_render_nulls_writes_the_none(cl):
    (a,), (b,) = two_keys(cl, "w5b_items")
    with S(cl)() as s:
        s.execute(insert(WItem).execution_options(render_nulls=True),
                  [{"id": a, "status": None}, {"id": b, "status": None}])
        s.bulk_insert_mappings(WItem, [{"id": a + 100, "status": None}], render_nulls=True)
        s.commit()
    assert sorted(r for rs in placed(cl, "w5b_items", "SELECT id, status FROM w5b_items").values()
                  for r in rs) == sorted([(a, None), (b, None), (a + 100, None)])


def test_orm_bulk_insert_of_a_versioned_class_gives_rows_their_first_version(cl):
    """SQLAlchemy's ORM bulk INSERT (and bulk_insert_mappings, bulk_save_objects) sets a
    versioned class's version_id_col from its generator; split by shard it was left out
    (NOT NULL violation, or a NULL version that no versioned UPDATE matches)."""
    (a, a2), (b, b2) = two_keys(cl, "w5b_versioned", 2)
    one_db = one_database(cl, lambda s: (
        s.execute(insert(WVer), [{"id": a, "name": "x"}]),
        s.execute(select(WVer.version)).scalar_one())[1])
    assert one_db == 1
    with S(cl)() as s:
        s.execute(insert(WVer), [{"id": a, "name": "x"}, {"id": b, "name": "y"}])
        s.bulk_insert_mappings(WVer, [{"id": a2, "name": "m"}])
        s.bulk_save_objects([WVer(id=b2, name="o")])
        s.commit()
    s0, s1 = cl.shard_names
    assert placed(cl, "w5b_versioned", "SELECT id, version FROM w5b_versioned") == {
        s0: sorted([(a, 1), (a2, 1)]), s1: sorted([(b, 1), (b2, 1)])}
    with S(cl)() as s:
        o = s.get(WVer, b)
        o.name = "z"
        s.commit()
    assert rows(cl, s1, f"SELECT name, version FROM w5b_versioned WHERE id = {b}") == [("z", 2)]


def test_orm_bulk_insert_of_reference_rows_leaving_a_made_value_by_none_is_refused(cl):
    """A None left to the column's default is still checked as a value each shard's run
    would make on its own (a Python default that is not a constant): refused, as when
    the key is left out."""
    for given in ({"code": "a", "token": None}, {"code": "a"}):
        with S(cl)() as s:
            with pytest.raises(shardkit.CrossShardWriteError, match="column token's default"):
                s.execute(insert(WTok), [given])
    assert placed(cl, "w5b_toks", "SELECT count(*) FROM w5b_toks") == {n: [(0,)] for n in cl.shard_names}
    with S(cl)() as s:
        s.execute(insert(WTok).execution_options(render_nulls=True), [{"code": "b", "token": None}])
        s.commit()
    assert placed(cl, "w5b_toks", "SELECT code, token FROM w5b_toks") == {
        n: [("b", None)] for n in cl.shard_names}


def test_multi_row_values_returning_entities_across_shards_is_refused_with_advice_that_works(cl):
    """insert(Model).values([...]).returning(Model) over two shards is refused; its advice
    (pass the rows as a list of parameter dicts) led to a second refusal (ORM bulk INSERT
    ... RETURNING is not supported).  The advice must be something that works."""
    (a,), (b,) = two_keys(cl, "w5b_items")
    rows_ = [{"id": a, "label": "x"}, {"id": b, "label": "y"}]
    with S(cl)() as s:
        with pytest.raises(shardkit.CrossShardWriteError) as e:
            s.scalars(insert(WItem).values(rows_).returning(WItem)).all()
        assert "list of parameter dicts" not in str(e.value)
        assert "add_all" in str(e.value)
    assert placed(cl, "w5b_items", "SELECT count(*) FROM w5b_items") == {n: [(0,)] for n in cl.shard_names}
    with S(cl)() as s:  # what it says to do
        s.add_all([WItem(**r) for r in rows_])
        s.commit()
    s0, s1 = cl.shard_names
    assert placed(cl, "w5b_items", "SELECT id, label_text FROM w5b_items") == {s0: [(a, "x")], s1: [(b, "y")]}
