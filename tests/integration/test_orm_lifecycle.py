"""ORM lifecycle APIs through ShardedSession, as a demanding SQLAlchemy 2.x user calls
them: merge() of detached and transient objects, refresh()/get() with locks, expiry,
make_transient*, subclasses with their own listeners, sessionmaker arguments,
connection(), text(), the legacy bulk methods, and close()/reset()/rollback() giving
every shard's connections back."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import BigInteger, event, inspect, select, text
from sqlalchemy.orm import (DeclarativeBase, Mapped, make_transient, make_transient_to_detached,
                            mapped_column, relationship, scoped_session, sessionmaker)

import shardkit
from models import Country, Order, User
from own_tables import cluster_with_tables
from replica_env import replayed
from shardkit import ShardedSession

pytestmark = pytest.mark.integration


def _checked_out(cluster):
    """Every engine of the cluster with connections checked out: {(shard, role, i): n}."""
    out = {}
    for key, eng in list(cluster._engines.items()):
        n = eng.pool.checkedout()
        if n:
            out[key] = n
    return out


def _uids_on_two_shards(cluster):
    by = {}
    for uid in range(1, 200):
        by.setdefault(cluster.shard_for(User, uid), uid)
        if len(by) == 3:
            break
    (a, ua), (b, ub) = sorted(by.items())[:2]
    return a, ua, b, ub


def _rows(sharded, shard, sql):
    with sharded.cluster.primary(shard).connect() as c:
        return [tuple(r) for r in c.execute(text(sql))]


@pytest.fixture
def two(sharded):
    a, ua, b, ub = _uids_on_two_shards(sharded.cluster)
    with sharded.Session() as s:
        s.add_all([User(id=ua, name="a"), User(id=ub, name="b"),
                   Order(id=5, user_id=ua, amount=1), Order(id=5, user_id=ub, amount=2)])
        s.commit()
    # The tests read these rows in sessions of their own, some on replicas: wait for them.
    replayed(sharded.dev)
    return a, ua, b, ub


# -- merge ---------------------------------------------------------------------------


@pytest.mark.parametrize("load", [True, False])
def test_merge_detached_from_shard_a_updates_it_there(sharded, two, load):
    a, ua, b, ub = two
    with sharded.Session() as s:
        o = s.get(Order, 5, identity_token=a)
    if load:
        o.amount = 50
    with sharded.Session() as s:
        m = s.merge(o, load=load) if load else s.merge(_clean(o), load=False)
        assert inspect(m).key[2] == a
        if not load:
            m.amount = 50
        s.commit()
    assert _rows(sharded, a, "SELECT id, amount FROM orders") == [(5, 50)]
    assert _rows(sharded, b, "SELECT id, amount FROM orders") == [(5, 2)]


def _clean(o):
    # merge(load=False) wants an object without pending changes
    st = inspect(o)
    st._commit_all(st.dict)
    return o


def test_merge_transient_keyed_on_b_while_a_is_held(sharded, two):
    a, ua, b, ub = two
    with sharded.Session() as s:
        held = s.get(Order, 5, identity_token=a)
        m = s.merge(Order(id=5, user_id=ub, amount=99))
        assert m is not held
        assert s.identity_key(instance=m)[2] == b
        s.commit()
    assert _rows(sharded, a, "SELECT id, amount FROM orders") == [(5, 1)]
    assert _rows(sharded, b, "SELECT id, amount FROM orders") == [(5, 99)]


# -- refresh / get with locks ----------------------------------------------------------


def _roles(cluster):
    seen = []
    hooks = []
    for (shard, role, i), eng in list(cluster._engines.items()):
        def f(*a, shard=shard, role=role):
            seen.append((shard, role, a[2].split()[0]))
        event.listen(eng, "before_cursor_execute", f)
        hooks.append((eng, f))
    return seen, hooks


def test_refresh_for_update_runs_on_primary(sharded, two):
    a, ua, b, ub = two
    S = sessionmaker(class_=ShardedSession, cluster=sharded.cluster)  # replica reads
    with S() as s:
        u = s.get(User, ua)
        seen, hooks = _roles(sharded.cluster)
        try:
            s.refresh(u, with_for_update=True)
            u2 = s.get(User, ub, with_for_update=True)
            assert u2.name == "b"
        finally:
            for eng, f in hooks:
                event.remove(eng, "before_cursor_execute", f)
        sel = [x for x in seen if x[2] == "SELECT"]
        assert sel and all(r == "primary" for _, r, _ in sel), seen


# -- sessionmaker arguments, subclasses ---------------------------------------------


def test_sessionmaker_arguments(sharded, two):
    a, ua, b, ub = two
    S = sessionmaker(class_=ShardedSession, cluster=sharded.cluster, expire_on_commit=False,
                     autoflush=False)
    with S() as s:
        u = s.get(User, ua)
        u.name = "changed"
        s.add(Order(id=6, user_id=ua))
        # autoflush=False: the query does not see the pending order
        assert s.scalars(select(Order).where(Order.user_id == ua)).all()[0].id == 5
        s.commit()
        assert "name" in u.__dict__
    assert _rows(sharded, a, "SELECT name FROM users") == [("changed",)]


def test_subclass_listeners_coexist(sharded, two):
    a, ua, b, ub = two
    calls = []

    class MySession(ShardedSession):
        pass

    @event.listens_for(MySession, "do_orm_execute")
    def _doe(state):
        calls.append(("exec", state.is_select))

    @event.listens_for(MySession, "before_flush")
    def _bf(session, ctx, instances):
        calls.append("flush")
        for obj in list(session.new):
            if isinstance(obj, User) and obj.name == "auto":
                session.add(Order(id=900, user_id=obj.id))

    S = sessionmaker(class_=MySession, cluster=sharded.cluster)
    with S() as s:
        s.add(User(id=ub + 300 * 0 + 1000, name="auto"))
        s.commit()
        assert s.get(User, ua).name == "a"
    assert "flush" in calls and ("exec", True) in calls
    shard = sharded.cluster.shard_for(User, ub + 1000)
    assert _rows(sharded, shard, "SELECT id FROM orders WHERE id = 900") == [(900,)]


# -- connection() / text() -----------------------------------------------------------


def test_connection_without_shard_is_clear(sharded):
    with sharded.Session() as s:
        with pytest.raises(shardkit.RoutingError, match="shard"):
            s.connection()
        c = s.connection(bind_arguments={"shard_id": "s1"})
        assert c.execute(text("SELECT 1")).scalar() == 1


def test_text_without_shard_is_clear(sharded):
    with sharded.Session() as s:
        with pytest.raises(shardkit.RoutingError, match="shardkit_shard=.*shardkit_all_shards=True"):
            s.execute(text("SELECT 1"))
        assert s.execute(text("SELECT 1"), execution_options={"shardkit_shard": "s0"}).scalar() == 1


# -- bulk -------------------------------------------------------------------------------


def test_bulk_methods_across_shards(sharded, two):
    a, ua, b, ub = two
    with sharded.Session() as s:
        s.bulk_insert_mappings(Order, [{"id": 10, "user_id": ua, "amount": 1},
                                       {"id": 10, "user_id": ub, "amount": 2}])
        s.bulk_update_mappings(Order, [{"id": 10, "user_id": ua, "amount": 11},
                                       {"id": 10, "user_id": ub, "amount": 22}])
        objs = s.scalars(select(Order).where(Order.id == 5)).all()
        for o in objs:
            o.amount += 100
        s.bulk_save_objects(objs + [Order(id=11, user_id=ua), Order(id=11, user_id=ub)])
        s.commit()
    assert sorted(_rows(sharded, a, "SELECT id, amount FROM orders")) == [(5, 101), (10, 11), (11, 0)]
    assert sorted(_rows(sharded, b, "SELECT id, amount FROM orders")) == [(5, 102), (10, 22), (11, 0)]


# -- connections given back --------------------------------------------------------------


@pytest.mark.parametrize("end", ["close", "reset", "rollback", "commit"])
def test_end_gives_every_connection_back(sharded, two, end):
    a, ua, b, ub = two
    S = sessionmaker(class_=ShardedSession, cluster=sharded.cluster)
    s = S()
    s.get(User, ua)
    s.get(User, ub)
    s.scalars(select(User)).all()
    s.scalars(select(Order).execution_options(yield_per=1)).first()
    s.get(User, ua).name = "x"
    s.flush()
    r = s.execute(select(Order).order_by(Order.id))
    r.fetchone()
    assert _checked_out(sharded.cluster)
    getattr(s, end)()
    assert _checked_out(sharded.cluster) == {}
    s.close()


def test_scoped_session_scope_in_threads(sharded, two):
    a, ua, b, ub = two
    reg = scoped_session(sessionmaker(class_=ShardedSession, cluster=sharded.cluster))
    out = {}

    def work(shard):
        with shardkit.scope(shard=shard):
            out[shard] = sorted(reg.scalars(select(Order.user_id)).all())
        reg.remove()

    ts = [threading.Thread(target=work, args=(x,)) for x in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == {a: [ua], b: [ub]}
    assert _checked_out(sharded.cluster) == {}


# -- scopes, listeners, failures, make_transient*, reference rows -------------------------


def test_refresh_and_expired_inside_other_shard_scope(sharded, two):
    a, ua, b, ub = two
    with sharded.Session() as s:
        o = s.get(Order, 5, identity_token=a)
        with shardkit.scope(shard=b):
            s.refresh(o)
            assert o.user_id == ua
            s.expire(o)
            assert o.amount == 1 and o.user_id == ua
            assert o.user.id == ua


def test_subclass_before_flush_moving_a_key_is_refused(sharded, two):
    a, ua, b, ub = two

    class MySession(ShardedSession):
        pass

    @event.listens_for(MySession, "before_flush")
    def _bf(session, ctx, instances):
        for obj in list(session.dirty):
            if isinstance(obj, Order):
                obj.user_id = ub

    S = sessionmaker(class_=MySession, cluster=sharded.cluster)
    with S() as s:
        o = s.get(Order, 5, identity_token=a)
        o.amount = 3
        with pytest.raises(shardkit.ShardkitError):
            s.commit()
    assert _rows(sharded, a, "SELECT id, user_id, amount FROM orders") == [(5, ua, 1)]


def test_failed_flush_then_rollback_gives_connections_back(sharded, two):
    a, ua, b, ub = two
    S = sessionmaker(class_=ShardedSession, cluster=sharded.cluster)
    s = S()
    s.scalars(select(User)).all()
    s.add(Order(id=77, user_id=ua))
    s.add(Order(id=5, user_id=ub))  # duplicate on b
    with pytest.raises(Exception):
        s.flush()
    s.rollback()
    assert _checked_out(sharded.cluster) == {}
    s.close()


def test_make_transient_to_detached_then_add_and_update(sharded, two):
    a, ua, b, ub = two
    with sharded.Session() as s:
        o = Order(id=5, user_id=ub, amount=2)
        make_transient_to_detached(o)
        s.add(o)
        assert inspect(o).key[2] == b
        o.amount = 222
        s.commit()
    assert _rows(sharded, b, "SELECT id, amount FROM orders") == [(5, 222)]
    assert _rows(sharded, a, "SELECT id, amount FROM orders") == [(5, 1)]
    with sharded.Session() as s:
        o = s.get(Order, 5, identity_token=a)
        s.expunge(o)
        make_transient(o)
        o.id = 6
        o.user_id = ub
        s.add(o)
        s.commit()
    assert sorted(_rows(sharded, b, "SELECT id FROM orders")) == [(5,), (6,)]


def test_reference_merge_reaches_every_shard(sharded):
    with sharded.Session() as s:
        s.add(Country(code="fr", name="France"))
        s.commit()
    with sharded.Session() as s:
        c = s.get(Country, "fr")
    c.name = "Francia"
    with sharded.Session() as s:
        s.merge(c)
        s.commit()
    with sharded.Session() as s:
        s.merge(Country(code="fr", name="Frankreich"))
        s.commit()
    for sh in sharded.cluster.shard_names:
        assert _rows(sharded, sh, "SELECT name FROM countries") == [("Frankreich",)]
    with sharded.Session() as s:
        s.bulk_save_objects([Country(code="de", name="D")])
        c = s.get(Country, "fr")
        c.name = "F2"
        s.bulk_save_objects([c])
        s.bulk_update_mappings(Country, [{"code": "de", "name": "D2"}])
        s.commit()
    for sh in sharded.cluster.shard_names:
        assert sorted(_rows(sharded, sh, "SELECT code, name FROM countries")) == [("de", "D2"), ("fr", "F2")]


def test_expire_after_commit_reads_own_write_on_replica_session(sharded, two):
    a, ua, b, ub = two
    S = sessionmaker(class_=ShardedSession, cluster=sharded.cluster, consistency="read_your_writes")
    with S() as s:
        u = s.get(User, ua)
        u.name = "ryw"
        s.commit()
        assert u.name == "ryw"
        s.expire(u)
        assert u.name == "ryw"
        assert s.get(User, ua, populate_existing=True).name == "ryw"


def _order_rekeyed(sharded, a, ub):
    """Order 5 of shard a, made transient, given user ub's key (shard b) and detached again."""
    with sharded.Session() as s:
        o = s.get(Order, 5, identity_token=a)
        s.expunge(o)
    make_transient(o)
    o.user_id = ub  # now the order 5 of user ub, on b
    o.amount = 2
    make_transient_to_detached(o)
    return o


