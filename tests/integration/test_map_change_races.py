"""A new shard map arriving in the middle of one routing decision.

A :class:`~shardkit.Cluster` with a catalog replaces ``router``, ``config``,
``foreign_buckets``, ``moved_lsn`` and ``map_version`` when a new state arrives (the
MapFollower's thread, or ``refresh_map()`` after a refused write), one attribute after
another.  A statement that reads that live state more than once may see two states: a
write acknowledged without having been done, or a read that returns rows twice or misses
them.  Each test makes the window deterministic: a second Cluster (``follow_map=False``)
is the process whose map is stale, and a hook reloads its map at a chosen moment.

The moves are stopped part way by a ``progress`` callback that raises: at "copied" (the
target holds copies of the bucket, the catalog says so) and at "switched" (the target
owns the bucket, the source still holds its rows until the clean-up).  In that second
state both maps alone give right answers: the old one reads the bucket on the source
(copies equal to the rows, nothing has written since), the new one on the target.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, String, create_engine, event, insert, inspect, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit.errors import RebalanceError
from movers import rows_by_key

pytestmark = pytest.mark.integration

N_ACCOUNTS = 600


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "mc_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)
    tag: Mapped[str] = mapped_column(String(40), default="")
    notes: Mapped[list[Note]] = relationship(back_populates="account", lazy="select")


class Note(Base):
    __tablename__ = "mc_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("mc_accounts.id"))
    body: Mapped[str] = mapped_column(String(40), default="")
    account: Mapped[Account] = relationship(back_populates="notes")


GROUPS = {"groups": {"accounts": {"strategy": "hash",
                                  "tables": {"mc_accounts": "id", "mc_notes": "account_id"}}}}


class World:
    def __init__(self, dev: Any, admin: shardkit.Cluster, cfg_path: Any) -> None:
        self.dev, self.admin, self.cfg_path = dev, admin, cfg_path
        self.moved: set[int] = set()   # buckets a test has moved already (each test takes fresh ones)


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    catalog_url = dev.create_catalog()
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    cfg_path = dev.write_config(tmp_path_factory.mktemp("races") / "shardkit.toml",
                                {**GROUPS, "catalog": {"url": catalog_url}})
    admin = shardkit.Cluster.from_config(cfg_path, follow_map=False, metadata=Base.metadata)
    rebalance.init(admin)
    S = sessionmaker(class_=shardkit.ShardedSession, cluster=admin, consistency="strong")
    with S() as s:
        s.execute(insert(Account), [{"id": k, "balance": 0, "tag": f"t{k}"} for k in range(N_ACCOUNTS)])
        s.commit()
    yield World(dev, admin, cfg_path)
    admin.dispose()


# -- moves stopped part way ------------------------------------------------------------


class _Stop(Exception):
    pass


def _stop_at(phrase: str) -> Any:
    def progress(line: str) -> None:
        if phrase in line:
            raise _Stop(line)
    return progress


def _start_move(w: World, source: str, reason: str, min_keys: int = 1) -> tuple[int, int, str, list[int]]:
    """Start (plan) the move of a bucket of ``source`` holding at least ``min_keys``
    accounts, one no test has moved yet, to the other shard: (move id, bucket, target,
    its accounts)."""
    admin = w.admin
    admin.refresh_map()
    live = admin.config.bucket_map
    target = next(s for s in admin.shard_names if s != source)
    by_bucket: dict[int, list[int]] = {}
    for k in range(N_ACCOUNTS):
        by_bucket.setdefault(shardkit.bucket_for(k, len(live)), []).append(k)
    bucket = next(b for b, ks in sorted(by_bucket.items())
                  if len(ks) >= min_keys and live[b] == source and b not in w.moved)
    w.moved.add(bucket)
    new_map = list(live)
    new_map[bucket] = target
    plan = plan_from_maps(live, tuple(new_map), f"test: {reason}, bucket {bucket}")
    move_id = rebalance.Mover(admin, grace=0, progress=lambda line: None).start(plan)
    return move_id, bucket, target, by_bucket[bucket]


@contextlib.contextmanager
def _half_moved(w: World, source: str) -> Iterator[tuple[int, str, list[int], shardkit.Cluster]]:
    """Move one bucket of ``source`` (holding at least 3 accounts) to the other shard, in
    steps: yields (bucket, target, its accounts, a stale Cluster that loaded the "copied"
    state), with the move stopped just after its switch; finishes the move on exit."""
    admin = w.admin
    move_id, bucket, target, keys = _start_move(w, source, "map change race", min_keys=3)
    with pytest.raises(RebalanceError, match="copied"):
        rebalance.Mover(admin, grace=0, progress=_stop_at("copied")).run(move_id)
    stale = shardkit.Cluster.from_config(w.cfg_path, follow_map=False, metadata=Base.metadata)
    try:
        assert stale.foreign_buckets == {target: frozenset({bucket})}
        assert stale.shard_for(Account, keys[0]) == source
        with pytest.raises(RebalanceError, match="switched to map version"):
            rebalance.Mover(admin, grace=0, progress=_stop_at("switched to map version")).run(move_id)
        # Both shards hold the bucket's rows now, equal: the source gave it up.
        held = rows_by_key(w.dev.shards, f"SELECT id, balance FROM mc_accounts WHERE id = {keys[0]}")
        assert sorted(s for s, _ in held[keys[0]]) == sorted(admin.shard_names)
        yield bucket, target, keys, stale
    finally:
        stale.dispose()
        _finish(admin, move_id)


def _finish(admin: shardkit.Cluster, move_id: int) -> None:
    """Run move ``move_id`` to its end (verify, clean up) unless it has ended."""
    if rebalance.move_status(admin, move_id)[0]["state"] == "running":
        rebalance.Mover(admin, grace=0, progress=lambda line: None).run(move_id)
    admin.refresh_map()


def _latest_move(admin: shardkit.Cluster) -> int:
    return max(m["move"] for m in rebalance.move_status(admin))


def _reload_once(stale: shardkit.Cluster) -> dict[str, Any]:
    """A hook body that loads the catalog's state into ``stale`` the first time it runs;
    the returned dict says whether it ran and the version before."""
    seen: dict[str, Any] = {"fired": 0, "before": stale.map_version}

    def reload(*a: Any, **kw: Any) -> None:
        if not seen["fired"]:
            seen["fired"] += 1
            stale.refresh_map()
    seen["reload"] = reload
    return seen


def _duplicates_and_missing(got: list[int], want: list[int]) -> tuple[list[int], list[int]]:
    c = Counter(got)
    return sorted(k for k, n in c.items() if n > 1), sorted(set(want) - set(c))


# -- cross-shard reads ------------------------------------------------------------------


@pytest.mark.parametrize("first", ["target", "source"])
def test_scatter_read_sees_each_row_once_when_the_state_arrives_between_two_shards(world, first):
    """A key-less read across shards leaves out, per shard, the rows of buckets it holds
    without owning them.  The shards are prepared one after another (sorted by name); if
    the catalog's next state arrives after the first shard's filter, the second is
    filtered by the new state: with the target first, both leave the bucket out (rows
    missing); with the source first, neither does (rows twice)."""
    w = world
    # s0 sorts first: the target is s0 when the bucket moves s1 -> s0.
    source = "s1" if first == "target" else "s0"
    with _half_moved(w, source) as (bucket, target, keys, stale):
        seen = _reload_once(stale)
        engine = stale.primary("s0")
        event.listen(engine, "engine_connect", seen["reload"])
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
        try:
            with S() as s:
                got = list(s.scalars(select(Account.id).where(Account.balance >= 0)))
        finally:
            event.remove(engine, "engine_connect", seen["reload"])
        assert seen["fired"] and stale.map_version > seen["before"], "the hook did not reload the map"
        twice, missing = _duplicates_and_missing(got, list(range(N_ACCOUNTS)))
        assert not twice and not missing, (
            f"bucket {bucket} ({keys}) moving {source} -> {target}: rows read twice {twice}, "
            f"missing {missing}")


def test_keyed_read_across_shards_routed_by_one_map_is_not_filtered_by_the_next_state(world):
    """``WHERE id IN (a, b)`` with the keys on two shards: the route sends each key to its
    owner by the map in use, then each shard's part leaves out the buckets the shard holds
    without owning them, as the cluster knows them when the part is built.  A new state
    arriving between the two says the source no longer owns the bucket the route sent the
    key to it for: the source leaves the key's rows out and the target is not asked."""
    w = world
    with _half_moved(w, "s0") as (bucket, target, keys, stale):
        k = keys[0]
        other = next(j for j in range(N_ACCOUNTS) if stale.shard_for(Account, j) == target)
        seen = _reload_once(stale)
        route = stale.router.route

        def route_then_reload(*a: Any, **kw: Any) -> Any:
            out = route(*a, **kw)
            seen["reload"]()  # just after this map chose the shards
            return out
        stale.router.route = route_then_reload  # type: ignore[method-assign]
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
        with S() as s:
            got = list(s.scalars(select(Account.id).where(Account.id.in_([k, other]))))
        assert seen["fired"] and stale.map_version > seen["before"], "the hook did not reload the map"
        assert sorted(got) == sorted([k, other]), \
            f"bucket {bucket} moving s0 -> {target}: read {sorted(got)} of {sorted([k, other])}"


