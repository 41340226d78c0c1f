"""Every common way application code sets or changes a shard key
late (mapper and session events, validators, hybrids, __init__, column defaults, identity
columns, colocated children through a parent, merge(), bulk_save_objects()): the row lands
on the shard cluster.shard_for() names, read on each shard's primary, or the write is
refused saying why, with nothing written."""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables, truncate_everywhere
from sqlalchemy import BigInteger, ForeignKey, Identity, MetaData, Sequence, String, event, select, text, update
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship, sessionmaker, validates

import shardkit
from shardkit.errors import CrossShardWriteError, ShardKeyError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Acct(Base):
    __tablename__ = "hk_accts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(String(40), default="")


class Defaulted(Base):
    """A key with a scalar default, which a listener may override."""
    __tablename__ = "hk_defaulted"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger, default=1)
    note: Mapped[str] = mapped_column(String(40), default="")


class Lowered(Base):
    __tablename__ = "hk_lowered"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(String(40))

    @validates("owner")
    def _lower(self, key, value):
        return value.lower()


class Numbered(Base):
    __tablename__ = "hk_numbered"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)

    @validates("tenant_id")
    def _to_int(self, key, value):
        return int(value)


class Hybrid(Base):
    __tablename__ = "hk_hybrid"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    _tenant: Mapped[int] = mapped_column("tenant_id", BigInteger)

    @hybrid_property
    def tenant(self):
        return self._tenant

    @tenant.inplace.setter
    def _tenant_setter(self, value):
        self._tenant = int(str(value).removeprefix("t-"))


class Inited(Base):
    __tablename__ = "hk_inited"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)

    def __init__(self, id, tenant="1"):
        super().__init__(id=id, tenant_id=int(tenant) * 1)


class IdentKey(Base):
    __tablename__ = "hk_identkey"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)


class SeqKey(Base):
    __tablename__ = "hk_seqkey"
    id: Mapped[int] = mapped_column(BigInteger, Sequence("hk_seqkey_seq"), primary_key=True)


# The key an UPDATE's onupdate gives (a test sets it).
NEXT_KEY = [1]


class OnUpdate(Base):
    """A key column with an onupdate: each UPDATE would give the row a new key."""
    __tablename__ = "hk_onupdate"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger, onupdate=lambda: NEXT_KEY[0])
    note: Mapped[str] = mapped_column(String(40), default="")


class Org(Base):
    __tablename__ = "hk_orgs"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    members: Mapped[list[Member]] = relationship(back_populates="org")
    # one-directional: the child has no relationship back
    badges: Mapped[list[Badge]] = relationship()


class Member(Base):
    __tablename__ = "hk_members"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("hk_orgs.tenant_id"))
    org: Mapped[Org | None] = relationship(back_populates="members")


class Badge(Base):
    __tablename__ = "hk_badges"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("hk_orgs.tenant_id"))


TABLES = ["hk_accts", "hk_defaulted", "hk_lowered", "hk_numbered", "hk_hybrid", "hk_inited",
          "hk_identkey", "hk_seqkey", "hk_onupdate", "hk_badges", "hk_members", "hk_orgs"]


@pytest.fixture(scope="module")
def env(sharded_dev):
    config = {"groups": {
        "tenants": {"tables": {"hk_accts": "tenant_id", "hk_defaulted": "tenant_id",
                               "hk_numbered": "tenant_id", "hk_hybrid": "tenant_id",
                               "hk_inited": "tenant_id", "hk_onupdate": "tenant_id",
                               "hk_orgs": "tenant_id", "hk_members": "tenant_id",
                               "hk_badges": "tenant_id"}},
        "owners": {"tables": {"hk_lowered": "owner"}},
        "misc": {"tables": {"hk_identkey": "id", "hk_seqkey": "id"}},
    }}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


@pytest.fixture
def cl(env):
    cluster, _ = env
    truncate_everywhere(cluster, *TABLES)
    return env


def rows_by_shard(cluster, table, cols="*"):
    out = {}
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            out[s] = sorted(tuple(r) for r in c.execute(text(f"SELECT {cols} FROM {table}")))
    return out


def nothing_in(cluster, *tables):
    return all(not r for t in tables for r in rows_by_shard(cluster, t).values())


def placed_right(cluster, table, key_col, lookup=None):
    """Every row of ``table`` is on the shard its key names (and there is at least one)."""
    n = 0
    for shard, rows in rows_by_shard(cluster, table, key_col).items():
        for (k,) in rows:
            n += 1
            assert cluster.shard_for(lookup or table, k) == shard, (table, k, shard)
    assert n


