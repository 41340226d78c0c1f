"""Online bucket moves on real servers: nothing lost while writers write, kill and resume, stale maps."""

from __future__ import annotations

import json
import random
import threading
import time
import tomllib

import inproc_cli
import psycopg
import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, String, create_engine, delete, func, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_add_shards, plan_drain, plan_from_maps
from shardkit.verify import verify
from movers import HeldMover, ReadPasses, WriterThreads, journal_steps, kill_mover_after, latest_move, rows_by_key

pytestmark = pytest.mark.integration

N_ACCOUNTS = 2000


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


class Entry(Base):
    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(40), default="")


GROUPS = {"groups": {"accounts": {"strategy": "hash",
                                  "tables": {"accounts": "id", "entries": "account_id"}}}}


def _cli(*argv):
    """`shardkit ARGV` run in this process (tests/inproc_cli.py: exit status, stdout and stderr
    as a process's, without its ~0.6 s of imports); the killed movers (kill_mover_after)
    keep processes of their own (forked without their imports: tests/prefork.py)."""
    return inproc_cli.run(argv)


def resume(cfg_path, move_id) -> None:
    """`shardkit rebalance resume MOVE` (in this process), which must succeed."""
    r = _cli("rebalance", "resume", str(move_id), "--config", str(cfg_path), "--grace", "0.2")
    assert r.returncode == 0, r.stderr


def _config(dev, catalog_url: str, shards: int) -> dict:
    cfg = dev.config_dict()
    cfg["shards"] = cfg["shards"][:shards]
    return {**cfg, **GROUPS, "catalog": {"url": catalog_url}}


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    """3 shards; the catalog is a database on s0's server; data starts on s0 and s1."""
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    catalog_url = dev.create_catalog()
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    two = shardkit.Cluster.from_config(_config(dev, catalog_url, 2), follow_map=False)
    rebalance.init(two)  # the catalog's first map: the 2-shard config's
    two.dispose()
    d = tmp_path_factory.mktemp("rebalance")
    cfg_path = d / "shardkit.toml"
    dev.write_config(cfg_path, {**GROUPS, "catalog": {"url": catalog_url}})
    cluster = shardkit.Cluster.from_config(cfg_path)
    rebalance.init(cluster)  # installs the guard on s2, which owns nothing yet
    assert set(cluster.config.bucket_map) == {"s0", "s1"}
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add_all(Account(id=i, balance=0) for i in range(N_ACCOUNTS))
        s.add_all(Entry(id=i, account_id=i, amount=i) for i in range(N_ACCOUNTS))
        s.commit()
    yield dev, cluster, cfg_path, Session
    cluster.dispose()


def test_config_path_carries_catalog(world):
    _, cluster, cfg_path, _ = world
    assert cluster.catalog is not None and cluster.map_version is not None
    assert "shardkit_catalog" in cfg_path.read_text()


class Writers(WriterThreads):
    """Threads that insert, update and delete rows (moving buckets and others) and keep a
    ledger of what each acknowledged commit left behind."""

    def __init__(self, Session, n: int = 4) -> None:
        super().__init__(Session, n)
        self.entries: dict[int, int | None] = {}     # entry id -> amount, None if deleted
        self.balances: dict[int, int] = {}           # account id -> balance
        self.longest_wait = 0.0

    def _run(self, me: int) -> None:
        rnd = random.Random(me)
        mine = [a for a in range(N_ACCOUNTS) if a % self.n == me]
        next_entry = self.base + 1_000_000 * (me + 1)
        inserted: list[tuple[int, int]] = []
        while not self.stop.is_set():
            account = rnd.choice(mine)
            op = rnd.random()
            t0 = time.monotonic()
            if op < 0.45:
                eid, next_entry = next_entry, next_entry + 1
                amount = rnd.randrange(1000)

                def fn(s, eid=eid, account=account, amount=amount):
                    s.add(Entry(id=eid, account_id=account, amount=amount, note="w"))
                shardkit.run_transaction(self.Session, fn)
                inserted.append((eid, account))
                record = ("entry", eid, amount)
            elif op < 0.8:
                value = rnd.randrange(1_000_000)

                def fn(s, account=account, value=value):
                    s.execute(Account.__table__.update().where(Account.id == account)
                              .values(balance=value))
                shardkit.run_transaction(self.Session, fn)
                record = ("balance", account, value)
            elif inserted:
                eid, acc = inserted.pop(rnd.randrange(len(inserted)))

                def fn(s, eid=eid, acc=acc):
                    s.execute(Entry.__table__.delete()
                              .where(Entry.account_id == acc).where(Entry.id == eid))
                shardkit.run_transaction(self.Session, fn)
                record = ("entry", eid, None)
            else:
                continue
            wait = time.monotonic() - t0
            with self.lock:
                self.ops += 1
                self.longest_wait = max(self.longest_wait, wait)
                if record[0] == "entry":
                    self.entries[record[1]] = record[2]
                else:
                    self.balances[record[1]] = record[2]