def test_keyed_read_while_the_state_is_being_replaced_sees_its_rows(world):
    """A new map and the moves' state that comes with it are one router: when
    ``_set_state`` replaced the router first and ``foreign_buckets`` after it, a thread
    routing in between sent a key to the bucket's new owner by the new map and left it
    out there as a copy by the old state.  The read runs at that moment, from a logging
    handler of the map's log line (written once the new router is in place)."""
    w = world
    with _half_moved(w, "s1") as (bucket, target, keys, stale):
        k = keys[0]
        # On the source by both maps: the read is split over the two shards by either.
        other = next(j for j in range(N_ACCOUNTS) if stale.shard_for(Account, j) == "s1" and j not in keys)
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
        got: list[Any] = []

        class ReadNow(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if not got and record.getMessage().startswith("bucket map version"):
                    with S() as s:
                        got.append((stale.shard_for(Account, k), dict(stale.foreign_buckets),
                                    sorted(s.scalars(select(Account.id).where(Account.id.in_([k, other]))))))
        logger = logging.getLogger("shardkit.cluster")
        handler, level = ReadNow(logging.INFO), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            stale.refresh_map()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        assert got, "the map's log line was not seen"
        owner, foreign, ids = got[0]
        # The new map, with its own moves' state (the source holds copies now), never the
        # new map with the old state (the target's copies: the row left out everywhere).
        assert owner == target and foreign == {"s1": frozenset({bucket})}, (owner, foreign)
        assert ids == sorted([k, other]), \
            f"bucket {bucket} moving s1 -> {target}: read {ids} of {sorted([k, other])}"


# -- ORM flushes ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:DELETE statement on table")
def test_flush_delete_of_a_moved_object_is_refused_when_the_map_arrives_before_the_check(world):
    """Regression guard.  An object loaded from the source before the switch is deleted
    after the clean-up: the DELETE matches nothing there, and the new map arrives just
    after it, before the flush's check.  The check must still find that the object lives
    elsewhere now (``_refuse_misplaced`` reloads the map and compares owners).  Fails
    under a check that asks the shard about the units the map *in use* gives it (as
    ``_check_still_owner`` did before e81df3c): by the new map the source is right about
    everything, and the delete would be acknowledged while the row lives on."""
    w = world
    with _half_moved(w, "s0") as (bucket, target, keys, stale):
        k = keys[1]
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong",
                         expire_on_commit=False)
        s = S()
        try:
            acc = s.get(Account, k)
            assert acc is not None and inspect(acc).key[2] == "s0"
            s.commit()  # the object stays in the session as loaded from s0
            _finish(w.admin, _latest_move(w.admin))  # the source's rows are deleted now
            seen = _reload_once(stale)

            def reload_after_write(conn, cursor, statement, *a):
                if statement.lstrip().upper().startswith("DELETE"):
                    seen["reload"]()
            engine = stale.primary("s0")
            event.listen(engine, "after_cursor_execute", reload_after_write)
            try:
                with pytest.raises(shardkit.NotOwned):
                    s.delete(acc)
                    s.commit()
                    pytest.fail(f"the delete of {k} was acknowledged by s0, which no longer holds it")
            finally:
                event.remove(engine, "after_cursor_execute", reload_after_write)
            assert seen["fired"] and stale.map_version > seen["before"], "the hook did not reload the map"
        finally:
            s.close()
        assert rows_by_key(w.dev.shards, f"SELECT id, balance FROM mc_accounts WHERE id = {k}") == \
            {k: [(target, 0)]}