def two_tenants(cluster, table="hk_accts"):
    """Two tenant ids on different shards."""
    a = 1
    b = next(k for k in range(2, 1000) if cluster.shard_for(table, k) != cluster.shard_for(table, a))
    return a, b


@pytest.fixture
def listener():
    added = []

    def listen(target, name, fn, **kw):
        event.listen(target, name, fn, **kw)
        added.append((target, name, fn))
    listen.added = added
    yield listen
    for target, name, fn in added:
        event.remove(target, name, fn)


# -- mapper and session events ---------------------------------------------------------


def test_a_key_set_only_in_before_insert_is_refused_naming_the_listener(cl, listener):
    cluster, Session = cl
    a, _ = two_tenants(cluster)
    listener(Acct, "before_insert", lambda m, c, t: setattr(t, "tenant_id", a))
    with Session() as s:
        s.add(Acct(id=1))
        with pytest.raises(ShardKeyError) as err:
            s.commit()
        assert "before_insert" in str(err.value) and "before_flush" in str(err.value)
    assert nothing_in(cluster, "hk_accts")


@pytest.mark.parametrize("where", ["class", "base_propagate", "all_mappers"])
def test_a_before_insert_moving_a_defaulted_key_is_refused_wherever_it_listens(cl, listener, where):
    cluster, Session = cl
    _, b = two_tenants(cluster, "hk_defaulted")

    def move(mapper, conn, target):
        if isinstance(target, Defaulted):
            target.tenant_id = b
    target = {"class": Defaulted, "base_propagate": Base, "all_mappers": Mapper}[where]
    listener(target, "before_insert", move, **({"propagate": True} if where == "base_propagate" else {}))
    with Session() as s:
        s.add(Defaulted(id=1))
        with pytest.raises(CrossShardWriteError, match="changed during the flush"):
            s.commit()
    assert nothing_in(cluster, "hk_defaulted")


def test_before_flush_setting_and_changing_keys(cl, listener):
    cluster, Session = cl
    a, b = two_tenants(cluster)

    def fill(session, ctx, instances):
        for o in session.new:
            if isinstance(o, Acct) and o.tenant_id is None:
                o.tenant_id = b
    listener(Session, "before_flush", fill)
    with Session() as s:
        s.add_all([Acct(id=1), Acct(id=2, tenant_id=a)])
        s.commit()
    assert rows_by_shard(cluster, "hk_accts", "id, tenant_id")[cluster.shard_for("hk_accts", b)] == [(1, b)]
    placed_right(cluster, "hk_accts", "tenant_id")

    # A session before_flush that moves a persistent row's key: refused (shardkit's own
    # before_flush may have run first).
    def move(session, ctx, instances):
        for o in session.dirty:
            if isinstance(o, Acct):
                o.tenant_id = b
    listener(Session, "before_flush", move)
    with Session() as s:
        s.scalars(select(Acct).where(Acct.tenant_id == a)).one().note = "x"
        with pytest.raises(CrossShardWriteError):
            s.commit()
    placed_right(cluster, "hk_accts", "tenant_id")


# -- set at assignment: validators, hybrids, __init__ ---------------------------------


def test_validators_hybrids_and_init_route_by_the_value_they_store(cl):
    cluster, Session = cl
    with Session() as s:
        s.add_all([Lowered(id=i, owner=f"OWNER-{i}") for i in range(20)])
        s.add_all([Numbered(id=i, tenant_id=str(i)) for i in range(20)])
        s.add_all([Hybrid(id=i, tenant=f"t-{i}") for i in range(20)])
        s.add_all([Inited(id=i, tenant=str(i)) for i in range(20)])
        s.commit()
    for table, col in [("hk_lowered", "owner"), ("hk_numbered", "tenant_id"),
                       ("hk_hybrid", "tenant_id"), ("hk_inited", "tenant_id")]:
        placed_right(cluster, table, col)
    with Session() as s:
        assert s.scalars(select(Lowered.id).where(Lowered.owner == "owner-3")).all() == [3]
        assert s.get(Numbered, 4).tenant_id == 4


