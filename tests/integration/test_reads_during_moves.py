"""What application reads see while and after buckets move (2 shards x 1 replica).

A mover runs in a background thread and pauses at chosen journal steps; at each
pause an application Cluster that follows the catalog reads through a
ShardedSession, and every answer is compared with the ground truth: the rows
read on every shard's primary, kept only on the shard that owns their bucket
(``shardkit.owned_buckets``, the guard's own table).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, String, and_, create_engine, func, select, text
from sqlalchemy.orm import (DeclarativeBase, Mapped, joinedload, mapped_column, relationship, selectinload,
                            sessionmaker)

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps, plan_move_value

pytestmark = pytest.mark.integration

BUCKETS = 64
N_USERS = 240


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int] = mapped_column(Integer)
    purchases: Mapped[list[Purchase]] = relationship(back_populates="member", lazy="select")


class Purchase(Base):
    __tablename__ = "purchases"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    amount: Mapped[int] = mapped_column(Integer)
    member: Mapped[Member] = relationship(back_populates="purchases")


class Shop(Base):
    __tablename__ = "shops"
    region: Mapped[str] = mapped_column(String(8), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    revenue: Mapped[int] = mapped_column(Integer)


def _groups(shards: list[str]) -> dict:
    return {
        "groups": {
            "members": {"strategy": "hash", "tables": {"members": "id", "purchases": "member_id"}},
            "shops": {"strategy": "list", "tables": {"shops": "region"},
                      "values": {shards[0]: ["eu", "uk"], shards[1]: ["us"]}, "default": shards[1]},
        },
        # Replica reads stay allowed while a replica is a few seconds behind: the
        # tests make replicas lag on purpose (eventual reads accept staleness, never
        # duplicates or vanished rows).
        "replicas": {"poll_interval": 0.05, "max_lag_seconds": 30.0},
    }


class World:
    def __init__(self, dev: Any, cfg: dict) -> None:
        self.dev = dev
        self.cfg = cfg
        self.admin = shardkit.Cluster.from_config(cfg, follow_map=False)
        self.app = shardkit.Cluster.from_config(cfg)      # follows the catalog
        self.next_id = 10_000_000

    def shard(self, name: str) -> Any:
        return next(s for s in self.dev.shards if s.name == name)

    def sessions(self, consistency: str) -> sessionmaker:
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.app, consistency=consistency)

    def fresh_id(self, bucket: int) -> int:
        while True:
            self.next_id += 1
            if shardkit.bucket_for(self.next_id, BUCKETS) == bucket:
                return self.next_id

    def live_map(self) -> tuple[str, ...]:
        self.admin.refresh_map()
        return self.admin.config.bucket_map

    def replicas_caught_up(self, timeout: float = 60) -> None:
        """Wait until every replica has replayed its primary's flushed WAL (every commit).
        (At most 60 s: a replay that conflicts with a replica's query, such as autovacuum
        truncating a table the mover emptied pages of, waits for it up to PostgreSQL's
        max_standby_streaming_delay, 30 s.)
        Not DevNode.wait_caught_up: it waits for the insert position, which a record still in
        the WAL buffers of an idle primary (no commit to flush it) can keep out of reach."""
        for s in self.dev.shards:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                target = c.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
            for r in s.replicas:
                deadline = time.monotonic() + timeout
                with psycopg.connect(r.dsn, autocommit=True) as c:
                    while not c.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                        (str(target),)).fetchone()[0]:
                        assert time.monotonic() < deadline, f"{r.name} did not replay {target}"
                        time.sleep(0.02)

    def replica_ids(self, shard: str, ids: list[int]) -> set[int]:
        """Those of ``ids`` that ``shard``'s replica has in ``members`` (read there directly)."""
        with psycopg.connect(self.shard(shard).replicas[0].dsn, autocommit=True) as c:
            return {r[0] for r in c.execute("SELECT id FROM members WHERE id = ANY(%s)", (ids,))}

    def sync_app(self) -> list[str]:
        """Wait (up to 3 s) until the app cluster routes by the catalog's current state: map
        version, shards holding rows they do not own, replica floors."""
        state = self.admin.catalog.current_state()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if ((self.app.map_version or 0) >= state.version and self.app.foreign_buckets == state.foreign_buckets
                    and self.app.moved_lsn == state.moved_lsn):
                return []
            time.sleep(0.01)
        self.app.refresh_map()
        return [f"the app cluster did not learn the catalog's state (map {state.version}, "
                f"foreign {dict(state.foreign_buckets)}) within 3 s"]


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1, bucket_count=BUCKETS)
    catalog_url = dev.create_catalog()
    for s in dev.shards:
        eng = create_engine(s.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    names = [s.name for s in dev.shards]
    cfg = {**dev.config_dict(), **_groups(names), "catalog": {"url": catalog_url}}
    admin = shardkit.Cluster.from_config(cfg, follow_map=False)
    rebalance.init(admin)
    admin.dispose()
    w = World(dev, cfg)
    Admin = sessionmaker(class_=shardkit.ShardedSession, cluster=w.admin, consistency="strong")
    with Admin() as s:
        s.add_all(Member(id=i, name=f"m{i}", score=i % 97) for i in range(1, N_USERS + 1))
        s.add_all(Purchase(id=i * 10 + j, member_id=i, amount=i + j) for i in range(1, N_USERS + 1)
                  for j in range(2))
        s.add_all(Shop(region=r, id=i, revenue=i * 3) for r in ("eu", "uk", "us", "ca", "jp")
                  for i in range(1, 21))
        s.commit()
    w.app.start_monitor()
    w.replicas_caught_up()
    yield w
    for s in dev.shards:
        for r in s.replicas:
            r.set_apply_delay(0)
    w.app.dispose()
    w.admin.dispose()


# -- the mover, paused at journal steps ------------------------------------------------------


class PausingMover(rebalance.Mover):
    """Pauses after the named steps are recorded (``copy-committed``: the copy is committed
    on the target, the journal still says ``capturing``; ``switched``: cut-over published).
    ``stop_at``: raise there instead (the move stays running, its lock released)."""

    def __init__(self, cluster: Any, pause_at: set[str], stop_at: str | None = None, **kw: Any) -> None:
        kw.setdefault("grace", 0.2)
        kw.setdefault("progress", lambda line: None)
        super().__init__(cluster, **kw)
        self.pause_at = set(pause_at)
        self.stop_at = stop_at
        self.reached: queue.Queue = queue.Queue()
        self.go: queue.Queue = queue.Queue()

    def _pause(self, step: str) -> None:
        if step == self.stop_at:
            self.reached.put(step)
            raise RuntimeError(f"stopped by the test at {step}")
        if step in self.pause_at:
            self.reached.put(step)
            self.go.get(timeout=120)

    def _record(self, move_id, batch, step, detail=None):
        super()._record(move_id, batch, step, detail)
        self._pause(step)

    def _copy(self, *a, **kw):
        n = super()._copy(*a, **kw)
        self._pause("copy-committed")
        return n

    def _cut_over(self, *a, **kw):
        r = super()._cut_over(*a, **kw)
        self._pause("switched")
        return r


class Moving:
    """Runs ``mover.apply(plan)`` in a thread; ``next_step()`` waits for the next pause."""

    def __init__(self, mover: PausingMover, plan: Any, max_buckets: int = 256) -> None:
        self.mover = mover
        self.errors: list[BaseException] = []
        self.done = threading.Event()

        def run() -> None:
            try:
                mover.apply(plan, max_buckets=max_buckets)
            except BaseException as e:  # noqa: BLE001
                self.errors.append(e)
            finally:
                self.done.set()
                mover.reached.put(None)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def next_step(self, timeout: float = 60) -> str | None:
        return self.mover.reached.get(timeout=timeout)

    def resume(self) -> None:
        self.mover.go.put(None)

    def finish(self) -> None:
        while not self.done.is_set():
            self.mover.go.put(None)
            time.sleep(0.02)
        self.thread.join(30)


def _move_plan(w: World, source: str, target: str, n: int) -> tuple[Any, list[int]]:
    live = w.live_map()
    buckets = [b for b, s in enumerate(live) if s == source][:n]
    new = list(live)
    for b in buckets:
        new[b] = target
    return plan_from_maps(live, tuple(new), f"test: {len(buckets)} buckets {source} -> {target}"), buckets


# -- ground truth and the battery of reads --------------------------------------------------


def truth(w: World) -> dict[str, dict[int, tuple]]:
    """Rows on their owner's primary only; a row owned on two shards is an error of the test."""
    out: dict[str, dict[int, tuple]] = {"members": {}, "purchases": {}}
    queries = {
        "members": "SELECT id, name, score FROM members WHERE shardkit.bucket(id, %s) IN "
                   "(SELECT bucket FROM shardkit.owned_buckets)",
        "purchases": "SELECT id, member_id, amount FROM purchases WHERE shardkit.bucket(member_id, %s) IN "
                     "(SELECT bucket FROM shardkit.owned_buckets)",
    }
    for s in w.dev.shards:
        with psycopg.connect(s.primary.dsn) as c:
            for table, q in queries.items():
                for row in c.execute(q, (BUCKETS,)):
                    assert row[0] not in out[table], f"{table} {row[0]} owned twice"
                    out[table][row[0]] = tuple(row[1:])
    return out


def keys_in(buckets: list[int], limit: int = 10_000) -> list[int]:
    return [k for k in range(1, N_USERS + 1) if shardkit.bucket_for(k, BUCKETS) in set(buckets)][:limit]


def check_reads(w: World, consistency: str, label: str, moved_keys: list[int]) -> list[str]:
    """Run cross-shard, IN-list and single-key reads (ORM and Core); return what was wrong.
    Each read is checked on its own: an error (a refusal) is reported and the others still run."""
    t = truth(w)
    members, purchases = t["members"], t["purchases"]
    problems: list[str] = []
    where = f"[{label}, {consistency}]"
    Session = w.sessions(consistency)
    M = Member.__table__
    want_children = Counter(v[0] for v in purchases.values())

    def check(what: str, got: Any, want: Any) -> None:
        if got == want:
            return
        if isinstance(got, list) and isinstance(want, list):
            g, x = Counter(got), Counter(want)
            extra, missing = g - x, x - g
            problems.append(f"{where} {what}: {sum(extra.values())} extra (e.g. {list(extra)[:3]}), "
                            f"{sum(missing.values())} missing (e.g. {list(missing)[:3]})")
        elif isinstance(got, dict) and isinstance(want, dict):
            bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            problems.append(f"{where} {what}: {len(bad)} keys differ, e.g. "
                            + ", ".join(f"{k}: got {got.get(k)} want {want.get(k)}" for k in bad[:3]))
        else:
            problems.append(f"{where} {what}: got {got!r}, expected {want!r}")

    def read(what: str, fn: Any, want: Any) -> None:
        try:
            with Session() as s:
                got = fn(s)
        except Exception as e:  # noqa: BLE001 - a refused or failed read is a finding too
            problems.append(f"{where} {what} raised {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return
        check(what, got, want)

    by_score = [k for k, _ in sorted(members.items(), key=lambda kv: (-kv[1][1], kv[0]))]
    want_per: dict[int, int] = {}
    for mid, amount in purchases.values():
        want_per[mid] = want_per.get(mid, 0) + amount
    read("ORM select(Member) ordered",
         lambda s: [(m.id, m.name, m.score) for m in s.scalars(select(Member).order_by(Member.id))],
         sorted((k, *v) for k, v in members.items()))
    read("ORM yield_per ids",
         lambda s: sorted(m.id for m in s.scalars(select(Member).execution_options(yield_per=50))),
         sorted(members))
    read("ORM joinedload purchases per member",
         lambda s: {m.id: len(m.purchases) for m in s.scalars(
             select(Member).options(joinedload(Member.purchases))).unique()},
         {k: want_children.get(k, 0) for k in members})
    read("ORM selectinload purchases per member",
         lambda s: {m.id: len(m.purchases) for m in s.scalars(
             select(Member).options(selectinload(Member.purchases)))},
         {k: want_children.get(k, 0) for k in members})
    read("Core select(id, score)",
         lambda s: sorted(tuple(r) for r in s.execute(select(M.c.id, M.c.score))),
         sorted((k, v[1]) for k, v in members.items()))
    read("count/sum members", lambda s: tuple(s.execute(select(func.count(), func.sum(M.c.score))).one()),
         (len(members), sum(v[1] for v in members.values())))
    read("count/sum purchases",
         lambda s: tuple(s.execute(select(func.count(Purchase.id), func.sum(Purchase.amount))).one()),
         (len(purchases), sum(v[1] for v in purchases.values())))
    read("join count",
         lambda s: s.scalar(select(func.count()).select_from(Purchase).join(Member, Member.id == Purchase.member_id)),
         len(purchases))
    read("ORDER BY score DESC LIMIT 7 OFFSET 2",
         lambda s: s.execute(select(M.c.id).order_by(M.c.score.desc(), M.c.id).limit(7).offset(2)).scalars().all(),
         by_score[2:9])
    read("GROUP BY member_id sum(amount)",
         lambda s: dict(s.execute(select(Purchase.member_id, func.sum(Purchase.amount))
                                  .group_by(Purchase.member_id)).all()),
         want_per)
    # IN list (split by owner), moved and unmoved keys.
    keys = moved_keys[:15] + [k for k in range(1, 40) if k not in moved_keys][:10] + [999_999_999]
    read("Core IN list",
         lambda s: sorted(tuple(r) for r in s.execute(select(M.c.id, M.c.name, M.c.score).where(M.c.id.in_(keys)))),
         sorted((k, *members[k]) for k in keys if k in members))
    read("ORM IN list",
         lambda s: sorted((m.id, m.name, m.score) for m in s.scalars(select(Member).where(Member.id.in_(keys)))),
         sorted((k, *members[k]) for k in keys if k in members))
    # Single-key reads, each in a fresh session (no identity map).
    for k in moved_keys[:6]:
        read(f"get(Member, {k})", lambda s, k=k: (lambda m: None if m is None else (m.name, m.score))(s.get(Member, k)),
             members.get(k))
        read(f"Core key == {k}",
             lambda s, k=k: (lambda r: None if r is None else tuple(r))(
                 s.execute(select(M.c.name, M.c.score).where(M.c.id == k)).first()),
             members.get(k))
        read(f"purchases of {k}",
             lambda s, k=k: sorted(p.id for p in s.scalars(select(Purchase).where(Purchase.member_id == k))),
             sorted(i for i, v in purchases.items() if v[0] == k))
    # get() by a primary key without the shard key: every shard.
    for pid in [i for i, v in purchases.items() if v[0] in moved_keys][:3]:
        read(f"get(Purchase, {pid})",
             lambda s, pid=pid: (lambda p: None if p is None else (p.member_id, p.amount))(s.get(Purchase, pid)),
             purchases[pid])
    return problems


# -- 1. each journal step, replicas caught up ------------------------------------------------


def test_reads_at_every_step_with_writes_in_between(world):
    """Two batches s0 -> s1; at every pause the app reads (both consistencies) after the
    replicas caught up; writes to moving rows happen before and after the switch."""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 6)
    moved = keys_in(buckets)
    mover = PausingMover(w.admin, {"copy-committed", "copied", "switched", "verified", "cleaned"})
    Writer = w.sessions("read_your_writes")
    problems: list[str] = []
    seen: list[str] = []
    ledger: dict[int, tuple | None] = {}
    run = Moving(mover, plan, max_buckets=3)
    try:
        while True:
            step = run.next_step()
            if step is None:
                break
            seen.append(step)
            problems += w.sync_app()
            if step in ("copied", "switched", "copy-committed"):
                # Writes to rows of the moving buckets (through the app, by its map):
                # updates, an insert and a delete, each acknowledged into the ledger.
                with Writer() as s:
                    for k in moved[:4]:
                        m = s.get(Member, k)
                        if m is not None:
                            m.score = (m.score + 11) % 1000
                            m.name = f"{step}-{k}"
                            ledger[k] = (m.name, m.score)
                    new_id = w.fresh_id(shardkit.bucket_for(moved[0], BUCKETS))
                    s.add(Member(id=new_id, name=f"new-{step}", score=500))
                    s.add(Purchase(id=new_id * 10, member_id=new_id, amount=7))
                    victim = moved[4 + len(seen)]
                    for p in s.get(Member, victim).purchases:
                        s.delete(p)
                    s.flush()
                    s.delete(s.get(Member, victim))
                    s.commit()
                ledger[new_id] = (f"new-{step}", 500)
                ledger[victim] = None
            t = truth(w)["members"]
            for k, want in ledger.items():
                if t.get(k) != want:
                    problems.append(f"after {step}: acknowledged write of member {k} lost: owner has "
                                    f"{t.get(k)}, expected {want}")
            w.replicas_caught_up()
            for consistency in ("read_your_writes", "eventual"):
                problems += check_reads(w, consistency, f"after {step} (#{len(seen)})", moved)
            run.resume()
    finally:
        run.finish()
    assert not run.errors, run.errors
    assert seen.count("switched") == 2 and seen.count("cleaned") == 2, seen
    assert not problems, "\n".join(problems[:12])


# -- 2. a lagging target replica across the switch ---------------------------------------------


def test_lagging_target_replica_at_switch(world):
    """The target's replica is 3 s behind; right after the switch (app synced, replica not
    caught up) reads of moved rows must not vanish nor be stale, and a session that wrote a row
    during the copy must read it back."""
    w = world
    plan, buckets = _move_plan(w, "s1", "s0", 3)
    moved = keys_in(buckets)
    target_replica = w.shard("s0").replicas[0]
    mover = PausingMover(w.admin, {"copied", "switched"})
    problems: list[str] = []
    token = None
    new_id = w.fresh_id(buckets[0])
    target_replica.set_apply_delay(3.0)
    run = Moving(mover, plan)
    try:
        assert run.next_step() == "copied"
        with w.sessions("read_your_writes")() as s:
            s.add(Member(id=new_id, name="during-copy", score=3))
            m = s.get(Member, moved[0])
            m.score = 4242
            s.commit()
            token = s.consistency_token()
        run.resume()
        assert run.next_step() == "switched"
        problems += w.sync_app()
        with w.sessions("read_your_writes")(consistency_token=token) as s:
            got = s.get(Member, new_id)
            if got is None or got.name != "during-copy":
                problems.append(f"token reader: the row {new_id} written during the copy reads {got}")
            got = s.scalar(select(Member.score).where(Member.id == moved[0]))
            if got != 4242:
                problems.append(f"token reader: member {moved[0]} score {got}, wrote 4242")
        for consistency in ("eventual", "read_your_writes"):
            problems += check_reads(w, consistency, "switched, target replica 3 s behind", moved + [new_id])
        # The reads above ran while the target's replica was really behind: it has not
        # replayed the catch-up of the row written during the copy yet.
        assert new_id not in w.replica_ids("s0", [new_id]), "the target's replica did not lag"
        run.resume()
    finally:
        run.finish()
        target_replica.set_apply_delay(0)
        w.replicas_caught_up()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems[:12])