@pytest.mark.parametrize("how", ["add", "merge", "merge_noload", "delete"])
def test_transient_to_detached_with_another_shards_key_is_not_written_on_the_old_shard(
        sharded, two, how):
    """make_transient() keeps the object's old identity_token and make_transient_to_detached()
    keys the object with it: an object given another shard's key meanwhile was attached
    (and updated, or deleted) on its old shard, over the row of the same id there."""
    a, ua, b, ub = two
    o = _order_rekeyed(sharded, a, ub)
    with sharded.Session() as s:
        with pytest.raises(shardkit.RoutingError, match=f"keyed to shard {a}.*places it on {b}"):
            if how == "add":
                s.add(o)
            elif how == "merge":
                s.merge(o)
            elif how == "merge_noload":
                s.merge(o, load=False)
            else:
                s.delete(o)
        s.commit()
    assert _rows(sharded, a, "SELECT id, user_id, amount FROM orders") == [(5, ua, 1)]
    assert _rows(sharded, b, "SELECT id, user_id, amount FROM orders") == [(5, ub, 2)]
    # The way out the error names: the object is then keyed where its key belongs.
    make_transient(o)
    inspect(o).identity_token = None
    make_transient_to_detached(o)
    with sharded.Session() as s:
        s.add(o)
        assert inspect(o).key[2] == b
        o.amount = 333
        s.commit()
    assert _rows(sharded, a, "SELECT id, user_id, amount FROM orders") == [(5, ua, 1)]
    assert _rows(sharded, b, "SELECT id, user_id, amount FROM orders") == [(5, ub, 333)]


