"""A move meets the rest of a production day on its servers: the DBA's session settings
(statement_timeout, idle_in_transaction_session_timeout, default_transaction_isolation on
the database or the role the mover connects as), a migration queued behind a long analytics
query on the target while the cut-over runs, a table created (and guarded) by a migration
that the running mover's config does not know, and the guard installed again while a long
query holds a table.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own (test_move_fidelity's worlds), so settings made with ALTER
DATABASE stay in the test.  Moves drain s0 onto s1, in-process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from test_move_fidelity import World, hash_group, make_world

from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain
from shardkit.verify import verify

pytestmark = pytest.mark.integration

SCHEMA = "CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)"


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.fixture
def world(dev, tmp_path):
    made: list[World] = []

    def make(tables: dict[str, str] | None = None, schema: str = SCHEMA) -> World:
        w = make_world(dev, tmp_path, schema, hash_group(tables or {"accounts": "tenant"}))
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


def fill(w: World, n: int = 40) -> list[int]:
    """Rows 0..n-1 on their owners; the tenants s0 owns (those a drain of s0 moves)."""
    for i in range(n):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(n) if w.owner("accounts", i) == "s0"]
    assert moving
    return moving


def set_on_database(w: World, shard: str, setting: str, value: str) -> None:
    """What a DBA does: a default for every new session of the database."""
    w.sql(shard, f"ALTER DATABASE {w.db} SET {setting} = '{value}'")


def drain(w: World, mover: rebalance.Mover | None = None, **kw: Any) -> int:
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")
    return (mover or rebalance.Mover(w.cluster, **{"grace": 0, **kw})).apply(plan)


def before_cut_over(mover: rebalance.Mover, hook: Callable[[], None]) -> None:
    """Run ``hook`` once, right before the mover's (first) cut-over."""
    original = mover._cut_over
    ran: list[bool] = []

    def hooked(*args: Any, **kw: Any) -> Any:
        if not ran:
            ran.append(True)
            hook()
        return original(*args, **kw)

    mover._cut_over = hooked  # type: ignore[method-assign]


def writer_holding_the_gate(w: World, tenant: int, name: str, hold: float) -> tuple[threading.Thread, list]:
    """A writer (READ COMMITTED, as the README asks) that updates a row of a moving bucket on
    the source and keeps its transaction open ``hold`` seconds; returns once it holds the
    bucket's gate (shared), with its thread and a list that receives its error, if any."""
    holding = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with w.conn("s0") as c:
                c.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                c.execute("UPDATE accounts SET name = %s WHERE tenant = %s", (name, tenant))
                holding.set()
                time.sleep(hold)
                c.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            holding.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert holding.wait(10)
    return t, errors


def expected_rows(n: int, changed: dict[int, str]) -> list[str]:
    return sorted(f"({i},{i},{changed.get(i, f'n{i}')})" for i in range(n))


def assert_drained(w: World, n: int, changed: dict[int, str]) -> None:
    assert not w.rows("s0", "accounts")
    got = w.rows("s1", "accounts")
    want = expected_rows(n, changed)
    assert got == want, f"missing: {sorted(set(want) - set(got))[:5]}, unexpected: {sorted(set(got) - set(want))[:5]}"
    report = verify(w.cluster)
    assert report.ok, report.render()


# -- the DBA's session defaults -------------------------------------------------------------------


def test_a_database_default_of_repeatable_read_does_not_lose_a_write_the_cut_over_waited_for(world):
    """The DBA sets default_transaction_isolation = 'repeatable read' on the database; the
    application's writers ask for READ COMMITTED explicitly, as the README requires.  A writer
    of a moving bucket is in flight when the cut-over begins: the cut-over waits for it (the
    gate), then applies the last changes.  Its write was acknowledged before the switch, so
    it must be on the target afterwards, not left behind on the source."""
    w = world()
    moving = fill(w)
    for shard in ("s0", "s1"):
        set_on_database(w, shard, "default_transaction_isolation", "repeatable read")
    mover = rebalance.Mover(w.cluster, grace=0)
    writers: list[tuple[threading.Thread, list]] = []
    before_cut_over(mover, lambda: writers.append(writer_holding_the_gate(w, moving[0], "late", 0.7)))
    drain(w, mover)
    (t, errors), = writers
    t.join(10)
    assert not errors, errors
    assert_drained(w, 40, {moving[0]: "late"})