# -- 3. a lagging source replica after clean-up ------------------------------------------------


def test_lagging_source_replica_after_cleanup(world):
    """The source's replica is 3 s behind when the batch is cleaned: it still has the
    leftovers, which the app no longer leaves out."""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 4)
    moved = keys_in(buckets)
    source_replica = w.shard("s0").replicas[0]
    mover = PausingMover(w.admin, {"cleaned"})
    problems: list[str] = []
    source_replica.set_apply_delay(3.0)
    present = set(moved) & set(truth(w)["members"])
    assert present
    run = Moving(mover, plan)
    try:
        assert run.next_step() == "cleaned"
        problems += w.sync_app()
        for consistency in ("eventual", "read_your_writes"):
            problems += check_reads(w, consistency, "cleaned, source replica 3 s behind", moved)
        # The reads above ran while the source's replica still had the leftovers.
        assert w.replica_ids("s0", moved) == present, "the source's replica did not lag"
        run.resume()
    finally:
        run.finish()
        source_replica.set_apply_delay(0)
        w.replicas_caught_up()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems[:12])


# -- 4. abort with a lagging target replica -------------------------------------------------------


def test_abort_with_lagging_target_replica(world):
    """A move stopped after its copy is aborted; the target's replica is behind the
    abort's delete of the copies, which the app no longer leaves out.  (Held 10 s behind,
    so that the reads are done before it replays the delete on a loaded machine too; the
    delay is lifted as soon as they are.)"""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 3)
    moved = keys_in(buckets)
    target_replica = w.shard("s1").replicas[0]
    mover = PausingMover(w.admin, set(), stop_at="copied")
    run = Moving(mover, plan)
    problems: list[str] = []
    try:
        assert run.next_step() == "copied"
        run.finish()
        with w.admin.catalog.engine.connect() as c:
            move_id = c.execute(text("SELECT max(id) FROM shardkit_catalog.moves")).scalar_one()
        w.replicas_caught_up()           # the target's replica has the copies
        copies = w.replica_ids("s1", moved)
        assert copies and copies == set(moved) & set(truth(w)["members"])
        target_replica.set_apply_delay(10.0)
        rebalance.abort(w.admin, move_id)
        problems += w.sync_app()
        for consistency in ("eventual", "read_your_writes"):
            problems += check_reads(w, consistency, "aborted, target replica behind", moved)
        # The reads above ran while the target's replica still had the deleted copies.
        assert w.replica_ids("s1", moved) == copies, "the target's replica did not lag"
    finally:
        run.finish()
        target_replica.set_apply_delay(0)
        w.replicas_caught_up()
    assert not problems, "\n".join(problems[:12])