# -- run_transaction ----------------------------------------------------------------------


def test_run_transaction_waits_for_a_map_newer_than_the_one_that_routed_the_refused_write(world, monkeypatch):
    """A shard refuses writes to a bucket as soon as the mover's cut-over commits there,
    a moment before the mover publishes the map that moves it.  run_transaction then waits
    for a map newer than the one that routed the write.  If another map (of another
    change) arrived while the transaction ran, a map newer than the one at its start is
    there already: the retry was routed by it to the same shard and refused again."""
    w = world
    admin = w.admin

    # Hold the mover between its cut-over on the shards and its publication of the map.
    switched, publish = threading.Event(), threading.Event()
    committed = rebalance._committed_position

    def held(conn: Any) -> Any:
        switched.set()
        publish.wait(30)
        return committed(conn)
    monkeypatch.setattr(rebalance, "_committed_position", held)
    move_id, bucket, target, keys = _start_move(w, "s0", "unpublished cut-over")
    key = keys[0]
    failed: list[BaseException] = []

    def move() -> None:
        try:
            rebalance.Mover(admin, grace=0, progress=lambda line: None).run(move_id)
        except BaseException as e:  # reported by the test
            failed.append(e)
    mover = threading.Thread(target=move, daemon=True)
    stale = shardkit.Cluster.from_config(w.cfg_path, follow_map=False, metadata=Base.metadata)
    try:
        mover.start()
        assert switched.wait(60), "the mover did not reach its cut-over"
        start = stale.map_version
        routed_by: list[int | None] = []

        def transfer(s: Any) -> None:
            routed_by.append(stale.map_version)
            if len(routed_by) == 1:
                # A map of another change arrives while the transaction runs; the
                # mover publishes its own a little later.
                with admin.catalog.engine.begin() as c:
                    admin.catalog.publish_map(c, admin.catalog.current_map(c).bucket_map,
                                              "test: another change")
                stale.refresh_map()
                threading.Timer(0.3, publish.set).start()
            s.execute(update(Account).where(Account.id == key).values(balance=Account.balance + 1))

        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
        shardkit.run_transaction(S, transfer)
        assert routed_by[0] == start and len(routed_by) == 2, routed_by
        assert routed_by[1] >= start + 2, f"retried by map version {routed_by[1]}, not the move's"
    finally:
        publish.set()
        mover.join(120)
        stale.dispose()
    assert not failed, failed
    admin.refresh_map()
    assert rows_by_key(w.dev.shards, f"SELECT id, balance FROM mc_accounts WHERE id = {key}") == \
        {key: [(target, 1)]}