def test_detached_objects_keep_their_shard(sharded, two):
    """Unaffected: a detached object re-added, merged (with and without load), or given a
    pending key change (refused at the flush, as a move)."""
    a, ua, b, ub = two
    with sharded.Session() as s:
        o = s.get(Order, 5, identity_token=b)
        u = s.get(User, ua)
    with sharded.Session() as s:
        s.add(o)
        s.add(u)
        o.amount = 20
        s.commit()
    assert _rows(sharded, b, "SELECT id, amount FROM orders") == [(5, 20)]
    with sharded.Session() as s:
        o = s.get(Order, 5, identity_token=b)
    o.user_id = ua
    with sharded.Session() as s:
        s.add(o)
        with pytest.raises(shardkit.CrossShardWriteError):
            s.commit()


# -- objects attached by merge(load=False) load what relates to them on their shard ------


class _Base(DeclarativeBase):
    pass


class _Project(_Base):  # a tenant's project; its id is unique per shard only
    __tablename__ = "olc_projects"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    tasks = relationship("_Task", primaryjoin="_Project.id == foreign(_Task.project_id)",
                         viewonly=True, info={"shardkit_colocated": True}, order_by="_Task.id")


class _Task(_Base):
    __tablename__ = "olc_tasks"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    project_id: Mapped[int] = mapped_column(BigInteger)
    project = relationship("_Project", primaryjoin="foreign(_Task.project_id) == _Project.id",
                           viewonly=True, info={"shardkit_colocated": True})


