"""The catalog's edges, without a server: a reload bounded by its caller's timeout, a
catalog that went back (restored from a backup, re-initialised), what the follower says
when the catalog is unreachable or its map does not fit the config file, and the
connection timeout given in the catalog's URL.

The catalog's URL points at a closed local port and is never connected to: each test
stubs ``Catalog.current_state`` or gives the catalog an engine of its own.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import create_engine, event
from sqlalchemy.pool import NullPool

import shardkit
from models import groups_config
from shardkit._config import mask_url
from shardkit._mapsync import MapFollower
from shardkit.catalog import MIN_ANSWER_TIMEOUT, Catalog, CatalogState
from shardkit.errors import ShardUnavailable

PW = "Sk-pw-9931"
URL = f"postgresql+psycopg://app:{PW}@127.0.0.1:1/catalog_db"
SHARDS = ["s0", "s1", "s2"]
MAP_A = tuple(SHARDS[b % 3] for b in range(16))
MAP_B = tuple(SHARDS[(b + 1) % 3] for b in range(16))
MAP_C = tuple(SHARDS[(b + 2) % 3] for b in range(16))


def _config(url: str = URL) -> dict:
    return {
        "bucket_count": 16,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://app@db{i}.example/app"}
                   for i, s in enumerate(SHARDS)],
        **groups_config(SHARDS),
        "catalog": {"url": url},
    }


def _state(version: int, bucket_map: tuple[str, ...], seq: int, identity: str, **kw) -> CatalogState:
    return CatalogState(version, bucket_map, (), kw.get("foreign", {}), kw.get("moved_lsn", {}), seq,
                        identity=identity)


class Script:
    """What the stubbed ``Catalog.current_state`` answers: ``answer`` (a state, None, or an
    exception to raise), or ``fn()`` when set."""

    def __init__(self) -> None:
        self.answer: object = None
        self.fn = None
        self.calls = 0

    def read(self, catalog, conn=None, **kw):
        self.calls += 1
        if self.fn is not None:
            return self.fn()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.fixture
def script(monkeypatch):
    s = Script()
    monkeypatch.setattr(Catalog, "current_state", lambda self, conn=None, **kw: s.read(self, conn, **kw))
    return s


@pytest.fixture
def make_cluster():
    made = []

    def make(**kw):
        c = shardkit.Cluster.from_config(_config(kw.pop("url", URL)), follow_map=False, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.dispose()


def _messages(caplog, level: int = logging.WARNING) -> list[str]:
    return [f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records
            if r.name.startswith("shardkit") and r.levelno >= level]


# -- 1. refresh_map(newer_than=..., timeout=T) holds its caller's bound ----------------------------

def test_a_bounded_reload_waits_for_the_catalog_no_longer_than_its_caller_said(make_cluster):
    """A catalog that never answers (frozen): each read of the reload waits what is left
    of the caller's timeout (at least MIN_ANSWER_TIMEOUT, at most the catalog's answer
    timeout), not the full answer timeout.  The error says how long it waited."""
    cluster = make_cluster()  # its first read: refused (nothing listens on the port)
    gate = threading.Event()

    def never_answers():
        gate.wait(30)
        raise psycopg.OperationalError("test: the catalog never answered")

    cluster.catalog = Catalog(URL, engine=create_engine("postgresql+psycopg://", creator=never_answers,
                                                        poolclass=NullPool))
    try:
        with pytest.raises(ShardUnavailable) as e:
            cluster.refresh_map(newer_than=0, timeout=0.8)
        # What was left of the 0.8 s when the read began (0.79 on a slow machine), not the 5 s default.
        waited = re.search(r"did not answer within ([0-9.]+) s", str(e.value))
        assert waited and MIN_ANSWER_TIMEOUT <= float(waited[1]) <= 0.8, str(e.value)
        assert e.value.node == "catalog" and PW not in str(e.value)
        # Below the floor: the catalog still gets MIN_ANSWER_TIMEOUT to answer.
        with pytest.raises(ShardUnavailable) as e:
            cluster.refresh_map(newer_than=0, timeout=0.01)
        assert f"within {MIN_ANSWER_TIMEOUT:g} s" in str(e.value), str(e.value)
        # Above the catalog's answer timeout: that timeout.
        cluster.catalog.answer_timeout = 0.6
        with pytest.raises(ShardUnavailable) as e:
            cluster.refresh_map(newer_than=0, timeout=60)
        assert "within 0.6 s" in str(e.value), str(e.value)
    finally:
        gate.set()
        cluster.catalog.dispose()


# -- 2. a catalog that went back ---------------------------------------------------------------

def test_a_catalog_restored_from_a_backup_is_followed_again(make_cluster, script, caplog):
    caplog.set_level(logging.INFO, logger="shardkit")
    script.answer = _state(10, MAP_A, 50, "db1")
    cluster = make_cluster()
    assert cluster.map_version == 10 and cluster.config.bucket_map == MAP_A
    # A slower read of an older state of the same catalog: ignored.
    script.answer = _state(7, MAP_B, 40, "db1", moved_lsn={"s1": 99})
    cluster.refresh_map()
    assert cluster.map_version == 10 and cluster.config.bucket_map == MAP_A and cluster.moved_lsn == {}
    assert not _messages(caplog)
    # The catalog restarted, nothing else changed: followed without a word.
    script.answer = _state(10, MAP_A, 50, "db1-restarted")
    cluster.refresh_map()
    assert cluster.map_version == 10 and not _messages(caplog)
    # Restored from a backup: another catalog (its identity changed) at an older version.
    script.answer = _state(7, MAP_B, 40, "db2", moved_lsn={"s1": 99})
    cluster.refresh_map()
    assert cluster.map_version == 7 and cluster.config.bucket_map == MAP_B
    assert cluster.moved_lsn == {"s1": 99}
    warned = _messages(caplog)
    assert len(warned) == 1 and "went back from version 10 to version 7" in warned[0], warned
    assert "shardkit verify" in warned[0] and PW not in warned[0]
    # ... and its next versions are followed (above 7, though not above 10).
    script.answer = _state(8, MAP_C, 41, "db2")
    assert cluster.refresh_map() == 8 and cluster.config.bucket_map == MAP_C
    # Re-initialised with the same version number and another map: followed too.
    script.answer = _state(8, MAP_A, 0, "db3")
    assert cluster.refresh_map() == 8 and cluster.config.bucket_map == MAP_A
    assert "version 8 is not the map" in _messages(caplog)[-1], _messages(caplog)
    # Another catalog (a failover without loss) a version ahead: followed, nothing to say.
    said = len(_messages(caplog))
    script.answer = _state(9, MAP_B, 1, "db4")
    assert cluster.refresh_map() == 9 and len(_messages(caplog)) == said


def test_a_slow_read_of_the_catalog_before_it_was_restored_is_ignored(make_cluster, script):
    """A read of the old catalog that began before the read of the restored one, and ends
    after it: its state is older, though it comes from another catalog."""
    script.answer = _state(10, MAP_A, 50, "db1")
    cluster = make_cluster()
    started, release = threading.Event(), threading.Event()

    def slow_old():
        started.set()
        release.wait(10)
        return _state(11, MAP_C, 51, "db1")

    script.fn = slow_old
    slow = threading.Thread(target=cluster.refresh_map)
    slow.start()
    assert started.wait(10)
    script.fn = None
    script.answer = _state(7, MAP_B, 40, "db2")
    cluster.refresh_map()
    assert cluster.map_version == 7
    release.set()
    slow.join(10)
    assert cluster.map_version == 7 and cluster.config.bucket_map == MAP_B


def test_a_bounded_reload_returns_once_the_catalog_went_back(make_cluster, script):
    """run_transaction waits for a version above the one its write was refused by: when
    the catalog went back meanwhile, the map changed (to a lower version) and the retry
    must not wait for the full timeout (counted in reads: no clock)."""
    script.answer = _state(10, MAP_A, 50, "db1")
    cluster = make_cluster()
    script.answer = _state(7, MAP_B, 40, "db2")
    script.calls = 0
    assert cluster.refresh_map(newer_than=10, timeout=30) == 7
    assert script.calls == 1


# -- 3. what the follower says --------------------------------------------------------------------

class _ListeningConnection:
    """The follower's LISTEN connection, connected (the catalog's reads are stubbed)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql):
        pass

    def notifies(self, timeout, stop_after):
        time.sleep(timeout)
        return iter(())


