"""Tests of the catalog's availability, as an application process sees it.

The catalog lives in a PostgreSQL server of its own (a one-node dev cluster), so it
can be stopped, killed, frozen or cut off while the shards keep serving.  Processes
that follow it reach it either directly or through a TCP relay the test can cut (a
partition that affects that process only, while another process, with catalog
access, moves buckets).  Checked against the real servers: routing, writes, reads and
scatter from the cached map while the catalog is away; the map is picked up within a
bounded time when it answers again (also a version published while the follower's
LISTEN connection was dead); a process that starts without a catalog; dispose with a
follower stuck connecting; a catalog with a wrong password, a wrong database or no
map; the map reloaded from many threads while they route writes; and a catalog restored
from a backup, whose map went back.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import BigInteger, Integer, create_engine, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._mapsync import MapFollower
from shardkit._rebalance_plan import plan_from_maps
from shardkit.catalog import Catalog
from shardkit.devcluster import _children
from movers import rows_by_key

pytestmark = pytest.mark.integration

BUCKETS = 64
ACCOUNTS = range(640)
CATALOG_DB = "shardkit_catalog"
# The dev servers trust 127.0.0.1, so this password is never checked (except for the
# role made to check it): it is there to be looked for in logs and messages.
PW = "Zq-s3cret-77"
# The follower's reconnect back-off grows to 5 s; add a connection attempt (3 s at most)
# and room for a busy machine.
PICKUP_BOUND = 12.0


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


GROUPS = {"groups": {"accounts": {"strategy": "hash", "tables": {"accounts": "id"}}}}


# -- a TCP relay the test can cut ---------------------------------------------------------

def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() on it
    except OSError:
        pass
    sock.close()


class Relay:
    """Relays 127.0.0.1:<port> to the catalog server.  ``cut()`` resets every relayed
    connection and every new one (a partition between one process and the catalog);
    ``mend()`` relays again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.is_cut = False
        self.closed = False
        self.lock = threading.Lock()
        self.socks: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept, name="test-relay", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.is_cut:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=3)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self.lock:
                self.socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.socks -= {src, dst}
            for s in (src, dst):
                _reset(s)

    def cut(self) -> None:
        self.is_cut = True
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            _reset(s)

    def mend(self) -> None:
        self.is_cut = False

    def close(self) -> None:
        self.cut()
        self.closed = True
        self.thread.join(2)
        self.listener.close()