@pytest.mark.parametrize("model", [IdentKey, SeqKey], ids=["identity", "sequence"])
def test_a_key_the_database_makes_is_refused(cl, model):
    cluster, Session = cl
    with Session() as s:
        s.add(model())
        with pytest.raises(ShardKeyError, match="comes after the shard is chosen"):
            s.commit()
    assert nothing_in(cluster, model.__tablename__)


# -- colocated children ----------------------------------------------------------------


def test_children_without_a_key_follow_their_parent(cl):
    cluster, Session = cl
    with Session() as s:
        for t in range(1, 15):
            s.add(Org(tenant_id=t, members=[Member(id=t * 10 + i) for i in range(2)],
                      badges=[Badge(id=t * 10 + i) for i in range(2)]))
        s.commit()
    placed_right(cluster, "hk_members", "tenant_id", "hk_orgs")
    placed_right(cluster, "hk_badges", "tenant_id", "hk_orgs")


@pytest.mark.parametrize("how", ["backref", "collection", "one_directional"])
def test_a_child_moved_to_a_parent_on_another_shard_is_refused(cl, how):
    cluster, Session = cl
    a, b = two_tenants(cluster, "hk_orgs")
    with Session() as s:
        s.add_all([Org(tenant_id=a, members=[Member(id=1)], badges=[Badge(id=1)]), Org(tenant_id=b)])
        s.commit()
    with Session() as s:
        oa, ob = s.get(Org, a), s.get(Org, b)
        if how == "backref":
            oa.members[0].org = ob
        elif how == "collection":
            ob.members.append(oa.members[0])
        else:
            ob.badges.append(oa.badges[0])
        with pytest.raises(CrossShardWriteError):
            s.commit()
    assert rows_by_shard(cluster, "hk_members", "id, tenant_id")[cluster.shard_for("hk_orgs", a)] == [(1, a)]
    assert rows_by_shard(cluster, "hk_badges", "id, tenant_id")[cluster.shard_for("hk_orgs", a)] == [(1, a)]
    placed_right(cluster, "hk_members", "tenant_id", "hk_orgs")
    placed_right(cluster, "hk_badges", "tenant_id", "hk_orgs")


def test_a_new_child_moved_between_new_parents_follows_the_last(cl):
    cluster, Session = cl
    a, b = two_tenants(cluster, "hk_orgs")
    with Session() as s:
        oa, ob = Org(tenant_id=a), Org(tenant_id=b)
        m = Member(id=1, org=oa)
        s.add_all([oa, ob, m])
        m.org = ob
        bd = Badge(id=1)
        oa.badges.append(bd)
        oa.badges.remove(bd)
        ob.badges.append(bd)
        s.commit()
    assert rows_by_shard(cluster, "hk_members", "id, tenant_id")[cluster.shard_for("hk_orgs", b)] == [(1, b)]
    assert rows_by_shard(cluster, "hk_badges", "id, tenant_id")[cluster.shard_for("hk_orgs", b)] == [(1, b)]


def test_a_child_of_a_parent_keyed_in_before_insert_is_refused(cl, listener):
    cluster, Session = cl
    a, _ = two_tenants(cluster, "hk_orgs")
    listener(Org, "before_insert", lambda m, c, t: setattr(t, "tenant_id", a))
    with Session() as s:
        s.add(Org(members=[Member(id=1)], badges=[Badge(id=2)]))
        with pytest.raises(ShardKeyError):
            s.commit()
    assert nothing_in(cluster, "hk_orgs", "hk_members", "hk_badges")


# -- merge, bulk -----------------------------------------------------------------------


def test_merge_of_a_new_object_keyed_in_an_event(cl, listener):
    cluster, Session = cl
    a, b = two_tenants(cluster)
    listener(Acct, "before_insert", lambda m, c, t: setattr(t, "tenant_id", a))
    with Session() as s:
        s.merge(Acct(id=1))
        with pytest.raises(ShardKeyError):
            s.commit()
    assert nothing_in(cluster, "hk_accts")
    event.remove(Acct, "before_insert", listener.added[-1][2])
    del listener.added[-1]

    def fill(session, ctx, instances):
        for o in session.new:
            if isinstance(o, Acct) and o.tenant_id is None:
                o.tenant_id = b
    listener(Session, "before_flush", fill)
    with Session() as s:
        s.merge(Acct(id=2))
        s.commit()
    assert rows_by_shard(cluster, "hk_accts", "id, tenant_id")[cluster.shard_for("hk_accts", b)] == [(2, b)]