@pytest.fixture
def tenants(shardkit_dev_cluster):
    cfg = {"groups": {"tenants": {"tables": {"olc_projects": "tenant_id", "olc_tasks": "tenant_id"}}}}
    with cluster_with_tables(shardkit_dev_cluster, cfg, _Base.metadata) as cluster:
        by = {}
        for t in range(1, 200):
            by.setdefault(cluster.shard_for(_Project, t), t)
        (a, ta), (b, tb) = sorted(by.items())[:2]
        S = sessionmaker(class_=ShardedSession, cluster=cluster)
        with S() as s:
            s.add_all([_Project(id=1, tenant_id=ta), _Project(id=1, tenant_id=tb),
                       _Task(id=10, tenant_id=ta, project_id=1), _Task(id=10, tenant_id=tb, project_id=1),
                       _Task(id=11, tenant_id=tb, project_id=1)])
            s.commit()
        replayed(shardkit_dev_cluster)  # (read back in new sessions, from replicas)
        yield cluster, S, a, ta, b, tb


@pytest.mark.parametrize("held", [False, True])
def test_merge_load_false_object_lazy_loads_on_its_shard(tenants, held):
    """merge(load=False) keys its copy with the given object's shard but leaves its
    identity_token unset, which shardkit read to pin the lazy loads of a relationship
    said to be colocated (info shardkit_colocated) to the object's shard: they read every
    shard (MultipleResultsFound, or another shard's rows of that id)."""
    cluster, S, a, ta, b, tb = tenants
    with S() as s:
        task = s.get(_Task, 10, identity_token=b)
        project = s.get(_Project, 1, identity_token=b)
        s.expunge_all()
    with S() as s:
        if held:
            s.get(_Project, 1, identity_token=a)
        m = s.merge(task, load=False)
        assert inspect(m).key[2] == b
        assert m.project.tenant_id == tb  # (many-to-one by the project's id)
        p = s.merge(project, load=False)
        assert [(t.id, t.tenant_id) for t in p.tasks] == [(10, tb), (11, tb)]
