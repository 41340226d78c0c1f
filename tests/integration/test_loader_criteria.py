"""Tenant / soft-delete criteria added the ORM way (with_loader_criteria per statement or
from a do_orm_execute listener, Session.info tenant ids): every answer equals one
unsharded database's (an oracle database holding the same rows), or is refused."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from own_tables import cluster_with_tables, keys_per_shard
from sqlalchemy import (BigInteger, Boolean, ForeignKeyConstraint, Integer, MetaData, String, create_engine,
                        event, func, select, text, update)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import (DeclarativeBase, Mapped, mapped_column, relationship, selectinload,
                            sessionmaker, with_loader_criteria)

import shardkit
from shardkit.errors import RoutingError, ScatterRefused

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Doc(Base):
    __tablename__ = "lc_docs"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    score: Mapped[int] = mapped_column(Integer)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    notes: Mapped[list[Note]] = relationship(back_populates="doc", order_by="Note.id")


class Note(Base):
    __tablename__ = "lc_notes"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    doc_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(String(20))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    doc: Mapped[Doc] = relationship(back_populates="notes")
    __table_args__ = (ForeignKeyConstraint(["tenant_id", "doc_id"], ["lc_docs.tenant_id", "lc_docs.id"]),)


class Member(Base):
    """Another group (keyed by user): which tenants a user may see."""
    __tablename__ = "lc_members"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


GROUPS = {"groups": {
    "tenants": {"tables": {"lc_docs": "tenant_id", "lc_notes": "tenant_id"}},
    "members": {"tables": {"lc_members": "user_id"}},
}}


class Env:
    def __init__(self, cluster: shardkit.Cluster, oracle) -> None:
        self.cluster = cluster
        self.oracle = oracle
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        self.Oracle = sessionmaker(bind=oracle)
        # Two tenants on each of two shards, one more elsewhere.
        self.by_shard = by_shard = keys_per_shard(cluster, "lc_docs", 2)
        self.tenants = sorted(t for v in by_shard.values() for t in v)

    def rows(self) -> list[Base]:
        out: list[Base] = []
        for t in self.tenants:
            for i in range(1, 6):
                out.append(Doc(tenant_id=t, id=i, score=(t * 7 + i * 3) % 11, deleted=(i == 2)))
                for j in range(1, 4):
                    out.append(Note(tenant_id=t, id=i * 10 + j, doc_id=i, body=f"n{t}.{i}.{j}",
                                    deleted=(j == 2)))
        for u in (1, 2, 3):
            for t in self.tenants:
                if (t + u) % 3 == 0:
                    out.append(Member(user_id=u, tenant_id=t))
        return out

    def reset(self) -> None:
        for maker in (self.Session, self.Oracle):
            with maker() as s:
                for m in (Note, Doc, Member):
                    s.execute(m.__table__.delete(), execution_options={"shardkit_all_shards": True})
                s.add_all(self.rows())
                s.commit()


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    with cluster_with_tables(sharded_dev, GROUPS, Base.metadata) as cluster:
        admin_url = make_url(sharded_dev.shards[0].primary.url)
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("DROP DATABASE IF EXISTS lc_oracle"))
            c.execute(text("CREATE DATABASE lc_oracle"))
        oracle = create_engine(admin_url.set(database="lc_oracle"))
        Base.metadata.create_all(oracle)
        e = Env(cluster, oracle)
        e.reset()
        try:
            yield e
        finally:
            oracle.dispose()
            with admin.connect() as c:
                c.execute(text("DROP DATABASE IF EXISTS lc_oracle"))
            admin.dispose()


@pytest.fixture
def fresh(env: Env) -> Iterator[Env]:
    yield env
    env.reset()


def tenant_hook(state) -> None:
    """SQLAlchemy's documented recipe: the tenant (Session.info) and soft delete as
    criteria of every ORM statement."""
    tenant = state.session.info.get("tenant")
    if tenant is None or state.is_column_load:
        return
    if state.is_select or state.is_update or state.is_delete:
        state.statement = state.statement.options(
            with_loader_criteria(Doc, lambda cls: cls.tenant_id == tenant, include_aliases=True),
            with_loader_criteria(Note, Note.deleted.is_(False), include_aliases=True),
        )


def both(env: Env, tenant=None):
    s1, s2 = env.Session(), env.Oracle()
    for s in (s1, s2):
        s.info["tenant"] = tenant
        event.listen(s, "do_orm_execute", tenant_hook)
    return s1, s2


def _members_of(user: int):
    return with_loader_criteria(Doc, Doc.tenant_id.in_(select(Member.tenant_id).where(Member.user_id == user)),
                                include_aliases=True)


def _refused_or_equal(env: Env, run) -> None:
    """``run(session)`` on the cluster returns what it returns on one database, or is
    refused naming the criteria."""
    with env.Oracle() as o:
        want = run(o)
    assert want  # the rows exist: an empty answer would be wrong
    with env.Session() as s:
        try:
            got = run(s)
        except ScatterRefused as e:
            assert "with_loader_criteria() of Doc" in str(e) and "lc_members" in str(e), str(e)
            return
    assert got == want


def test_criteria_reading_another_groups_rows_per_statement(env):
    """with_loader_criteria(Doc, Doc.tenant_id IN (SELECT tenant_id FROM members WHERE
    user_id = 1)): each shard would read only its own members, as the same subquery in
    WHERE would (which is refused)."""
    stmt = select(Doc.tenant_id, Doc.id).order_by(Doc.tenant_id, Doc.id).options(_members_of(1))
    _refused_or_equal(env, lambda s: s.execute(stmt).all())
    # Pinned to one tenant's shard, the members are still elsewhere.
    t = env.tenants[1]
    one = select(Doc.id).where(Doc.tenant_id == t).order_by(Doc.id).options(_members_of(1))
    _refused_or_equal(env, lambda s: s.execute(one).all())
    with env.Session() as s:
        with pytest.raises(ScatterRefused):
            s.execute(select(Doc.id).where(
                Doc.tenant_id.in_(select(Member.tenant_id).where(Member.user_id == 1)))).all()


def test_criteria_reading_another_groups_rows_from_a_hook(env):
    """The same criteria added by a do_orm_execute listener (SQLAlchemy's documented
    place for them)."""
    def hook(state):
        if state.is_select and not state.is_column_load:
            state.statement = state.statement.options(_members_of(1))

    def run(sess):
        event.listen(sess, "do_orm_execute", hook)
        return sess.execute(select(Doc.tenant_id, Doc.id).order_by(Doc.tenant_id, Doc.id)).all()
    _refused_or_equal(env, run)


def test_tenant_criteria_from_session_info_read_exactly(env):
    """The tenant recipe: reads merged across shards (ORDER BY/LIMIT, aggregates, GROUP BY,
    joins) and relationship loads equal one database's."""
    t = env.by_shard[env.cluster.shard_names[1]][0]
    s, o = both(env, t)
    with s, o:
        for stmt in (
            select(Doc.id, Doc.score).order_by(Doc.score.desc(), Doc.id).limit(3),
            select(func.count(Doc.id)),
            select(func.count()).select_from(Doc),
            select(func.avg(Doc.score), func.sum(Doc.score)),
            select(Doc.deleted, func.count()).group_by(Doc.deleted).order_by(Doc.deleted),
            select(Note.body).order_by(Note.body).limit(4),
            select(Doc.id, Note.body).join(Doc.notes).order_by(Note.body).limit(5),
        ):
            assert s.execute(stmt).all() == o.execute(stmt).all(), str(stmt)

        def shape(sess, opt):
            docs = sess.scalars(select(Doc).options(*opt).order_by(Doc.id)).all()
            return [(d.id, [n.body for n in d.notes]) for d in docs]
        for opt in ((), (selectinload(Doc.notes),)):
            assert shape(s, opt) == shape(o, opt)