def test_a_statement_timeout_below_the_movers_lock_timeout_does_not_stop_the_move(world):
    """The role's (here: the database's) statement_timeout is 1 s, a common OLTP guard.  A
    writer of a moving bucket keeps its transaction open 1.5 s across the cut-over: the
    README says the cut-over waits up to --max-pause (1 s), then catches up and tries
    again.  The DBA's timeout must not turn that wait into a failed move."""
    w = world()
    moving = fill(w)
    for shard in ("s0", "s1"):
        set_on_database(w, shard, "statement_timeout", "1s")
    mover = rebalance.Mover(w.cluster, grace=0)
    writers: list[tuple[threading.Thread, list]] = []
    before_cut_over(mover, lambda: writers.append(writer_holding_the_gate(w, moving[0], "slow", 1.5)))
    drain(w, mover)
    (t, errors), = writers
    t.join(10)
    assert not errors, errors
    assert_drained(w, 40, {moving[0]: "slow"})


def test_an_idle_in_transaction_timeout_does_not_kill_the_copy(world):
    """idle_in_transaction_session_timeout (here 300 ms) on the target's database: the
    copy's target transaction commits no sooner than `grace` (1 s, the default) after
    capture began, and sits idle in it meanwhile; verification keeps one side's snapshot
    open while it reads the other.  The move must finish, not die at every attempt."""
    w = world()
    fill(w)
    for shard in ("s0", "s1"):
        set_on_database(w, shard, "idle_in_transaction_session_timeout", "300ms")
    drain(w, grace=1.0)
    assert_drained(w, 40, {})


# -- a migration queued behind a long query on the target, during the cut-over -----------------------


def _waiting_on_lock(w: World, shard: str, not_pid: int) -> bool:
    return bool(w.sql(shard, "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'relation' "
                             "AND pid <> %s", (not_pid,))[0][0])


def test_a_lock_queue_on_the_target_does_not_pause_the_sources_writers_unboundedly(world, caplog):
    """On the target, an analytics query holds `accounts` (BEGIN; SELECT ...; still open) and
    a migration's ALTER TABLE waits behind it for its ACCESS EXCLUSIVE lock; every later
    statement on the table queues behind the ALTER.  The cut-over, with writes of the moving
    buckets paused on the source, must not wait in that queue for as long as the analytics
    query runs: the README bounds the pause by --max-pause (1 s), then the mover catches up
    and tries again.  A writer of a moving bucket on the source must get through meanwhile."""
    caplog.set_level("WARNING", logger="shardkit.rebalance")
    w = world()
    moving = fill(w)
    reader = w.conn("s1")
    alter_errors: list[BaseException] = []
    alter_pid: list[int] = []
    blocked = threading.Event()

    def block_the_target() -> None:
        # A change the cut-over must apply on the target (logged after catch-up).
        w.sql("s0", "UPDATE accounts SET name = 'before-switch' WHERE tenant = %s", (moving[1],))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM accounts").fetchall()

        def alter() -> None:
            try:
                with w.conn("s1") as c:
                    alter_pid.append(c.info.backend_pid)
                    c.execute("ALTER TABLE accounts ADD COLUMN note text")
            except BaseException as e:  # noqa: BLE001
                alter_errors.append(e)

        threading.Thread(target=alter, daemon=True).start()
        deadline = time.monotonic() + 10
        while not alter_pid or not _waiting_on_lock(w, "s1", -1):
            assert time.monotonic() < deadline, "the ALTER TABLE never queued"
            time.sleep(0.02)
        blocked.set()

    mover = rebalance.Mover(w.cluster, grace=0)
    before_cut_over(mover, block_the_target)
    move_errors: list[BaseException] = []

    def run() -> None:
        try:
            drain(w, mover)
        except BaseException as e:  # noqa: BLE001
            move_errors.append(e)

    m = threading.Thread(target=run, daemon=True)
    m.start()
    try:
        assert blocked.wait(30), move_errors
        deadline = time.monotonic() + 10
        while not _waiting_on_lock(w, "s1", alter_pid[0]):  # the mover in the queue too
            assert time.monotonic() < deadline and not move_errors, move_errors
            time.sleep(0.02)
        with w.conn("s0") as c:
            c.execute("SET statement_timeout = '8s'")
            try:
                c.execute("UPDATE accounts SET name = 'during' WHERE tenant = %s", (moving[0],))
            except psycopg.errors.QueryCanceled:
                pytest.fail("a write of a moving bucket on the source waited 8 s for a cut-over "
                            "stuck behind a lock queue on the target")
    finally:
        reader.execute("COMMIT")
        reader.close()
        m.join(60)
    assert not m.is_alive()
    assert not move_errors and not alter_errors, (move_errors, alter_errors)
    # The operator is told what held the cut-over (not "a writer").
    said = [r.getMessage() for r in caplog.records if "lock_timeout" in r.getMessage()]
    assert said and all("ALTER TABLE" in m and "s1" in m for m in said), said
    w.sql("s0", "ALTER TABLE accounts ADD COLUMN note text")  # the migration, on the other shard
    got = dict(w.sql("s1", "SELECT tenant, name FROM accounts WHERE tenant = ANY(%s)",
                     ([moving[0], moving[1]],)))
    assert got == {moving[0]: "during", moving[1]: "before-switch"}, got
    assert not w.rows("s0", "accounts")
    assert verify(w.cluster).ok