# -- 5. ORM objects loaded before the switch: tests/integration/test_keyless_reads_during_moves.py


# -- 6. a derived table outer-joined to a moving table ------------------------------------------------


def test_derived_tables_during_copy_are_filtered_or_refused(world):
    """A derived table (subquery) over a moving table, on the preserved side of an outer join:
    its copies on the target find no partner, so the filter on the joined table's key cannot
    drop them.  They must be left out inside the derived table, or the read refused."""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 3)
    mover = PausingMover(w.admin, {"copied"})
    Session = w.sessions("strong")
    sub = select(Purchase.id, Purchase.member_id).subquery()
    nobody = select(sub.c.id, Member.name).select_from(sub).outerjoin(
        Member, and_(Member.id == sub.c.member_id, Member.score > 10**6))
    inner = select(sub.c.id, sub.c.member_id).where(sub.c.id > 0).subquery()
    statements = {
        "derived LEFT JOIN members (no partner)": (nobody, lambda t: sorted((i, None) for i in t["purchases"])),
        "derived alone": (select(sub.c.id), lambda t: sorted((i,) for i in t["purchases"])),
        "derived of a derived, LEFT JOIN": (
            select(inner.c.id, Member.name).select_from(inner).outerjoin(
                Member, and_(Member.id == inner.c.member_id, Member.score > 10**6)),
            lambda t: sorted((i, None) for i in t["purchases"])),
    }
    problems: list[str] = []
    run = Moving(mover, plan)
    try:
        assert run.next_step() == "copied"
        problems += w.sync_app()
        t = truth(w)
        assert any(shardkit.bucket_for(t["purchases"][i][0], BUCKETS) in buckets for i in t["purchases"])
        for name, (stmt, want) in statements.items():
            try:
                with Session() as s:
                    got = sorted(tuple(r) for r in s.execute(stmt))
                if got != want(t):
                    extra = Counter(got) - Counter(want(t))
                    problems.append(f"{name}: {len(got)} rows, expected {len(want(t))}; "
                                    f"{sum(extra.values())} extra (e.g. {list(extra)[:3]})")
            except shardkit.ScatterRefused as e:
                problems.append(f"{name}: refused ({str(e).splitlines()[0][:120]})")
        with Session() as s:  # Query.count() reads an alias of a subquery
            n = s.query(Purchase).count()
            if n != len(t["purchases"]):
                problems.append(f"query(Purchase).count() = {n}, expected {len(t['purchases'])}")
        run.resume()
    finally:
        run.finish()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)