def test_tenant_criteria_on_a_keyless_update_of_every_shard(fresh):
    env = fresh
    t = env.by_shard[env.cluster.shard_names[1]][0]
    s, o = both(env, t)
    with s, o:
        stmt = update(Doc).values(score=Doc.score + 100)
        r1 = s.execute(stmt, execution_options={"shardkit_all_shards": True})
        r2 = o.execute(stmt)
        assert r1.rowcount == r2.rowcount == 5
        s.commit()
        o.commit()
    with env.Session() as s, env.Oracle() as o:
        q = select(Doc.tenant_id, Doc.id, Doc.score).order_by(Doc.tenant_id, Doc.id)
        assert s.execute(q).all() == o.execute(q).all()


def test_routing_options_set_in_a_hook_are_not_ignored(env):
    """A do_orm_execute listener that names a shard (update_execution_options) runs after
    shardkit has routed the statement: honoured, or refused saying where to set it, never
    silently read from every shard."""
    sh = env.cluster.shard_names[1]

    def hook(state):
        state.update_execution_options(shardkit_shard=sh)
    with env.Session() as s:
        event.listen(s, "do_orm_execute", hook)
        try:
            got = s.execute(select(Doc.tenant_id).distinct()).scalars().all()
        except RoutingError as e:
            assert "do_orm_execute" in str(e) and "shardkit_shard" in str(e), str(e)
            return
        assert sorted(got) == env.by_shard[sh]