def _writes(writers: WriterThreads, per_writer: int = 5, timeout: float = 60.0) -> None:
    """Wait until the writers have acknowledged ``per_writer`` more writes each, on average
    (writes before and after a move: a fixed sleep gave few on a loaded machine and more
    than needed on an idle one).  Polls on an Event, not time.sleep: a test counts the
    mover's sleeps."""
    goal = writers.ops + per_writer * writers.n
    deadline = time.monotonic() + timeout
    while writers.ops < goal and not writers.errors:
        assert time.monotonic() < deadline, f"the writers made {writers.ops} of {goal} writes in {timeout:g} s"
        writers.stop.wait(0.02)


def _check_ledger(dev, cluster, writers: Writers) -> None:
    cluster.refresh_map()
    accounts = rows_by_key(dev.shards, "SELECT id, balance FROM accounts")
    entries = rows_by_key(dev.shards, "SELECT id, amount FROM entries")
    assert len(accounts) == N_ACCOUNTS
    for aid, places in accounts.items():
        assert len(places) == 1, f"account {aid} is on {places}"
        assert places[0][0] == cluster.shard_for("accounts", aid), f"account {aid} on the wrong shard"
        if aid in writers.balances:
            assert places[0][1] == writers.balances[aid], f"account {aid}: lost an update"
    for eid, amount in writers.entries.items():
        if amount is None:
            assert eid not in entries, f"entry {eid} was deleted, but is on {entries[eid]}"
        else:
            assert eid in entries, f"entry {eid} was acknowledged and is lost"
            assert entries[eid] == [(entries[eid][0][0], amount)], f"entry {eid}: {entries[eid]}"
    for eid, places in entries.items():
        assert len(places) == 1, f"entry {eid} is on {places}"
    report = verify(cluster)
    assert report.ok, report.render()


def test_move_to_a_new_shard_while_writers_write(world):
    dev, cluster, cfg_path, Session = world
    plan = plan_add_shards(cluster.config.bucket_map, ["s2"])
    assert plan.moves and {m.target for m in plan.moves} == {"s2"}
    version = cluster.map_version
    mover = rebalance.Mover(cluster, grace=0.3, progress=lambda line: None)
    with Writers(Session) as writers:
        _writes(writers)
        move_id = mover.apply(plan, max_buckets=128)
        _writes(writers)
    assert not writers.errors, writers.errors[:3]
    assert writers.ops > 100
    # Every follower learnt the new map; nothing is left on the old owners.
    assert cluster.map_version > version
    assert cluster.config.bucket_map == plan.new_map
    _check_ledger(dev, cluster, writers)
    status = rebalance.move_status(cluster, move_id)[0]
    assert status["state"] == "done" and all(b["step"] == "cleaned" for b in status["batches"])
    with psycopg.connect(dev.shards[0].primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM shardkit.changes").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM shardkit.moving_buckets").fetchone()[0] == 0
    # was 1.0: the lock_timeout bounds it (bench/ measures the 1 s target); 4 writers share 2 cores
    assert mover.longest_pause < 2.0


