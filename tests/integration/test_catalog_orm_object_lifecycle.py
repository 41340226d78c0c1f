"""ORM object lifecycle with a catalog (rebalancing mode: the ownership guard on
each shard).  A table whose primary key does not hold the shard key (``notes``: id, keyed
by tenant_id) may have the same id on two shards: an object keyed to the wrong one must
not be written over the other shard's row of that id, which the guard lets through (that
shard owns it).  One 2-shard cluster for the module; one bucket move shared by the tests
of objects loaded before a move."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import BigInteger, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, make_transient, make_transient_to_detached, mapped_column

import shardkit
from movers import guarded_cluster
from test_stale_writes import _apply_map, _sessions

pytestmark = pytest.mark.integration

BUCKETS = 16


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(String(40), default="")


GROUPS = {"groups": {"tenants": {"strategy": "hash", "tables": {"notes": "tenant_id"}}}}

_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)
    cfg_path = tmp_path_factory.mktemp("lifecycle") / "shardkit.toml"
    cluster = guarded_cluster(dev, Base.metadata, GROUPS, cfg_path)
    live = cluster.config.bucket_map
    by_shard = {s: [t for t in range(1, 500) if live[shardkit.bucket_for(t, BUCKETS)] == s] for s in ("s0", "s1")}
    # Tenants of one s0 bucket move to s1 (see ``moved``); the others stay.
    moving_bucket = shardkit.bucket_for(by_shard["s0"][0], BUCKETS)
    movers = [t for t in by_shard["s0"] if shardkit.bucket_for(t, BUCKETS) == moving_bucket]
    w = SimpleNamespace(dev=dev, cluster=cluster, Session=_sessions(cluster),
                        s0=[t for t in by_shard["s0"] if t not in movers], s1=by_shard["s1"],
                        movers=movers, moving_bucket=moving_bucket, live=live)
    yield w
    cluster.dispose()


def _rows(w, note_id):
    """{shard: [(tenant_id, body)]} of the notes with ``note_id``, read on the shards."""
    out = {}
    for shard in w.dev.shards:
        with psycopg.connect(shard.primary.dsn) as c:
            out[shard.name] = c.execute("SELECT tenant_id, body FROM notes WHERE id = %s ORDER BY 1",
                                        (note_id,)).fetchall()
    return out


def _twin_notes(w):
    """An id that both shards have, for a tenant of each: its rows."""
    nid = next(_ids)
    with w.Session() as s:
        s.add_all([Note(id=nid, tenant_id=w.s0[0], body="s0's"), Note(id=nid, tenant_id=w.s1[0], body="s1's")])
        s.commit()
    return nid


def _rekeyed(w, nid):
    """s0's note ``nid``, detached and given s1's tenant (make_transient, a new key,
    make_transient_to_detached): its identity key still names s0."""
    with w.Session(expire_on_commit=False) as s:
        n = s.scalars(select(Note).where(Note.tenant_id == w.s0[0], Note.id == nid)).one()
        s.commit()
    make_transient(n)
    n.tenant_id = w.s1[0]
    n.body = "meant for s1's row"
    make_transient_to_detached(n)
    assert n._sa_instance_state.key[2] == "s0"
    return n


ATTACH = {
    "add-update": lambda s, n: (s.add(n), setattr(n, "body", "written"), s.flush()),
    "delete": lambda s, n: (s.delete(n), s.flush()),
    "merge-load-false": lambda s, n: (setattr(s.merge(n, load=False), "body", "written"), s.flush()),
    "merge": lambda s, n: (setattr(s.merge(n), "body", "written"), s.flush()),
}


@pytest.mark.parametrize("way", ATTACH)
def test_rekeyed_detached_object_does_not_write_another_shards_row(world, way):
    """With a catalog, a detached object whose identity key names s0 but whose shard key
    (as in the database: make_transient_to_detached commits it) is s1's: its flush would
    UPDATE or DELETE s0's row of that id, another tenant's, which s0 owns (the guard lets
    it through).  Refused with RoutingError, as without a catalog; nothing written."""
    w = world
    nid = _twin_notes(w)
    before = _rows(w, nid)
    n = _rekeyed(w, nid)
    with w.Session() as s:
        with pytest.raises(shardkit.RoutingError, match="keyed to shard s0"):
            ATTACH[way](s, n)
        s.rollback()
    assert _rows(w, nid) == before


@pytest.fixture(scope="module")
def moved(world):
    """Notes of a bucket that moved s0 -> s1 (cleaned up), loaded before the move and
    detached (``stale``), and one that was expired in an open session (``expired``)."""
    w = world
    t = w.movers[0]
    ids = [next(_ids) for _ in range(8)]
    with w.Session() as s:
        s.add_all(Note(id=i, tenant_id=t, body="orig") for i in ids)
        s.commit()
    with w.Session(expire_on_commit=False) as s:
        stale = {i: s.scalars(select(Note).where(Note.tenant_id == t, Note.id == i)).one() for i in ids[:6]}
        s.commit()
    twin = _twin_notes(w)   # an id both shards have, neither row moving
    held = w.Session()
    expired = {i: held.scalars(select(Note).where(Note.tenant_id == t, Note.id == i)).one() for i in ids[6:]}
    expired[twin] = held.scalars(select(Note).where(Note.tenant_id == w.s0[0], Note.id == twin)).one()
    held.commit()  # expires them; they keep token s0
    _apply_map(SimpleNamespace(cluster=w.cluster), w.live, w.moving_bucket, "s1")
    assert w.cluster.shard_for("notes", t) == "s1"
    assert all(_rows(w, i)["s0"] == [] for i in ids)   # cleaned up
    # s0 has since given some of those ids to rows of its own tenants.
    with w.Session() as s:
        s.add_all(Note(id=i, tenant_id=w.s0[1], body="s0's own") for i in ids[3:6] + ids[6:])
        s.commit()
    yield SimpleNamespace(tenant=t, stale=stale, held=held, expired=expired, ids=ids, twin=twin)
    held.close()


def _detached(m, i):
    n = m.stale[i]
    assert n._sa_instance_state.key[2] == "s0" and n._sa_instance_state.detached
    return n


MOVED_WAYS = {
    "add-update": lambda s, n: (s.add(n), setattr(n, "body", "written"), s.flush()),
    "delete": lambda s, n: (s.delete(n), s.flush()),
    "merge-load-false": lambda s, n: (setattr(s.merge(n, load=False), "body", "written"), s.flush()),
    "merge": lambda s, n: (setattr(s.merge(n), "body", "written"), s.flush()),
}


@pytest.mark.parametrize("collides", [False, True], ids=["s0-id-free", "s0-id-reused"])
@pytest.mark.parametrize("way", MOVED_WAYS)
def test_detached_object_after_its_bucket_moved(world, moved, way, collides):
    """An object loaded from s0 before its bucket moved to s1 (and s0's copy was cleaned
    up), attached to a new session and written: refused (NotOwned, or RoutingError naming
    the shards) with nothing written; never written over s0's own row that has its id
    since, nor turned into a duplicate INSERT on s1."""
    w, m = world, moved
    i = m.ids[{("add-update", False): 0, ("delete", False): 1, ("merge-load-false", False): 2,
               ("merge", False): 2, ("add-update", True): 3, ("delete", True): 4,
               ("merge-load-false", True): 5, ("merge", True): 5}[way, collides]]
    n = _detached(m, i)
    before = _rows(w, i)
    assert before["s1"] == [(m.tenant, "orig")]
    with w.Session() as s:
        if collides:
            # (Not NotOwned: run_transaction would run it again to the same end.)
            with pytest.raises(shardkit.RoutingError, match="another row, which s0 owns.*loaded before its bucket moved"):
                MOVED_WAYS[way](s, n)
        else:
            with pytest.raises(shardkit.NotOwned, match="no longer owns it|disagrees") as ei:
                MOVED_WAYS[way](s, n)
            # The bucket it is about: the object's (known from its loaded shard key).
            assert ei.value.bucket == w.cluster.bucket_for(Note, m.tenant), ei.value
        s.rollback()
    assert _rows(w, i) == before


@pytest.mark.parametrize("how", ["refresh", "attribute"])
def test_expired_object_after_its_bucket_moved_and_id_reused(moved, how):
    """An object expired in a session opened before its bucket moved, whose id s0 (where
    it was loaded from) has since given to a row of its own: its refresh must not load
    that other row as this object (another tenant's data under this object's identity)."""
    m = moved
    i = m.ids[6] if how == "refresh" else m.ids[7]
    n = m.expired[i]
    s = m.held
    try:
        if how == "refresh":
            s.refresh(n)
        got = (n.tenant_id, n.body)
    except shardkit.NotOwned as e:
        assert "no longer owns it" in str(e) or "cannot be told" in str(e), e
        s.rollback()
        return
    assert got == (m.tenant, "orig"), f"loaded {got} as note {i} of tenant {m.tenant}"


def test_expired_object_whose_id_other_shards_have_refreshes_after_a_move(world, moved):
    """Not over-refused: an expired object (in the same session, opened before the move)
    whose id the other shard has for a row of its own, neither of them moved, loads again."""
    w, m = world, moved
    n = m.expired[m.twin]
    m.held.refresh(n)
    assert (n.tenant_id, n.body) == (w.s0[0], "s0's")