def test_bulk_save_objects_fires_no_events(cl, listener):
    cluster, Session = cl
    a, b = two_tenants(cluster, "hk_defaulted")
    listener(Acct, "before_insert", lambda m, c, t: setattr(t, "tenant_id", a))
    listener(Defaulted, "before_insert", lambda m, c, t: setattr(t, "tenant_id", b))
    with Session() as s:
        with pytest.raises(ShardKeyError) as err:
            s.bulk_save_objects([Acct(id=1)])
        assert "runs no mapper listeners" in " ".join(getattr(err.value, "__notes__", ()))
        s.rollback()
    assert nothing_in(cluster, "hk_accts")
    with Session() as s:
        # No listener runs, as in SQLAlchemy; a key left to the column's default is refused
        # too (shardkit makes it only for session.add()).
        with pytest.raises(ShardKeyError) as err:
            s.bulk_save_objects([Defaulted(id=1)])
        assert "runs no mapper listeners" in " ".join(getattr(err.value, "__notes__", ()))
        s.rollback()
        s.bulk_save_objects([Defaulted(id=2, tenant_id=a)])
        s.commit()
    placed_right(cluster, "hk_defaulted", "tenant_id")


# -- onupdate on a key column ---------------------------------------------------------


def test_an_onupdate_on_a_key_column_never_rekeys_a_row_on_the_wrong_shard(cl, listener):
    """SQLAlchemy makes a Python onupdate's value at the UPDATE, on the connection the
    flush chose by the row's old key: a value owned by another shard left the row where
    no keyed read finds it.  The flush now fails (nothing written); one that keeps the
    row on its shard is left alone.  A statement's UPDATE that leaves the key to its
    onupdate is refused (its value is not known before it runs)."""
    cluster, Session = cl
    a, b = two_tenants(cluster, "hk_onupdate")
    a2 = next(k for k in range(b + 1, 1000) if cluster.shard_for("hk_onupdate", k) == cluster.shard_for("hk_onupdate", a))
    with Session() as s:
        s.add(OnUpdate(id=1, tenant_id=a))
        s.commit()
    for listened in (False, True):
        if listened:  # (with a before_update listener of the application's that leaves the key)
            listener(OnUpdate, "before_update", lambda m, c, t: None)
        NEXT_KEY[0] = b
        with Session() as s:
            s.scalars(select(OnUpdate).where(OnUpdate.tenant_id == a)).one().note = "x"
            with pytest.raises(CrossShardWriteError, match="onupdate="):
                s.commit()
        assert rows_by_shard(cluster, "hk_onupdate", "id, tenant_id, note")[cluster.shard_for("hk_onupdate", a)] \
            == [(1, a, "")]
        placed_right(cluster, "hk_onupdate", "tenant_id")
    NEXT_KEY[0] = a2
    with Session() as s:
        s.scalars(select(OnUpdate).where(OnUpdate.tenant_id == a)).one().note = "y"
        s.commit()
    assert rows_by_shard(cluster, "hk_onupdate", "id, tenant_id, note")[cluster.shard_for("hk_onupdate", a)] \
        == [(1, a2, "y")]
    NEXT_KEY[0] = b
    with Session() as s:
        for stmt, params in [
                (update(OnUpdate).where(OnUpdate.tenant_id == a2).values(note="z"), None),
                (update(OnUpdate).where(OnUpdate.id == 1).values(note="z")
                 .execution_options(shardkit_all_shards=True), None),
                (update(OnUpdate.__table__).where(OnUpdate.tenant_id == a2), {"note": "z"})]:
            with pytest.raises(CrossShardWriteError, match="onupdate="):
                s.execute(stmt, params)
        s.rollback()
        # Given the key (its own value), it runs.
        s.execute(update(OnUpdate).where(OnUpdate.tenant_id == a2).values(note="w", tenant_id=a2))
        s.commit()
    assert rows_by_shard(cluster, "hk_onupdate", "id, tenant_id, note")[cluster.shard_for("hk_onupdate", a)] \
        == [(1, a2, "w")]
    placed_right(cluster, "hk_onupdate", "tenant_id")
    # A bulk UPDATE by primary key carries the key: its onupdate does not apply.
    with Session() as s:
        s.execute(update(OnUpdate), [{"id": 1, "tenant_id": a2, "note": "v"}])
        s.commit()
    assert rows_by_shard(cluster, "hk_onupdate", "id, tenant_id, note")[cluster.shard_for("hk_onupdate", a)] \
        == [(1, a2, "v")]