# -- 7. a list value moving between shards ----------------------------------------------------------


def test_list_value_move_reads(world):
    """Move list value 'ca' (the default's, on s1) to s0; reads of the list group at each step."""
    w = world
    w.admin.refresh_map()
    plan = plan_move_value(w.admin.config.slices, "shops", "ca", "s0")
    mover = PausingMover(w.admin, {"copy-committed", "copied", "switched", "verified", "cleaned"})
    Session = w.sessions("eventual")
    problems: list[str] = []

    def shop_truth() -> dict[tuple[str, int], int]:
        w.admin.refresh_map()
        out = {}
        for sh in w.dev.shards:
            with psycopg.connect(sh.primary.dsn) as c:
                for region, i, rev in c.execute("SELECT region, id, revenue FROM shops"):
                    if w.admin.shard_for("shops", region) == sh.name:
                        out[(region, i)] = rev
        return out

    run = Moving(mover, plan)
    try:
        while (step := run.next_step()) is not None:
            problems += w.sync_app()
            if step == "switched":
                with w.sessions("read_your_writes")() as s:
                    s.get(Shop, ("ca", 1)).revenue = 777
                    s.commit()
            w.replicas_caught_up()
            t = shop_truth()
            try:
                with Session() as s:
                    got = Counter((x.region, x.id, x.revenue) for x in s.scalars(select(Shop)))
                    want = Counter((r, i, v) for (r, i), v in t.items())
                    if got != want:
                        problems.append(f"after {step}: select(Shop) extra {list(got - want)[:3]} "
                                        f"missing {list(want - got)[:3]}")
                    n, total = s.execute(select(func.count(), func.sum(Shop.revenue))).one()
                    if (n, total) != (len(t), sum(t.values())):
                        problems.append(f"after {step}: count/sum {(n, total)} != {(len(t), sum(t.values()))}")
                    ca = sorted((x.id, x.revenue) for x in s.scalars(select(Shop).where(Shop.region == "ca")))
                    if ca != sorted((i, v) for (r, i), v in t.items() if r == "ca"):
                        problems.append(f"after {step}: region == 'ca' read {ca[:3]}...")
                    mixed = Counter((x.region, x.id) for x in s.scalars(
                        select(Shop).where(Shop.region.in_(["ca", "us", "eu"]))))
                    if mixed != Counter(k for k in t if k[0] in ("ca", "us", "eu")):
                        problems.append(f"after {step}: region IN (...) read {sum(mixed.values())} rows")
                    one = s.get(Shop, ("ca", 1))
                    if one is None or one.revenue != t[("ca", 1)]:
                        problems.append(f"after {step}: get(Shop, ('ca', 1)) -> "
                                        f"{None if one is None else one.revenue}, want {t[('ca', 1)]}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"after {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            run.resume()
    finally:
        run.finish()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)


# -- 8. a process whose map is stale: its writes in test_stale_writes.py


# -- 9. the follower swaps the router before the replica floor -------------------------------------------


def test_router_and_replica_floor_change_together(world):
    """Cluster._set_state installs the new router (via _set_map) before it sets moved_lsn; a
    read in between routes a moved key to the target and may use a replica that has not
    replayed the switch.  A logging handler on the 'bucket map version' message (emitted in
    between) widens that window to show it."""
    import logging

    w = world
    plan, buckets = _move_plan(w, "s1", "s0", 2)
    k = keys_in(buckets)[0]
    target_replica = w.shard("s0").replicas[0]
    mover = PausingMover(w.admin, {"switched"})
    in_window = threading.Event()
    leave = threading.Event()

    class Widen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("bucket map version") and \
                    threading.current_thread().name == "shardkit-map-follower" and not in_window.is_set():
                in_window.set()
                leave.wait(5)

    logger = logging.getLogger("shardkit.cluster")
    handler, old_level = Widen(level=logging.INFO), logger.level
    problems = []
    target_replica.set_apply_delay(3.0)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    run = Moving(mover, plan)
    try:
        assert run.next_step() == "switched"
        assert in_window.wait(5), "the follower did not reload the map"
        if w.app.shard_for("members", k) == "s0":    # the new router is in place
            with w.sessions("eventual")() as s:
                m = s.get(Member, k)
                if m is None:
                    problems.append(f"member {k} read as missing: routed to s0, whose replica has not "
                                    f"replayed the switch (floor in use {w.app.moved_lsn.get('s0')})")
        leave.set()
        run.resume()
    finally:
        leave.set()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        run.finish()
        target_replica.set_apply_delay(0)
        w.replicas_caught_up()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)