def test_stale_map_is_refused_and_retried_on_the_new_owner(world):
    dev, cluster, cfg_path, Session = world
    # Processes that load the map now and never follow it: stale after the move.
    stale = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    stale2 = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    live = cluster.config.bucket_map
    bucket = next(b for b, s in enumerate(live) if s == "s0")
    target = "s1"
    new_map = list(live)
    new_map[bucket] = target
    rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new_map), "test: one bucket"))
    key = next(k for k in range(N_ACCOUNTS, 10**6) if shardkit.bucket_for(k, 1024) == bucket)
    assert stale.shard_for("accounts", key) == "s0"
    StaleSession = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
    with StaleSession() as s:
        s.add(Account(id=key, balance=1))
        with pytest.raises(shardkit.NotOwned) as ei:
            s.commit()
    assert ei.value.shard == "s0" and ei.value.bucket == bucket
    stale.refresh_map()
    assert stale.shard_for("accounts", key) == target

    # run_transaction: refused on s0, map reloaded, retried once, lands on s1.
    S2 = sessionmaker(class_=shardkit.ShardedSession, cluster=stale2, consistency="strong")
    key2 = next(k for k in range(key + 1, 10**6) if shardkit.bucket_for(k, 1024) == bucket)
    calls = []

    def fn(s):
        calls.append(s.cluster.shard_for("accounts", key2))
        s.add(Account(id=key2, balance=7))
    shardkit.run_transaction(S2, fn)
    assert calls == ["s0", target]
    with psycopg.connect(dev.shards[1].primary.dsn) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (key2,)).fetchone()[0] == 7
    with psycopg.connect(dev.shards[0].primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM accounts WHERE id IN (%s, %s)", (key, key2)).fetchone()[0] == 0
    with psycopg.connect(dev.shards[1].primary.dsn, autocommit=True) as c:
        c.execute("SET shardkit.mover = 'on'")
        c.execute("DELETE FROM accounts WHERE id = %s", (key2,))
    stale.dispose()
    stale2.dispose()


def test_stale_update_or_delete_of_a_moved_key_is_refused_not_lost(world):
    """The guard's triggers see only rows a statement touches: after the clean-up the old
    owner has no rows of the moved bucket, so a stale process's UPDATE/DELETE there would
    match nothing and "succeed".  It is refused instead, and its retry lands."""
    dev, cluster, cfg_path, Session = world
    stale = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    stale2 = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    live = cluster.config.bucket_map
    # Two accounts in different buckets of s0; the first one's bucket moves to s1.
    key, other = [k for k in range(N_ACCOUNTS) if live[shardkit.bucket_for(k, 1024)] == "s0"][:2]
    bucket = shardkit.bucket_for(key, 1024)
    assert shardkit.bucket_for(other, 1024) != bucket
    new_map = list(live)
    new_map[bucket] = "s1"
    rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new_map), "test: one bucket, stale deletes"))
    with psycopg.connect(dev.shards[0].primary.dsn) as c:  # cleaned up on the old owner
        assert c.execute("SELECT count(*) FROM accounts WHERE id = %s", (key,)).fetchone()[0] == 0
    assert stale.shard_for("accounts", key) == "s0"

    with psycopg.connect(dev.shards[0].primary.dsn) as c:
        before = c.execute("SELECT balance FROM accounts WHERE id = %s", (other,)).fetchone()[0]
    StaleSession = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
    statements = [
        update(Account).where(Account.id == key).values(balance=5),
        delete(Entry).where(Entry.account_id == key),
        # Several keys: the one still on s0 matches, the moved one would be lost.
        update(Account).where(Account.id.in_([other, key])).values(balance=5),
    ]
    for stmt in statements:
        with StaleSession() as s:
            with pytest.raises(shardkit.NotOwned) as ei:
                s.execute(stmt)
            assert ei.value.shard == "s0" and ei.value.bucket == bucket
            assert f"about bucket {bucket}" in str(ei.value)
            with pytest.raises(Exception, match="current transaction is aborted"):
                s.execute(select(Account.id).where(Account.id == other))  # nothing can commit
    # Nothing was written: the row on s0 that matched (other) is untouched.
    with psycopg.connect(dev.shards[0].primary.dsn) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (other,)).fetchone()[0] == before

    # run_transaction: refused on s0, map reloaded, retried on s1, where the row is.
    S2 = sessionmaker(class_=shardkit.ShardedSession, cluster=stale2, consistency="strong")
    counts = []

    def fn(s):
        counts.append(s.execute(update(Account).where(Account.id == key).values(balance=9)).rowcount)
    shardkit.run_transaction(S2, fn)
    assert counts == [1]  # the refused attempt returned nothing
    with psycopg.connect(dev.shards[1].primary.dsn) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (key,)).fetchone()[0] == 9

    # With the current map a statement that matches nothing is just that.
    with Session() as s:
        assert s.execute(update(Account).where(Account.id == 10**9).values(balance=1)).rowcount == 0
        assert s.execute(delete(Entry).where(Entry.account_id.in_([10**9, 10**9 + 1]))).rowcount == 0
        s.execute(update(Account).where(Account.id == key).values(balance=0))
        s.commit()
    stale.dispose()
    stale2.dispose()