# -- the world --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)
    catdev = shardkit_module_cluster_factory(shards=1, replicas=0)
    catnode = catdev.shards[0].primary
    catdev.create_catalog(CATALOG_DB)
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    w = SimpleNamespace(dev=dev, catnode=catnode, taken=set(), relays=[])
    w.admin = shardkit.Cluster.from_config(_config(w, _url(w, app="h2-admin")), follow_map=False)
    rebalance.init(w.admin)
    with _sessions(w.admin)() as s:
        s.add_all(Account(id=i, balance=i) for i in ACCOUNTS)
        s.commit()
    with catnode.connect(dbname=CATALOG_DB) as c:
        # h2app: the role of processes whose logins the tests refuse for a while.
        c.execute("CREATE ROLE h2app LOGIN")
        c.execute("GRANT USAGE ON SCHEMA shardkit_catalog TO h2app")
        c.execute("GRANT SELECT ON ALL TABLES IN SCHEMA shardkit_catalog TO h2app")
        # h2pw: a role whose password the server checks.
        c.execute("CREATE ROLE h2pw LOGIN PASSWORD 'right-pw'")
    if not hasattr(catnode, "datadir"):
        pytest.skip("edits the catalog server's pg_hba.conf and freezes its processes: local clusters only")
    hba = catnode.datadir / "pg_hba.conf"
    hba.write_text("host all h2pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    with catnode.connect() as c:
        c.execute("SELECT pg_reload_conf()")
    yield w
    w.admin.dispose()
    for r in w.relays:
        r.close()


def _url(w, *, port=None, db=CATALOG_DB, user="shardkit", password=PW, app=None) -> str:
    query = f"?application_name={app}" if app else ""
    return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{port or w.catnode.port}/{db}{query}"


def _config(w, catalog_url: str) -> dict:
    return {**w.dev.config_dict(), **GROUPS, "catalog": {"url": catalog_url}}


def _sessions(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


@pytest.fixture
def spawn(world):
    """``spawn(url, **kw)``: an application process (a Cluster) whose catalog is ``url``;
    disposed after the test."""
    made = []

    def make(url, **kw):
        c = shardkit.Cluster.from_config(_config(world, url), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.dispose()


def _relay(w) -> Relay:
    r = Relay(w.catnode.port)
    w.relays.append(r)
    return r


def _wait(cond, timeout: float, what: str) -> float:
    """Poll ``cond`` until true; return the seconds it took (fail after ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def _move(w, n: int, source: str, target: str, grace: float = 0.2) -> tuple[list[int], list[int], int]:
    """Move ``n`` buckets of ``source`` that hold accounts (and no test moved yet) to
    ``target`` with the admin process; (buckets, their account keys, the new version)."""
    w.admin.refresh_map()
    live = w.admin.config.bucket_map
    used = {shardkit.bucket_for(k, BUCKETS) for k in ACCOUNTS}
    picked = [b for b in range(BUCKETS) if live[b] == source and b in used and b not in w.taken][:n]
    assert len(picked) == n, "no buckets left to move"
    w.taken.update(picked)
    new = list(live)
    for b in picked:
        new[b] = target
    rebalance.Mover(w.admin, grace=grace, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new), f"test: {n} buckets {source} -> {target}"))
    w.admin.refresh_map()
    keys = [k for k in ACCOUNTS if k > 0 and shardkit.bucket_for(k, BUCKETS) in picked]
    return picked, keys, w.admin.map_version


def _bump(w, reason: str = "test: version bump") -> int:
    """Publish the live map again as a new version (nothing moves)."""
    cat = w.admin.catalog
    with cat.engine.begin() as c:
        live = cat.current_map(c)
        return cat.publish_map(c, live.bucket_map, reason)


def _placement(w, ids) -> dict[int, list[tuple[str, int]]]:
    """{id: [(shard, balance), ...]} read from every shard's primary."""
    listed = ", ".join(str(int(k)) for k in ids)
    return rows_by_key(w.dev.shards, f"SELECT id, balance FROM accounts WHERE id IN ({listed})")


def _catalog_backends(w, app: str) -> list[tuple[int, str]]:
    with w.catnode.connect(dbname=CATALOG_DB) as c:
        return c.execute("SELECT pid, query FROM pg_stat_activity WHERE application_name = %s "
                         "AND pid <> pg_backend_pid()", (app,)).fetchall()


def _log_text(caplog) -> list[str]:
    out = []
    for r in caplog.records:
        text = f"{r.name} {r.levelname} {r.getMessage()}"
        if r.exc_info:
            text += "\n" + logging.Formatter().formatException(r.exc_info)
        out.append(text)
    return out


def _assert_no_secret(caplog, *messages: str) -> None:
    for text in [*_log_text(caplog), *messages]:
        assert PW not in text and "right-pw" not in text, f"a password in: {text}"


def _catalog_warnings(caplog) -> list[str]:
    return [t for t in _log_text(caplog) if t.startswith("shardkit.catalog WARNING")]


def _catalog_retries(caplog) -> list[str]:
    """The follower's retries, said at WARNING once per cause and at DEBUG after that."""
    return [t for t in _log_text(caplog)
            if t.startswith(("shardkit.catalog WARNING", "shardkit.catalog DEBUG")) and "retrying in" in t]


def _work(w, app, ids: list[int]) -> None:
    """Keyed inserts, updates and reads, and a scatter count, through ``app`` (whose map
    is current): each must work, and land where that map says."""
    Session = _sessions(app)
    for k in ids:
        shardkit.run_transaction(Session, lambda s, k=k: s.add(Account(id=k, balance=k)))
    shardkit.run_transaction(Session, lambda s: s.execute(
        update(Account).where(Account.id == ids[0]).values(balance=-ids[0])))
    with Session() as s:
        assert s.get(Account, ids[1]).balance == ids[1]
        assert s.get(Account, ids[0]).balance == -ids[0]
        total = s.execute(select(func.count()).select_from(Account)).scalar_one()
    direct = sum(len(v) for v in rows_by_key(w.dev.shards, "SELECT id, 0 FROM accounts").values())
    assert total == direct
    placed = _placement(w, ids)
    for k in ids:
        assert [p[0] for p in placed.get(k, [])] == [app.shard_for("accounts", k)], (k, placed.get(k))


# -- 1. the catalog server stopped, then killed, while a process runs ---------------------------

def test_catalog_server_stopped_and_killed_while_a_process_routes(world, spawn, caplog):
    w = world
    caplog.set_level(logging.INFO, logger="shardkit")
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    app = spawn(_url(w, app="h2-outage"))
    follower = app._follower
    _wait(follower.connected.is_set, 10, "the follower's first connection")
    version = app.map_version
    assert version is not None
    next_id = iter(range(10_000_000, 10_001_000))
    for how in ("stop", "kill"):
        caplog.clear()
        if how == "stop":
            w.catnode.stop()
        else:
            w.catnode.kill()
        try:
            _wait(lambda: not follower.connected.is_set(), 10, f"the follower to see the catalog's {how}")
            _work(w, app, [next(next_id) for _ in range(8)])
            # The follower keeps trying (several retries: it did not die on the first),
            # warning once per cause, not at every retry.
            _wait(lambda: len(_catalog_retries(caplog)) >= 4, 10, "the follower's retries")
            causes = {t.split("; routing by")[0].split("; retrying in")[0].split(" ", 2)[2]
                      for t in _catalog_retries(caplog)}
            assert 1 <= len(_catalog_warnings(caplog)) <= len(causes), (_catalog_warnings(caplog), causes)
            assert follower._thread.is_alive()
            assert app.map_version == version
        finally:
            w.catnode.start()
        took = _wait(follower.connected.is_set, PICKUP_BOUND, "the follower to reconnect")
        warnings = _catalog_warnings(caplog)
        where = f"127.0.0.1:{w.catnode.port}/{CATALOG_DB}"
        assert warnings and all(t.count(where) == 1 for t in warnings), warnings[:3]
        _assert_no_secret(caplog)
        assert not [t for t in _log_text(caplog) if " ERROR " in t], _log_text(caplog)
        # LISTEN again: a new version reaches it by notification, not by the 30 s poll.
        bumped = _bump(w)
        # 10 s (was 3) on a loaded machine: still far under the 30 s poll it rules out.
        _wait(lambda: app.map_version == bumped, 10, f"version {bumped} after the {how} ({took:.1f} s to reconnect)")
        version = bumped
    _work(w, app, [next(next_id) for _ in range(4)])


# -- 2. a process cut off from the catalog while another moves buckets -------------------------

def test_move_made_while_a_process_was_cut_off_is_picked_up(world, spawn, caplog):
    w = world
    caplog.set_level(logging.INFO, logger="shardkit")
    relay = _relay(w)
    app = spawn(_url(w, port=relay.port, app="h2-cutoff"))
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    before = app.map_version
    relay.cut()
    _wait(lambda: not app._follower.connected.is_set(), 10, "the follower to see the cut")
    buckets, keys, version = _move(w, 2, "s0", "s1")
    assert version > before and app.map_version == before
    rows = _placement(w, [keys[0]])
    assert [p[0] for p in rows[keys[0]]] == ["s1"]
    (_, balance1), = _placement(w, [keys[1]])[keys[1]]
    assert app.shard_for("accounts", keys[0]) == "s0"
    Session = _sessions(app)
    # A keyed write by the stale map: refused by s0's guard, nothing written.
    with Session() as s:
        with pytest.raises(shardkit.NotOwned):
            s.execute(update(Account).where(Account.id == keys[0]).values(balance=-1))
        s.rollback()
    # run_transaction cannot reload the map: a clear error naming the catalog, no password.
    with pytest.raises(shardkit.ShardUnavailable) as e:
        shardkit.run_transaction(Session, lambda s: s.execute(
            update(Account).where(Account.id == keys[0]).values(balance=-1)), refresh_timeout=1)
    assert "catalog" in str(e.value) and f":{relay.port}/" in str(e.value), str(e.value)
    _assert_no_secret(caplog, str(e.value))
    assert _placement(w, [keys[0]]) == rows
    assert app._follower._thread.is_alive()
    relay.mend()
    took = _wait(lambda: app.map_version == version, PICKUP_BOUND, "the moved map after the cut mended")
    assert app.shard_for("accounts", keys[0]) == "s1"
    shardkit.run_transaction(Session, lambda s: s.execute(
        update(Account).where(Account.id == keys[0]).values(balance=-keys[0])))
    with Session() as s:
        assert s.get(Account, keys[1]).balance == balance1  # read from its new owner
    assert _placement(w, [keys[0]]) == {keys[0]: [("s1", -keys[0])]}, f"picked up after {took:.1f} s"


# -- 3. the LISTEN connection terminated server-side ------------------------------------------

def test_listen_connection_terminated_and_notification_sent_in_the_gap(world, spawn):
    """The follower's backend is terminated while the process's role may not log in,
    so it cannot LISTEN again before a new version is published: the refresh after it
    reconnects must still find that version (the 30 s poll would be too late)."""
    w = world
    app = spawn(_url(w, user="h2app", app="h2-listen"))
    follower = app._follower
    _wait(follower.connected.is_set, 10, "the follower's first connection")

    def listening():
        return [pid for pid, q in _catalog_backends(w, "h2-listen") if q.strip().upper().startswith("LISTEN")]

    _wait(lambda: len(listening()) == 1, 5, "the follower's LISTEN backend")
    with w.catnode.connect(dbname=CATALOG_DB) as c:
        c.execute("ALTER ROLE h2app NOLOGIN")
        try:
            pid, = listening()
            assert c.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]
            _wait(lambda: not follower.connected.is_set(), 5, "the follower to see its backend gone")
            bumped = _bump(w, "test: published while the follower cannot listen")
            # Not by the follower: it cannot log in (and the admin's bump notified nobody of it).
            assert app.map_version < bumped and not listening()
            assert follower._thread.is_alive()
        finally:
            c.execute("ALTER ROLE h2app LOGIN")
    took = _wait(lambda: app.map_version == bumped, PICKUP_BOUND, "the version published in the gap")
    _wait(lambda: len(listening()) == 1, 5, f"one LISTEN backend again (map picked up in {took:.1f} s)")


# -- 4. a process started while the catalog is unreachable ------------------------------------

def test_process_started_without_catalog_switches_when_it_answers(world, spawn, caplog):
    w = world
    caplog.set_level(logging.INFO, logger="shardkit")
    buckets, keys, version = _move(w, 2, "s0", "s1")
    rows = _placement(w, [keys[0]])
    assert [p[0] for p in rows[keys[0]]] == ["s1"]
    relay = _relay(w)
    relay.cut()
    t0 = time.monotonic()
    app = spawn(_url(w, port=relay.port, app="h2-late"))
    started = time.monotonic() - t0
    assert started < 5, f"from_config took {started:.1f} s with the catalog refusing connections"
    assert app.map_version is None and app.shard_for("accounts", keys[0]) == "s0"
    offline = spawn(_url(w, port=relay.port, app="h2-late-nofollow"), follow_map=False)
    Session = _sessions(app)
    # Writes by the file's map to moved buckets: refused, nothing written.
    with Session() as s:
        with pytest.raises(shardkit.NotOwned):
            s.execute(update(Account).where(Account.id == keys[0]).values(balance=-1))
        s.rollback()
    assert _placement(w, [keys[0]]) == rows
    # Keys the file's map still places right: fine.
    stay = next(k for k in ACCOUNTS if k > 0 and w.admin.shard_for("accounts", k) == "s0"
                and app.shard_for("accounts", k) == "s0")
    shardkit.run_transaction(Session, lambda s: s.execute(
        update(Account).where(Account.id == stay).values(balance=-stay)))
    assert _placement(w, [stay]) == {stay: [("s0", -stay)]}
    relay.mend()
    # run_transaction of a process that does not follow: refused by the file's map,
    # the map reloaded, the retry lands on the new owner.
    attempts = []

    def fn(s):
        attempts.append(offline.map_version)
        s.execute(update(Account).where(Account.id == keys[1]).values(balance=-keys[1]))

    shardkit.run_transaction(_sessions(offline), fn)
    assert attempts == [None, version]
    assert _placement(w, [keys[1]]) == {keys[1]: [("s1", -keys[1])]}
    # The following process switches by itself.
    took = _wait(lambda: app.map_version == version, PICKUP_BOUND, "the catalog's map after it answered")
    assert app.shard_for("accounts", keys[0]) == "s1"
    shardkit.run_transaction(Session, lambda s: s.execute(
        update(Account).where(Account.id == keys[0]).values(balance=-keys[0])))
    assert _placement(w, [keys[0]]) == {keys[0]: [("s1", -keys[0])]}, f"switched after {took:.1f} s"
    _assert_no_secret(caplog)


# -- 5. dispose while the follower is stuck connecting -----------------------------------------

def _library_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("shardkit") and t.is_alive()}


def _new_threads(baseline: set[threading.Thread]) -> list[str]:
    return sorted(t.name for t in _library_threads() - baseline)


def _patient_stop(monkeypatch) -> None:
    """dispose() joins the map follower for at most 1 s (MapFollower.stop): let it wait 30 s,
    so that a dispose that waits for the follower takes as long as the follower does, far
    over the bounds below, instead of the 1 s a loaded machine may take anyway."""
    real = MapFollower.stop
    monkeypatch.setattr(MapFollower, "stop", lambda self, timeout=30.0: real(self, timeout))


def test_dispose_with_the_follower_stuck_connecting(world, spawn, monkeypatch):
    """A catalog that accepts TCP connections and never answers (a hung server, a
    black-holing load balancer): dispose() returns at once, and the threads of
    repeated create/dispose cycles do not pile up."""
    w = world
    _patient_stop(monkeypatch)
    baseline = _library_threads()
    hole = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        url = _url(w, port=hole.getsockname()[1], app="h2-hole")
        for _ in range(2):
            t0 = time.monotonic()
            c = shardkit.Cluster.from_config(_config(w, url))
            started = time.monotonic() - t0
            assert c.map_version is None
            assert started < 5, f"from_config took {started:.1f} s with a catalog that never answers"
            _wait(lambda: c._follower._connecting, 2, "the follower's connection attempt")
            follower = c._follower
            t0 = time.monotonic()
            c.dispose()
            took = time.monotonic() - t0
            # The attempt lasts the 3 s connect timeout: dispose returned before it ended.
            assert follower._thread.is_alive(), f"dispose waited {took:.1f} s for the follower's connection attempt"
            assert took < 2.5, f"dispose took {took:.1f} s with the follower stuck connecting"  # was 1.0: ms when right
        _wait(lambda: not _new_threads(baseline), 5, "the followers to end")
    finally:
        hole.close()
    # A real catalog: no connection and no thread is left behind after dispose.
    for _ in range(5):
        c = shardkit.Cluster.from_config(_config(w, _url(w, app="h2-cycle")))
        _wait(c._follower.connected.is_set, 10, "the follower's connection")
        c.dispose()
    _wait(lambda: not _new_threads(baseline), 5, "the followers to end")
    _wait(lambda: not _catalog_backends(w, "h2-cycle"), 5, "the disposed processes' catalog connections to close")


# -- 6. a misconfigured or empty catalog ---------------------------------------------------

@pytest.mark.parametrize("case", ["wrong password", "wrong database"])
def test_misconfigured_catalog_is_reported_and_routes_by_the_file(world, spawn, caplog, case, monkeypatch):
    w = world
    _patient_stop(monkeypatch)
    caplog.set_level(logging.INFO, logger="shardkit")
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    if case == "wrong password":
        url, expect = _url(w, user="h2pw", password=PW, app="h2-badpw"), "password authentication failed"
    else:
        url, expect = _url(w, db="no_such_catalog", app="h2-baddb"), "does not exist"
    t0 = time.monotonic()
    app = spawn(url)
    assert time.monotonic() - t0 < 5
    assert app.map_version is None
    _wait(lambda: len(_catalog_retries(caplog)) >= 3, 10, "the follower's retries")
    # The same cause at every retry: said at WARNING once.
    assert len(_catalog_warnings(caplog)) == 1, _catalog_warnings(caplog)
    texts = _log_text(caplog)
    assert any(expect in t for t in texts), texts[:4]
    where = f"127.0.0.1:{w.catnode.port}/"
    assert all(where in t for t in _catalog_retries(caplog))
    _assert_no_secret(caplog)
    assert app._follower._thread.is_alive() and not app._follower.connected.is_set()
    # Routing by the config file's map: keyed reads where it is right work.
    stay = next(k for k in ACCOUNTS if w.admin.shard_for("accounts", k) == "s0"
                and app.shard_for("accounts", k) == "s0")
    with _sessions(app)() as s:
        assert s.get(Account, stay) is not None
    # Dispose just as the follower begins a back-off of 3.2 s or more (its 5th retry on):
    # a back-off that did not end at stop() would hold dispose that long.
    said = max(len(_catalog_retries(caplog)), 4)
    _wait(lambda: len(_catalog_retries(caplog)) > said, 10, "the follower's next retry")
    t0 = time.monotonic()
    app.dispose()
    took = time.monotonic() - t0
    assert took < 2.5, f"dispose took {took:.1f} s with the follower retrying"  # was 1.0: ms when right


def test_catalog_without_a_map_is_reported_then_followed_once_it_has_one(world, spawn, caplog):
    w = world
    caplog.set_level(logging.INFO, logger="shardkit")
    with w.catnode.connect() as c:
        c.execute("DROP DATABASE IF EXISTS h2_empty")
        c.execute("CREATE DATABASE h2_empty")
    url = _url(w, db="h2_empty", app="h2-empty")
    app = spawn(url)
    assert app.map_version is None
    _wait(app._follower.connected.is_set, 10, "the follower's connection")
    _wait(lambda: any("rebalance init" in t for t in _log_text(caplog)), 5,
          "a log line saying the catalog has no map yet")
    assert not [t for t in _log_text(caplog) if " ERROR " in t], _log_text(caplog)
    # Its first map (what `rebalance init` stores; the shards are not touched here).
    cat = Catalog(_url(w, db="h2_empty"))
    try:
        cat.ensure_schema()
        with cat.engine.begin() as c:
            version = cat.publish_map(c, app.file_config.bucket_map, "test: first map")
    finally:
        cat.dispose()
    _wait(lambda: app.map_version == version, 10, "the first map, by notification")  # was 3; the poll: 30 s
    _assert_no_secret(caplog)


# -- 7. a frozen catalog ------------------------------------------------------------------

def test_frozen_catalog_does_not_hang_application_threads(world, spawn, caplog):
    """SIGSTOP of the catalog server (a paused VM, a storage stall): connections stay
    open and nothing answers.  Routing goes on from the cached map; run_transaction of
    a process whose write is refused (a stale map) reloads the map, and that must fail
    within bounded time instead of waiting for the server; dispose returns; once the
    server thaws, no reader thread is left and the follower follows again."""
    w = world
    caplog.set_level(logging.INFO, logger="shardkit")
    baseline = _library_threads()
    stale = spawn(_url(w, app="h2-frozen-stale"), follow_map=False)  # a pooled catalog connection
    _, keys, version = _move(w, 1, "s0", "s1")
    app = spawn(_url(w, app="h2-frozen"))
    other = spawn(_url(w, app="h2-frozen-other"))
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    _wait(other._follower.connected.is_set, 10, "the other follower's first connection")
    assert app.map_version == version and stale.shard_for("accounts", keys[0]) == "s0"
    before = _placement(w, [keys[0]])
    assert [p[0] for p in before[keys[0]]] == ["s1"]
    pid = w.catnode._pid()
    frozen = [pid, *_children(pid)]
    result: dict = {}

    def write():
        t0 = time.monotonic()
        try:
            shardkit.run_transaction(_sessions(stale), lambda s: s.execute(
                update(Account).where(Account.id == keys[0]).values(balance=-1)), refresh_timeout=1.0)
            result["value"] = "committed"
        except Exception as e:  # noqa: BLE001 - inspected below
            result["error"] = e
        result["took"] = time.monotonic() - t0

    for p in frozen:
        os.kill(p, signal.SIGSTOP)
    try:
        t = threading.Thread(target=write, daemon=True)
        t.start()
        _work(w, app, [30_000_000 + i for i in range(4)])
        t0 = time.monotonic()
        other.dispose()
        disposed = time.monotonic() - t0
        # A process starting now gets no answer from the catalog: it starts anyway,
        # routing by the config file's map, once the catalog's answer timeout passes.
        t0 = time.monotonic()
        late = spawn(_url(w, app="h2-frozen-late"), follow_map=False)
        started = time.monotonic() - t0
        t.join(12)
        hung = t.is_alive()
    finally:
        for p in frozen:
            os.kill(p, signal.SIGCONT)
    t.join(30)
    assert not hung, ("run_transaction(refresh_timeout=1.0) was still waiting for the frozen catalog "
                      f"after 12 s ({result})")
    error = result.get("error")
    assert isinstance(error, shardkit.ShardUnavailable) and "catalog" in str(error), result
    # was 1.5: a dispose waiting for the frozen server would wait until it thaws
    assert disposed < 3.0, f"dispose took {disposed:.1f} s with the catalog frozen"
    assert started < 8, f"from_config took {started:.1f} s with the catalog frozen"
    assert late.map_version is None and late.shard_for("accounts", keys[0]) == "s0"
    _assert_no_secret(caplog, str(error))
    assert _placement(w, [keys[0]]) == before  # refused on s0, never retried
    bumped = _bump(w)
    _wait(lambda: app.map_version == bumped, PICKUP_BOUND, "the map after the catalog thawed")
    stale.dispose()
    app.dispose()
    _wait(lambda: not _new_threads(baseline), 10, "the catalog reader threads to end")


# -- 8. the map reloaded from many threads while they route writes -----------------------------

class _Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.balances: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.reads = 0
        self.attempts = 0  # transactions run, retries included
        self.commits = 0


def test_map_reloaded_from_many_threads_while_they_write(world, spawn):
    w = world
    app = spawn(_url(w, app="h2-race"))
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    Session = _sessions(app)
    ledger = _Ledger()
    stop = threading.Event()

    def counted(fn):
        def run(s):
            with ledger.lock:
                ledger.attempts += 1
            return fn(s)
        return run

    def writer(me: int) -> None:
        rnd = random.Random(me)
        mine: list[int] = []
        n = 0
        try:
            while not stop.is_set():
                if not mine or rnd.random() < 0.5:
                    # New keys near the moving buckets' keys (half of them move).
                    k = 40_000_000 + me * 1_000_000 + n
                    n += 1
                    shardkit.run_transaction(Session, counted(lambda s, k=k: s.add(Account(id=k, balance=0))),
                                             retries=5)
                    mine.append(k)
                    with ledger.lock:
                        ledger.balances[k] = 0
                        ledger.commits += 1
                else:
                    k = rnd.choice(mine)
                    v = rnd.randrange(1, 10**6)
                    shardkit.run_transaction(Session, counted(lambda s, k=k, v=v: s.execute(
                        update(Account).where(Account.id == k).values(balance=v))), retries=5)
                    with ledger.lock:
                        ledger.balances[k] = v
                        ledger.commits += 1
                    with Session() as s:
                        got = s.get(Account, k)
                        assert got is not None and got.balance == v, (k, v, got and got.balance)
                    with ledger.lock:
                        ledger.reads += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            ledger.errors.append(e)

    def reloader() -> None:
        try:
            while not stop.is_set():
                app.refresh_map()
        except BaseException as e:  # noqa: BLE001
            ledger.errors.append(e)

    # Four writers and two reloaders race every map change (more threads only slow the
    # mover on a 2-core machine: the same races, fewer of them per second of CPU).
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(4)]
    threads += [threading.Thread(target=reloader, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        versions = []
        for i in range(3):
            moved, _, v = _move(w, 3, "s0", "s1", grace=0.3)
            versions.append(v)
            w.admin.refresh_map()
            live = w.admin.config.bucket_map
            back = list(live)
            for b in moved:
                back[b] = "s0"
            rebalance.Mover(w.admin, grace=0.3, progress=lambda line: None).apply(
                plan_from_maps(live, tuple(back), "test: back"))
            w.taken.difference_update(moved)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not ledger.errors, ledger.errors[:3]
    assert len(ledger.balances) > 50 and ledger.reads > 20
    w.admin.refresh_map()
    _wait(lambda: app.map_version == w.admin.map_version, 3, "the last version")
    print(f"{ledger.commits} commits, {ledger.attempts - ledger.commits} retries (NotOwned), "
          f"{ledger.reads} reads, map versions {versions[0]}..{app.map_version}")
    placed = _placement(w, ledger.balances)
    for k, v in ledger.balances.items():
        assert placed.get(k) == [(w.admin.shard_for("accounts", k), v)], (k, v, placed.get(k))


# -- 9. a catalog restored from a backup -------------------------------------------------------

def test_catalog_restored_from_a_backup_is_followed_again(world, spawn, caplog):
    """The catalog comes back (restarted, as a restore does) with an older map than a
    process holds: the process routes by the catalog's map, with a warning, and follows
    its next versions (a move), though they are not above the version it held."""
    w = world
    caplog.set_level(logging.INFO, logger="shardkit")
    backup = _bump(w, "test: the version in the backup")
    app = spawn(_url(w, app="h2-restored"))
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    lost = [_bump(w, "test: lost by the restore") for _ in range(2)]
    _wait(lambda: app.map_version == lost[-1], 3, "the versions published after the backup")
    # The backup restored: the versions after it gone, the server started again.
    with w.catnode.connect(dbname=CATALOG_DB) as c:
        c.execute("DELETE FROM shardkit_catalog.maps WHERE version > %s", (backup,))
    w.catnode.stop()
    w.catnode.start()
    took = _wait(lambda: app.map_version == backup, PICKUP_BOUND, "the restored catalog's map")
    warned = [t for t in _log_text(caplog) if "went back" in t]
    assert len(warned) == 1, warned
    assert f"from version {lost[-1]} to version {backup}" in warned[0] and "shardkit verify" in warned[0]
    _assert_no_secret(caplog)
    buckets, keys, version = _move(w, 1, "s0", "s1")
    assert version <= lost[-1], "the move published more versions than the test expects"
    _wait(lambda: app.map_version == version, 3, f"the move's map (restored map picked up in {took:.1f} s)")
    assert app.shard_for("accounts", keys[0]) == "s1"
    moved = next(k for k in range(50_000_000, 50_100_000) if shardkit.bucket_for(k, BUCKETS) == buckets[0])
    _work(w, app, [moved] + [50_100_000 + i for i in range(3)])