class _QuickWaits(threading.Event):
    """A follower's stop event whose waits (its back-off between retries, the only timed
    wait on it) return after at most 10 ms, and are recorded: the back-off is checked by
    what the follower asks to wait, not by sleeping it out (0.2 + 0.4 + ... s)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            return super().wait()
        self.asked.append(timeout)
        return super().wait(min(timeout, 0.01))


def _follower(cluster, **kw) -> MapFollower:
    """A MapFollower that does not sleep out its back-off (see _QuickWaits)."""
    follower = MapFollower(cluster, **kw)
    follower._stop = _QuickWaits()  # type: ignore[assignment]
    return follower


def _follow(cluster, until, what: str, poll_interval: float = 0.05) -> MapFollower:
    follower = _follower(cluster, poll_interval=poll_interval)
    follower._connect = _ListeningConnection  # type: ignore[method-assign]
    follower.start()
    try:
        t0 = time.monotonic()
        while not until():
            assert time.monotonic() - t0 < 10, f"waited 10 s for {what}"
            time.sleep(0.02)
    finally:
        follower.stop()
    return follower


def test_follower_names_an_unreachable_catalog_once(make_cluster, caplog):
    """The LISTEN connection works, the map read does not (the catalog's engine cannot
    connect): the warning names the catalog once, and is said once for that cause (the
    retries after it at DEBUG)."""
    caplog.set_level(logging.INFO, logger="shardkit")
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    cluster = make_cluster()
    caplog.clear()

    def refuse():
        raise psycopg.OperationalError("test: connection refused")

    cluster.catalog.dispose()
    cluster.catalog = Catalog(URL, engine=create_engine("postgresql+psycopg://", creator=refuse,
                                                        poolclass=NullPool))
    _follow(cluster, lambda: len(_messages(caplog, logging.DEBUG)) >= 3, "three retries")
    where = mask_url(URL)
    warned = _messages(caplog)
    assert len(warned) == 1, warned
    assert "routing by the config file's map" in warned[0], warned
    for text in _messages(caplog, logging.DEBUG):
        assert text.count(where) == 1, text
        assert "unreachable" in text and "test: connection refused" in text and "retrying in" in text, text
        assert PW not in text


def _retries(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shardkit.catalog" and "retrying in" in r.getMessage()]


def _until_retries(follower: MapFollower, caplog, retries: int) -> None:
    follower.start()
    try:
        t0 = time.monotonic()
        while len(_retries(caplog)) < retries:
            assert time.monotonic() - t0 < 20, f"waited 20 s for {retries} retries"
            time.sleep(0.02)
    finally:
        follower.stop()


def test_two_causes_in_turn_are_each_warned_once(make_cluster, caplog):
    """A catalog URL with two hosts and load_balance_hosts=random, both down: psycopg
    tries them in a random order and its error's first line is the last host's, so the
    cause the follower sees changes from one retry to the next.  Each cause is warned
    once for the outage (then a reminder a minute), not at every change."""
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    hosts = itertools.cycle(["10.0.0.1", "10.0.0.2"])

    def refuse():
        raise psycopg.OperationalError(
            f'connection failed: connection to server at "{next(hosts)}", port 5432 failed: '
            "Connection refused\nMultiple connection attempts failed. All failures were: ...")

    follower = _follower(make_cluster())
    follower._connect = refuse  # type: ignore[method-assign]
    _until_retries(follower, caplog, 6)
    warned = [r.getMessage() for r in _retries(caplog) if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned


def test_retries_back_off_when_the_catalog_connects_but_its_map_cannot_be_read(make_cluster, caplog):
    """The LISTEN connection works, the map read fails (its engine cannot connect, the
    map table refuses the role...): the follower must back off between attempts as it
    does when it cannot connect at all, not reconnect every 0.2 s for as long as it
    lasts (which, said at DEBUG, nothing would show)."""
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")

    def refuse():
        raise psycopg.OperationalError("test: connection refused")

    cluster = make_cluster()
    cluster.catalog.dispose()
    cluster.catalog = Catalog(URL, engine=create_engine("postgresql+psycopg://", creator=refuse,
                                                        poolclass=NullPool))
    follower = _follower(cluster, poll_interval=0.05)
    follower._connect = _ListeningConnection  # type: ignore[method-assign]
    _until_retries(follower, caplog, 4)
    delays = [float(re.search(r"retrying in ([0-9.]+) s", r.getMessage()).group(1))
              for r in _retries(caplog)]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6], delays
    assert follower._stop.asked[:4] == delays[:4], follower._stop.asked  # it waits what it says


def test_a_cause_is_warned_again_in_an_outage_that_began_with_an_unexpected_error(make_cluster, script,
                                                                                  caplog):
    """Outage 1: the catalog unreachable (warned).  It answers again, then the follower
    fails on something unexpected (logged as an ERROR) and the catalog is unreachable
    again for the same reason: that is a new outage, so its cause is warned again rather
    than passed over as one already said."""
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    script.answer = _state(11, MAP_A, 55, "db1")
    down = psycopg.OperationalError("test: connection refused")

    class Answers(_ListeningConnection):
        def notifies(self, timeout, stop_after):
            time.sleep(timeout)
            raise RuntimeError("test: something unexpected")

    steps = iter([down, Answers, down])

    def connect():
        step = next(steps, down)
        if isinstance(step, BaseException):
            raise step
        return step()

    # (Its real back-off, 0.2 s: stopped after two retries, it must not have retried a third time.)
    follower = MapFollower(make_cluster())
    follower._connect = connect  # type: ignore[method-assign]
    _until_retries(follower, caplog, 2)
    warned = [r.getMessage() for r in _retries(caplog) if r.levelno >= logging.WARNING]
    assert len(warned) == 2, [f"{r.levelname} {r.getMessage()}" for r in caplog.records]
    assert any("something unexpected" in (r.exc_text or str(r.exc_info)) for r in caplog.records
               if r.levelno >= logging.ERROR)


def test_a_catalog_map_that_does_not_fit_the_config_file_says_so(make_cluster, script, caplog):
    caplog.set_level(logging.INFO, logger="shardkit")
    misfit = tuple("s9" if b == 3 else s for b, s in enumerate(MAP_B))
    # At start: not "unreachable"; what is wrong and what to do.
    script.answer = _state(12, misfit, 60, "db1")
    cluster = make_cluster()
    assert cluster.map_version is None
    said = _messages(caplog)
    assert len(said) == 1 and "unreachable" not in said[0], said
    assert "s9" in said[0] and "version 12" in said[0] and "config file" in said[0] and "restart" in said[0], said
    # A fitting map, then a catalog map that places buckets on an unknown shard: nothing of
    # that state is taken (its replica floors neither), and the follower says so once,
    # stays connected and takes the next map that fits.
    script.answer = _state(11, MAP_A, 55, "db1")
    cluster.refresh_map()
    caplog.clear()
    script.answer = _state(12, misfit, 60, "db1", moved_lsn={"s9": 5, "s1": 7})
    _follow(cluster, lambda: script.calls >= 8, "the follower's polls")
    said = _messages(caplog)
    assert len(said) == 1, said
    assert "unreachable" not in said[0] and "retrying" not in said[0], said
    assert "s9" in said[0] and "config file" in said[0] and "map version 11" in said[0], said
    assert cluster.map_version == 11 and cluster.moved_lsn == {} and cluster._state_seq == 55
    script.answer = _state(13, MAP_C, 61, "db1")
    _follow(cluster, lambda: cluster.map_version == 13, "the next map that fits")


# -- 4. the catalog URL's connect_timeout --------------------------------------------------------

def _connect_params(engine) -> dict:
    seen: dict = {}

    @event.listens_for(engine, "do_connect")
    def grab(dialect, rec, cargs, cparams):
        seen.update(cparams)
        raise RuntimeError("test: not connecting")

    with pytest.raises(Exception):
        engine.connect()
    return seen


@pytest.mark.parametrize("query, expect", [("", 3), ("?connect_timeout=9", 9)])
def test_the_catalog_urls_connect_timeout_wins(make_cluster, script, monkeypatch, query, expect):
    cat = Catalog(URL + query)
    try:
        assert int(_connect_params(cat.engine)["connect_timeout"]) == expect
    finally:
        cat.dispose()
    # The follower's LISTEN connection too.
    cluster = make_cluster(url=URL + query)
    dsns = []

    def connect(dsn, **kw):
        dsns.append(make_conninfo(dsn, **{k: v for k, v in kw.items() if k != "autocommit"}))
        raise psycopg.OperationalError("test: not connecting")

    monkeypatch.setattr("shardkit._mapsync.psycopg.connect", connect)
    with pytest.raises(psycopg.OperationalError):
        MapFollower(cluster)._connect()
    assert int(conninfo_to_dict(dsns[0])["connect_timeout"]) == expect


# -- an unexpected error (a bug, a catalog row it cannot read): said once per outage and
#    cause at ERROR with its traceback, retried with the same back-off, passwords masked ----

def _follower_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shardkit.catalog"]


def _rendered(record: logging.LogRecord) -> str:
    return logging.Formatter("%(levelname)s %(message)s").format(record)


def _masked(message: str) -> bool:
    return "app:***@127.0.0.1:1/catalog_db" in message and PW not in message


def _wait(until, what: str) -> None:
    t0 = time.monotonic()
    while not until():
        assert time.monotonic() - t0 < 20, f"waited 20 s for {what}"
        time.sleep(0.02)


def test_an_unexpected_error_is_said_once_then_retried_quietly_with_back_off(make_cluster, script, caplog):
    cluster = make_cluster()
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    script.answer = RuntimeError("test: a catalog row it cannot read")
    follower = _follower(cluster, poll_interval=0.05)
    follower._connect = _ListeningConnection  # type: ignore[method-assign]
    follower.start()
    try:
        _wait(lambda: len(_follower_records(caplog)) >= 5, "five failures")
        records = _follower_records(caplog)
        errors = [r for r in records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [_rendered(r) for r in records]
        assert errors[0].exc_info is not None and "a catalog row it cannot read" in _rendered(errors[0])
        assert "RuntimeError" in errors[0].getMessage() and _masked(errors[0].getMessage())
        assert all(r.levelno == logging.DEBUG for r in records[1:5]), [_rendered(r) for r in records]
        # The same back-off as an unreachable catalog's, not a fixed second.
        delays = [float(m.group(1)) for r in records
                  if (m := re.search(r"retrying in ([0-9.]+) s", r.getMessage()))]
        assert delays[:4] == [0.2, 0.4, 0.8, 1.6], [_rendered(r) for r in records]
        assert follower._stop.asked[:4] == delays[:4], follower._stop.asked  # it waits what it says
        # It recovers: said at INFO, once.
        script.answer = _state(3, MAP_A, 9, "db1")
        _wait(lambda: cluster.map_version == 3, "the map")
        _wait(lambda: any("answers again" in r.getMessage() for r in _follower_records(caplog)),
              "the recovery")
        back = [r for r in _follower_records(caplog) if "answers again" in r.getMessage()]
        assert len(back) == 1 and back[0].levelno == logging.INFO and _masked(back[0].getMessage())
    finally:
        follower.stop()


def test_a_reminder_of_an_unexpected_error_has_no_traceback_and_says_how_long(make_cluster, script, caplog,
                                                                           monkeypatch):
    cluster = make_cluster()
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    monkeypatch.setattr("shardkit._mapsync._REPEAT_WARNING", 0.0)  # every retry is a reminder
    script.answer = ValueError("test: malformed row")
    _follow(cluster, lambda: len(_follower_records(caplog)) >= 3, "three failures")
    errors = [r for r in _follower_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) >= 3
    assert errors[0].exc_info is not None
    for r in errors[1:]:
        assert r.exc_info is None and "failing for" in r.getMessage(), _rendered(r)


def test_two_unexpected_causes_are_each_said_once(make_cluster, script, caplog):
    cluster = make_cluster()
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    turns = itertools.count()

    def fail():
        raise (RuntimeError if next(turns) % 2 else KeyError)("test: cause")
    script.fn = fail
    _follow(cluster, lambda: len(_follower_records(caplog)) >= 5, "five failures")
    errors = [r for r in _follower_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [_rendered(r) for r in _follower_records(caplog)]


def test_an_unexpected_error_that_holds_a_password_is_logged_without_it(make_cluster, script, caplog):
    """A bug whose message carries a configured URL: its traceback is logged masked."""
    cluster = make_cluster()
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    script.answer = RuntimeError(f"test: could not read the map from {URL}")
    _follow(cluster, lambda: len(_follower_records(caplog)) >= 2, "two failures")
    out = "\n".join(_rendered(r) for r in _follower_records(caplog))
    assert PW not in out, out
    assert "could not read the map from" in out and "Traceback" in out, out