def test_a_table_added_after_init_is_not_moved_without_its_guard(world):
    """A hash table created (and configured) after `rebalance init` has no guard trigger:
    moving it would not capture the writes made during the copy.  The mover refuses and
    says to run init, which installs the guard; then the move may start."""
    dev, cluster, cfg_path, Session = world
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute("CREATE TABLE notes (id bigint PRIMARY KEY, account_id bigint NOT NULL, body text)")
    raw = tomllib.loads(cfg_path.read_text())
    raw["groups"]["accounts"]["tables"]["notes"] = "account_id"
    wider = shardkit.Cluster.from_config(raw, follow_map=False)
    try:
        live = wider.config.bucket_map
        bucket = next(b for b, s in enumerate(live) if s == "s0")
        new_map = list(live)
        new_map[bucket] = "s2"
        plan = plan_from_maps(live, tuple(new_map), "test: a table without its guard")
        mover = rebalance.Mover(wider, grace=0, progress=lambda line: None)
        with pytest.raises(shardkit.RebalanceError, match=r"notes on s0 have no ownership guard.*rebalance init"):
            mover.start(plan)
        assert rebalance.move_status(wider) == rebalance.move_status(cluster)  # nothing recorded
        rebalance.init(wider)
        mover._check_triggers(["s0", "s2"], None)  # the guard is there now
    finally:
        wider.dispose()
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
                c.execute("DROP TABLE notes")


def test_two_movers_cannot_take_the_same_buckets(world):
    dev, cluster, cfg_path, Session = world
    live = cluster.config.bucket_map
    plan = plan_drain(live, "s2")
    mover = rebalance.Mover(cluster, grace=0, progress=lambda line: None)
    move_id = mover.start(plan, max_buckets=512)
    try:
        with pytest.raises(shardkit.RebalanceError, match=f"move {move_id} is still running"):
            mover.start(plan)
        # A second mover for the same move is refused while the first holds it.
        with cluster.catalog.engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_lock(:c, :m)"),
                           {"c": rebalance.MOVER_LOCK_CLASS, "m": move_id})
            with pytest.raises(shardkit.RebalanceError, match="being run by another mover"):
                mover.run(move_id)
            holder.execute(text("SELECT pg_advisory_unlock(:c, :m)"),
                           {"c": rebalance.MOVER_LOCK_CLASS, "m": move_id})
            holder.commit()
    finally:
        result = rebalance.abort(cluster, move_id)
    assert result["undone_batches"]
    cluster.refresh_map()
    assert cluster.config.bucket_map == live
    assert verify(cluster).ok


@pytest.mark.parametrize("kill_after", ["capturing", "copied", "switched", "verified", "cleaned"])
def test_mover_killed_at_each_step_then_resumed(world, kill_after):
    dev, cluster, cfg_path, Session = world
    cluster.refresh_map()
    owns_s2 = "s2" in cluster.config.bucket_map
    with Writers(Session, n=2) as writers:
        move_id = kill_mover_after(cluster, cfg_path, kill_after, "--drain" if owns_s2 else "--add", "s2",
                                   "--batch-buckets", "256")
        resume(cfg_path, move_id)
        _writes(writers)
    assert not writers.errors, writers.errors[:3]
    status = rebalance.move_status(cluster, move_id)[0]
    assert status["state"] == "done"
    _check_ledger(dev, cluster, writers)
    cluster.refresh_map()
    assert ("s2" in cluster.config.bucket_map) != owns_s2