# -- 10. joinedload with LIMIT (SQLAlchemy wraps the entity query in a subquery) ----------------------


def test_joinedload_with_limit_during_copy(world):
    """select(Member).options(joinedload(Member.purchases)).limit(n): SQLAlchemy puts the
    members query (and its LIMIT) in a subquery and outer-joins purchases to it."""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 3)
    mover = PausingMover(w.admin, {"copied", "switched"})
    Session = w.sessions("strong")
    problems: list[str] = []
    run = Moving(mover, plan)
    try:
        while (step := run.next_step()) is not None:
            problems += w.sync_app()
            t = truth(w)
            want_ids = sorted(t["members"])[:100]
            want = {m: sorted(p for p, v in t["purchases"].items() if v[0] == m) for m in want_ids}
            try:
                with Session() as s:
                    got = {m.id: sorted(p.id for p in m.purchases) for m in s.scalars(
                        select(Member).options(joinedload(Member.purchases)).order_by(Member.id)
                        .limit(100)).unique()}
                if got != want:
                    bad = [k for k in set(got) | set(want) if got.get(k) != want.get(k)]
                    problems.append(f"after {step}: {len(bad)} members differ, e.g. "
                                    + ", ".join(f"{k}: {got.get(k)} vs {want.get(k)}" for k in bad[:3]))
            except Exception as e:  # noqa: BLE001
                problems.append(f"after {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            run.resume()
    finally:
        run.finish()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)