# -- a table the running mover's config does not know -------------------------------------------


def _newer_cluster(w: World) -> Any:
    """The next deploy's cluster: its config adds table orders to the hash group."""
    import tomllib

    import shardkit

    cfg = tomllib.loads(w.cfg_path.read_text(encoding="utf-8"))
    cfg["groups"]["g"]["tables"]["orders"] = "tenant"
    return shardkit.Cluster.from_config(cfg, follow_map=False)


def test_a_table_created_and_guarded_during_the_move_is_not_left_behind(world):
    """A long drain runs with yesterday's config.  Today's deploy adds table `orders` to the
    hash group: its migration creates the table and calls op.install_shardkit_guard() on
    every shard (as the README asks), and the new code writes orders of every tenant, those
    of the moving buckets on their owner, the source.  The guard records those writes for
    the move.  The mover, which does not know the table, must not switch the buckets (and
    later delete nothing of orders): the orders would stay on the source, which no longer
    owns them, and the new owner would serve a tenant without its orders.  Refusing is
    fine; resuming with the new config must then carry the orders over."""
    from shardkit._guard import install_guard

    w = world()
    moving = fill(w)
    newer = _newer_cluster(w)

    def deploy() -> None:
        for shard in ("s0", "s1"):
            w.sql(shard, "CREATE TABLE orders (id bigint PRIMARY KEY, tenant bigint NOT NULL, item text)")
            with newer.primary(shard).begin() as c:
                install_guard(c, newer.config, None)   # what op.install_shardkit_guard() does
        for i in range(40):
            w.sql(w.owner("accounts", i), "INSERT INTO orders VALUES (%s, %s, 'o')", (1000 + i, i))

    moved: list[int] = []
    errors: list[BaseException] = []

    def progress(line: str) -> None:
        if ": copied " in line and not moved:
            moved.append(1)
            deploy()

    w.cluster.refresh_map()
    try:
        rebalance.Mover(w.cluster, grace=0, progress=progress).apply(plan_drain(w.cluster.config.bucket_map, "s0"))
    except rebalance.RebalanceError as e:
        errors.append(e)
    try:
        assert moved
        stranded = w.sql("s0", "SELECT count(*) FROM orders WHERE tenant = ANY(%s)", (moving,))[0][0]
        w.cluster.refresh_map()
        if not errors:
            assert stranded == 0 and "s0" not in w.cluster.config.bucket_map, (
                f"{stranded} orders of the moved tenants stay on s0, which no longer owns their buckets; "
                f"s1 serves those tenants without them")
        message = str(errors[0])
        assert "orders" in message and "config" in message, message
        assert "s0" in w.cluster.config.bucket_map, "switched although the orders did not move"
        (move_id,) = w.running_moves()
        rebalance.Mover(newer, grace=0).run(move_id)
        assert not w.sql("s0", "SELECT count(*) FROM orders")[0][0]
        assert w.sql("s1", "SELECT count(*) FROM orders")[0][0] == 40
        assert_drained(w, 40, {})
        report = verify(newer)
        assert report.ok, report.render()
    finally:
        newer.dispose()


# -- installing the guard again behind a long query ---------------------------------------------


def test_installing_a_current_guard_again_does_not_lock_out_the_tables_behind_a_long_query(world):
    """A migration that creates a sharded table calls op.install_shardkit_guard(), which goes
    over every guarded table (and `shardkit rebalance init`, run again when a shard is added,
    does the same).  An analytics query (or a move's copy) holds `accounts` meanwhile.  Its
    guard is current: there is nothing to change, so the migration must neither wait for the
    query nor, queued for the ACCESS EXCLUSIVE lock DROP TRIGGER takes, make every read and
    write of `accounts` on that shard wait behind it."""
    from shardkit._guard import install_guard

    w = world()
    fill(w)
    reader = w.conn("s0")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM accounts").fetchall()
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with w.cluster.primary("s0").begin() as c:
                c.exec_driver_sql("SET LOCAL lock_timeout = '6s'")
                install_guard(c, w.cluster.config, None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    m = threading.Thread(target=migrate, daemon=True)
    m.start()
    try:
        m.join(3)
        with w.conn("s0") as c:
            c.execute("SET statement_timeout = '2s'")
            try:
                c.execute("SELECT name FROM accounts WHERE id = 0").fetchall()
            except psycopg.errors.QueryCanceled:
                pytest.fail("a read of accounts queued behind the guard's reinstallation, which "
                            "waits for the long query")
    finally:
        reader.execute("COMMIT")
        reader.close()
        m.join(10)
    assert not errors, errors
    # Still guarded, and as current as before: a move goes.
    drain(w)
    assert_drained(w, 40, {})