def test_cli_without_catalog_says_it_cannot_rebalance(world, tmp_path):
    dev = world[0]
    path = tmp_path / "plain.toml"
    dev.write_config(path, GROUPS)
    r = _cli("rebalance", "plan", "--add", "s2", "--config", str(path))
    assert r.returncode == 2
    assert "no catalog" in r.stderr and "cannot be rebalanced" in r.stderr


def test_cli_plan_and_status(world):
    dev, cluster, cfg_path, Session = world
    cluster.refresh_map()
    flag = ["--drain", "s2"] if "s2" in cluster.config.bucket_map else ["--add", "s2"]
    r = _cli("rebalance", "plan", *flag, "--json", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["moves"] and tuple(plan["old_map"]) == cluster.config.bucket_map
    r = _cli("rebalance", "status", "--json", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    assert all(m["state"] in ("done", "aborted") for m in json.loads(r.stdout))


def test_cross_shard_reads_during_a_move_see_each_row_once(world):
    dev, cluster, cfg_path, Session = world
    cluster.refresh_map()
    live = cluster.config.bucket_map
    plan = plan_drain(live, "s2") if "s2" in live else plan_add_shards(live, ["s2"])
    with Session() as s:
        expected_ids = sorted(s.scalars(select(Account.id)).all())
        expected_entries = s.scalar(select(func.count()).select_from(Entry))
    assert len(expected_ids) == len(set(expected_ids))
    verified = threading.Event()
    passes = ReadPasses()

    class HeldAfterTheCopy(HeldMover):
        """Waits after recording "copied" until the loop below has verified the cluster
        in that state (or 30 s), and after each step until the loop has read the cluster
        in it: on a loaded machine a fixed delay could pass before the loop reached it."""

        def _record(self, move_id, batch, step, detail=None):
            if step == "copied":
                rebalance.Mover._record(self, move_id, batch, step, detail)
                verified.wait(30)
                passes.wait()
            else:
                super()._record(move_id, batch, step, detail)

    mover = HeldAfterTheCopy(cluster, passes, grace=0.3, progress=lambda line: None)
    done = threading.Event()
    errors = []

    def run():
        try:
            mover.apply(plan, max_buckets=1024)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()
    threading.Thread(target=run, daemon=True).start()
    seen_steps = set()
    checks = 0
    verified_in_flight = False
    while not done.is_set():
        move_id = latest_move(cluster)
        steps = set(journal_steps(cluster, move_id)) if move_id else set()
        with Session() as s:
            ids = s.scalars(select(Account.id).order_by(Account.id)).all()
            n_entries = s.scalar(select(func.count()).select_from(Entry))
            joined = s.scalar(select(func.count()).select_from(Entry).join(Account,
                              Account.id == Entry.account_id))
        # A key-less write on every shard touches each row once, never a copy (retried
        # if it meets the instant of a switch).
        touched = shardkit.run_transaction(Session, lambda s: s.execute(
            update(Account).values(balance=Account.balance)
            .execution_options(shardkit_all_shards=True)).rowcount)
        assert ids == expected_ids, f"during {sorted(steps)}: {len(ids)} rows, expected {len(expected_ids)}"
        assert n_entries == expected_entries == joined
        assert touched == len(expected_ids)
        if cluster.foreign_buckets:
            seen_steps |= steps
            if "copied" in steps and "switched" not in steps and not verified_in_flight:
                report = verify(cluster)
                if "switched" not in journal_steps(cluster, move_id):  # else the map moved under it
                    assert report.ok, report.render()
                    assert sum(t.in_flight for t in report.tables) > 0
                    verified_in_flight = True
                verified.set()
        checks += 1
        passes.passed()
        time.sleep(0.05)
    assert not errors, errors
    # The reads above ran while copies existed on the target and leftovers on the source.
    assert {"copied", "switched"} <= seen_steps, seen_steps
    assert verified_in_flight
    assert checks > 10
    assert not cluster.foreign_buckets


def test_verify_reports_ownership_that_disagrees_with_the_map(world):
    dev, cluster, cfg_path, Session = world
    cluster.refresh_map()
    assert verify(cluster).ok
    bucket = next(b for b, s in enumerate(cluster.config.bucket_map) if s == "s0")
    with psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as c:
        c.execute("DELETE FROM shardkit.owned_buckets WHERE bucket = %s", (bucket,))
    with psycopg.connect(dev.shards[1].primary.dsn, autocommit=True) as c:
        c.execute("INSERT INTO shardkit.owned_buckets VALUES (%s)", (bucket,))
    try:
        report = verify(cluster)
        assert not report.ok
        by_shard = {o["shard"]: o for o in report.ownership}
        assert by_shard["s0"]["missing"] == [bucket] and by_shard["s1"]["extra"] == [bucket]
        assert "s0 does not own 1 bucket the map gives it" in report.render()
    finally:
        with psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as c:
            c.execute("INSERT INTO shardkit.owned_buckets VALUES (%s)", (bucket,))
        with psycopg.connect(dev.shards[1].primary.dsn, autocommit=True) as c:
            c.execute("DELETE FROM shardkit.owned_buckets WHERE bucket = %s", (bucket,))
    assert verify(cluster).ok


def test_plan_even_by_rows_uses_measured_weights(world):
    dev, cluster, cfg_path, Session = world
    r = _cli("rebalance", "plan", "--even", "rows", "--json", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    # Weights are the rows per bucket across the moving tables, measured on the shards.
    with Session() as s:
        total = s.scalar(select(func.count()).select_from(Account)) + \
            s.scalar(select(func.count()).select_from(Entry))
    assert sum(plan["weights"]) == total


def test_writers_holding_several_moving_buckets_do_not_deadlock_the_switch(world):
    dev, cluster, cfg_path, Session = world
    cluster.refresh_map()
    live = cluster.config.bucket_map
    plan = plan_drain(live, "s2") if "s2" in live else plan_add_shards(live, ["s2"])
    moving = {m.bucket for m in plan.moves}
    by_source: dict[str, list[int]] = {}
    for k in range(N_ACCOUNTS):
        b = shardkit.bucket_for(k, 1024)
        if b in moving:
            by_source.setdefault(live[b], []).append(k)
    keys = max(by_source.values(), key=len)  # accounts of moving buckets on one source shard
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            a, b = rnd.sample(keys, 2)

            def fn(s, a=a, b=b):
                # One transaction, two buckets, holding the first while writing the second.
                s.execute(update(Account).where(Account.id == a).values(balance=Account.balance + 1))
                s.execute(select(func.pg_sleep(0.02)).execution_options(shardkit_shard=live[
                    shardkit.bucket_for(a, 1024)]))
                s.execute(update(Account).where(Account.id == b).values(balance=Account.balance + 1))
            try:
                shardkit.run_transaction(Session, fn, retries=3)
                done[0] += 1
            except shardkit.CrossShardWriteError:
                pass  # a and b ended up on different shards mid-move: one transaction per shard
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        mover = rebalance.Mover(cluster, grace=0.1, progress=lambda line: None)
        mover.apply(plan, max_buckets=1024)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert done[0] > 20
    assert verify(cluster).ok


def test_page_slices_and_rests_move_the_same_rows(world, monkeypatch):
    """Bulk steps read tables a few pages at a time and rest between slices (duty 0.5):
    nothing is lost, duplicated or left behind, and the mover works about half the time."""
    dev, cluster, cfg_path, Session = world
    # A resting mover's slices are an eighth of this: 3 pages (the clean-up's too).
    monkeypatch.setattr(rebalance, "_CHUNK_PAGES", 24)
    cluster.refresh_map()
    live = cluster.config.bucket_map
    plan = plan_drain(live, "s2") if "s2" in live else plan_add_shards(live, ["s2"])
    with psycopg.connect(dev.shards[0].primary.dsn) as c:
        chunks = rebalance._page_chunks(c, "entries", 3)  # noqa: SLF001
    assert len(chunks) > 3 and chunks[0].startswith("ctid >= '(0,0)'") and "<" not in chunks[-1]
    rests = []
    mover = rebalance.Mover(cluster, grace=0.2, duty=0.5, progress=lambda line: None)
    real_sleep = time.sleep
    monkeypatch.setattr(rebalance.time, "sleep", lambda s: (rests.append(s), real_sleep(s)))
    with Writers(Session) as writers:
        _writes(writers)
        mover.apply(plan, max_buckets=1024)
        _writes(writers)
    assert not writers.errors, writers.errors[:3]
    assert len(rests) > 10  # one rest per slice of pages per bulk step
    _check_ledger(dev, cluster, writers)
    with pytest.raises(shardkit.RebalanceError, match="duty 0 must be more than 0"):
        rebalance.Mover(cluster, duty=0)


def test_a_bucket_index_keeps_the_expression_it_indexes(world):
    """Passes over an integer key compute the bucket in the scan (the key mixed once), except
    on a table with an index on shardkit.bucket(key, n), which only that expression uses;
    moves take the same rows either way."""
    dev, cluster, cfg_path, Session = world
    n = cluster.config.bucket_count
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE INDEX accounts_bucket ON accounts (shardkit.bucket(id, {n}))")
    try:
        with psycopg.connect(dev.shards[0].primary.dsn) as c:
            tables = {t.name: t for t in rebalance._moved_tables(cluster, c, "s0")}  # noqa: SLF001
        assert tables["accounts"].scan is None
        assert tables["accounts"].scan_sql() == ("", tables["accounts"].bucket_sql)
        lateral, bucket = tables["entries"].scan
        assert "LATERAL" in lateral and "shardkit.bucket" not in bucket
        cluster.refresh_map()
        live = cluster.config.bucket_map
        plan = plan_drain(live, "s2") if "s2" in live else plan_add_shards(live, ["s2"])
        with Writers(Session) as writers:
            _writes(writers)
            rebalance.Mover(cluster, grace=0.2, progress=lambda line: None).apply(plan, max_buckets=1024)
            _writes(writers)
        assert not writers.errors, writers.errors[:3]
        _check_ledger(dev, cluster, writers)
    finally:
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
                c.execute("DROP INDEX IF EXISTS accounts_bucket")


def test_a_catch_up_that_no_longer_shrinks_goes_to_the_cut_over(world, monkeypatch):
    """With no threshold to get below (_CUTOVER_BELOW 0), only rounds that stop shrinking
    the backlog, or the round limit, end the catch-up: writers of the moving buckets keep
    it from converging (BENCHMARKS.md section 4 ran all 50 rounds so).  It ends within a
    few rounds, says so, and loses no acknowledged write."""
    dev, cluster, cfg_path, Session = world
    monkeypatch.setattr(rebalance, "_CUTOVER_BELOW", 0)
    reads: list[int] = []  # per catch-up (the first, and any between cut-over attempts)
    real_catch_up, real_round = rebalance.Mover._catch_up, rebalance.Mover._catch_up_round

    def catch_up(self, *a, **kw):
        reads.append(0)
        return real_catch_up(self, *a, **kw)

    def catch_up_round(self, *a, **kw):
        reads[-1] += 1
        return real_round(self, *a, **kw)

    monkeypatch.setattr(rebalance.Mover, "_catch_up", catch_up)
    monkeypatch.setattr(rebalance.Mover, "_catch_up_round", catch_up_round)
    cluster.refresh_map()
    live = cluster.config.bucket_map
    plan = plan_drain(live, "s2") if "s2" in live else plan_add_shards(live, ["s2"])
    lines: list[str] = []
    with Writers(Session, n=2) as writers:
        _writes(writers)
        move_id = rebalance.Mover(cluster, grace=0.2, progress=lines.append).apply(plan, max_buckets=1024)
        _writes(writers)
    assert not writers.errors, writers.errors[:3]
    assert writers.ops > 20
    # Reads of the change log per catch-up: a round's own, and more for a read that filled
    # _CHANGES_PER_ROUND (none of these writers' rounds come near it).  All 50 rounds before.
    assert reads and max(reads) <= 15 < rebalance._CATCH_UP_ROUNDS, reads
    with cluster.catalog.engine.connect() as c:
        switched = [r[0] for r in c.execute(text(
            "SELECT detail FROM shardkit_catalog.journal WHERE move_id = :m AND step = 'switched' "
            "ORDER BY id"), {"m": move_id})]
    assert switched and all(d["catch_up_ended"] == "no longer shrinking" and d["catch_up_rounds"] >= 3
                            for d in switched), switched
    assert sum(d["catch_up_rounds"] for d in switched) <= sum(reads), (switched, reads)
    assert sum(": no longer shrinking), switched to map version" in line for line in lines) == len(switched), lines
    _check_ledger(dev, cluster, writers)


def test_a_cut_over_that_would_pause_writes_past_max_pause_gives_up_and_the_move_resumes(world, monkeypatch):
    """The target takes 1 s to apply anything during the cut-over (a slow statement there,
    with the batch's writes paused): with max_pause 0.2 s, each cut-over is cancelled at
    max_pause, lets the writes go, catches up and tries again; after _PAUSE_ATTEMPTS the
    move stops with an error that says why and what to do.  Writers of the moving buckets
    never waited the second out, and nothing is lost.  Resumed once the target is quick
    again, the move finishes."""
    dev, cluster, cfg_path, Session = world
    slow_attempts: list[float] = []
    real_apply = rebalance.Mover._apply_changes

    def slow_apply(self, src, tgt, tables, buckets, limit, up_to=None, deadline=None):
        if deadline is not None:  # the cut-over's apply
            t0 = time.monotonic()
            try:
                tgt.execute("SELECT pg_sleep(1)")
            finally:
                slow_attempts.append(time.monotonic() - t0)
        return real_apply(self, src, tgt, tables, buckets, limit, up_to, deadline)

    monkeypatch.setattr(rebalance.Mover, "_apply_changes", slow_apply)
    cluster.refresh_map()
    live = cluster.config.bucket_map
    plan = plan_drain(live, "s2") if "s2" in live else plan_add_shards(live, ["s2"])
    mover = rebalance.Mover(cluster, grace=0.1, max_pause=0.2, progress=lambda line: None)
    with Writers(Session, n=2) as writers:
        _writes(writers)
        with pytest.raises(shardkit.RebalanceError) as err:
            mover.apply(plan, max_buckets=1024)
        _writes(writers)
    message = str(err.value)
    assert f"gave up {rebalance._PAUSE_ATTEMPTS} times" in message and "max_pause 0.2 s" in message, message
    assert "Nothing is lost" in message and "rebalance resume" in message, message
    assert len(slow_attempts) == rebalance._PAUSE_ATTEMPTS, slow_attempts
    # Cancelled at what was left of max_pause, not slept out.
    assert max(slow_attempts) < 0.9 and 0.15 <= mover.longest_pause < 0.9, (slow_attempts, mover.longest_pause)
    assert not writers.errors, writers.errors[:3]
    assert writers.longest_wait < 0.9, writers.longest_wait
    move_id = latest_move(cluster)
    status, = rebalance.move_status(cluster, move_id)
    assert status["state"] == "running" and "gave up" in (status["error"] or ""), status
    monkeypatch.setattr(rebalance.Mover, "_apply_changes", real_apply)
    with Writers(Session, n=2) as writers:
        _writes(writers)
        rebalance.Mover(cluster, grace=0.1, max_pause=0.2, progress=lambda line: None).run(move_id)
    assert not writers.errors, writers.errors[:3]
    assert journal_steps(cluster, move_id)[-1] == "done", journal_steps(cluster, move_id)
    _check_ledger(dev, cluster, writers)


def test_max_pause_must_be_a_positive_number_of_seconds():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(shardkit.RebalanceError, match="max_pause"):
            rebalance.Mover(None, max_pause=bad)  # type: ignore[arg-type]