# -- verify -------------------------------------------------------------------------------


def test_verify_is_not_misled_by_a_move_that_takes_a_step_while_it_reads_the_shards(world):
    """verify compares the shards with one state of the catalog.  A move that copies a
    bucket after verify took its map, but before it read the target, left rows on the
    target that the map it took gives the source: reported as misplaced duplicates.
    Once the state in use has changed, the check runs again, by the new state."""
    from shardkit.verify import verify

    w = world
    admin = w.admin
    move_id, bucket, target, keys = _start_move(w, "s0", "verify during a move")
    checker = shardkit.Cluster.from_config(w.cfg_path, follow_map=False, metadata=Base.metadata)
    fired: list[int] = []

    def copy_now(*a: Any) -> None:
        if not fired:
            fired.append(1)
            with pytest.raises(RebalanceError, match="copied"):
                rebalance.Mover(admin, grace=0, progress=_stop_at("copied")).run(move_id)
    engine = checker.primary(target)
    event.listen(engine, "engine_connect", copy_now)
    try:
        report = verify(checker)
    finally:
        event.remove(engine, "engine_connect", copy_now)
        checker.dispose()
        _finish(admin, move_id)
    assert fired, "the hook did not run the copy"
    assert report.ok, report.render()
    assert sum(t.in_flight for t in report.tables if t.shard == target) >= len(keys)
    assert not report.map_changed