# -- 11. statements shardkit cannot see into: text() on every shard, lightweight table() ------------


def test_unfilterable_reads_during_copy_are_refused_or_exact(world):
    """During the copy the target holds rows it does not own.  A read shardkit cannot filter
    must be refused (README: 'a statement whose FROM clause shardkit cannot filter ... is
    refused with ScatterRefused while a move is in flight'), never answered with the copies:
    text() run with shardkit_all_shards=True, and a Core lightweight table() construct."""
    from sqlalchemy import column, table

    w = world
    plan, _ = _move_plan(w, "s0", "s1", 3)
    mover = PausingMover(w.admin, {"copied"})
    Session = w.sessions("strong")
    statements = {
        "text() with shardkit_all_shards": (text("SELECT id FROM members"), {"shardkit_all_shards": True}),
        "select(table('members', column('id')))": (select(table("members", column("id"))), {}),
    }
    # The previous test's move is over: the app must know that before reading without one.
    problems: list[str] = w.sync_app()
    with Session() as s:
        for name, (stmt, opts) in statements.items():
            got = sorted(r[0] for r in s.execute(stmt, execution_options=opts))
            assert got == sorted(truth(w)["members"]), f"{name} is wrong even without a move"
    run = Moving(mover, plan)
    try:
        assert run.next_step() == "copied"
        problems += w.sync_app()
        want = sorted(truth(w)["members"])
        for name, (stmt, opts) in statements.items():
            try:
                with Session() as s:
                    got = sorted(r[0] for r in s.execute(stmt, execution_options=opts))
                extra = Counter(got) - Counter(want)
                if got != want:
                    problems.append(f"{name}: {len(got)} rows, expected {len(want)}; "
                                    f"{sum(extra.values())} duplicates (e.g. {list(extra)[:3]})")
            except shardkit.ScatterRefused:
                pass
        run.resume()
    finally:
        run.finish()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)
