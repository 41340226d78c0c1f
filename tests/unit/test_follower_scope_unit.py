"""The map follower on an error it does not expect (a bug, a catalog row it cannot read):
said once per outage and cause at ERROR with its traceback, then retried quietly with
back-off, not an ERROR every second for as long as it lasts; never with a password.

No server: the follower's LISTEN connection is a stub, ``Catalog.current_state`` is
stubbed to raise or answer."""

from __future__ import annotations

import logging
import re
import time

import pytest

import shardkit
import shardkit._mapsync as mapsync
from models import groups_config
from shardkit._mapsync import MapFollower
from shardkit.catalog import Catalog, CatalogState

PW = "Zq4-follow-pw-7781"
URL = f"postgresql+psycopg://app:{PW}@127.0.0.1:1/catalog_db"
SHARDS = ["s0", "s1", "s2"]
MAP = tuple(SHARDS[b % 3] for b in range(16))


class Script:
    def __init__(self) -> None:
        self.answer: object = None

    def read(self):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.fixture
def script(monkeypatch):
    s = Script()
    monkeypatch.setattr(Catalog, "current_state", lambda self, conn=None, **kw: s.read())
    return s


@pytest.fixture
def cluster(script):
    c = shardkit.Cluster.from_config({
        "bucket_count": 16,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://app:{PW}@db{i}.example/app"}
                   for i, s in enumerate(SHARDS)],
        **groups_config(SHARDS),
        "catalog": {"url": URL},
    }, follow_map=False)
    yield c
    c.dispose()


class _Listening:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql):
        pass

    def notifies(self, timeout, stop_after):
        time.sleep(timeout)
        return iter(())


def _follower_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shardkit.catalog"]


def _run_until(cluster, until, what: str) -> None:
    follower = MapFollower(cluster, poll_interval=0.05)
    follower._connect = _Listening  # type: ignore[method-assign]
    follower.start()
    try:
        t0 = time.monotonic()
        while not until():
            assert time.monotonic() - t0 < 20, f"waited 20 s for {what}"
            time.sleep(0.02)
    finally:
        follower.stop()


def _rendered(record: logging.LogRecord) -> str:
    return logging.Formatter("%(levelname)s %(message)s").format(record)


def test_an_unexpected_error_is_said_once_then_retried_quietly_with_back_off(cluster, script, caplog):
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    script.answer = RuntimeError("test: a catalog row it cannot read")
    follower = MapFollower(cluster, poll_interval=0.05)
    follower._connect = _Listening  # type: ignore[method-assign]
    follower.start()
    try:
        _wait(lambda: len(_follower_records(caplog)) >= 5, "five failures")
        records = _follower_records(caplog)
        errors = [r for r in records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [_rendered(r) for r in records]
        assert errors[0].exc_info is not None and "a catalog row it cannot read" in _rendered(errors[0])
        assert "RuntimeError" in errors[0].getMessage() and mask_in(errors[0].getMessage())
        assert all(r.levelno == logging.DEBUG for r in records[1:5]), [_rendered(r) for r in records]
        # The same back-off as an unreachable catalog's, not a fixed second.
        delays = [float(m.group(1)) for r in records
                  if (m := re.search(r"retrying in ([0-9.]+) s", r.getMessage()))]
        assert delays[:4] == [0.2, 0.4, 0.8, 1.6], [_rendered(r) for r in records]
        # It recovers: said at INFO, once.
        script.answer = CatalogState(3, MAP, (), {}, {}, 9, identity="db1")
        _wait(lambda: cluster.map_version == 3, "the map")
        _wait(lambda: any("answers again" in r.getMessage() for r in _follower_records(caplog)),
              "the recovery")
        back = [r for r in _follower_records(caplog) if "answers again" in r.getMessage()]
        assert len(back) == 1 and back[0].levelno == logging.INFO and mask_in(back[0].getMessage())
    finally:
        follower.stop()


def _wait(until, what: str) -> None:
    t0 = time.monotonic()
    while not until():
        assert time.monotonic() - t0 < 20, f"waited 20 s for {what}"
        time.sleep(0.02)


def mask_in(message: str) -> bool:
    return "app:***@127.0.0.1:1/catalog_db" in message and PW not in message


def test_a_reminder_of_an_unexpected_error_has_no_traceback_and_says_how_long(cluster, script, caplog,
                                                                           monkeypatch):
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    monkeypatch.setattr(mapsync, "_REPEAT_WARNING", 0.0)  # every retry is a reminder
    script.answer = ValueError("test: malformed row")
    _run_until(cluster, lambda: len(_follower_records(caplog)) >= 3, "three failures")
    errors = [r for r in _follower_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) >= 3
    assert errors[0].exc_info is not None
    for r in errors[1:]:
        assert r.exc_info is None and "failing for" in r.getMessage(), _rendered(r)


def test_two_unexpected_causes_are_each_said_once(cluster, script, caplog):
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    causes = iter(range(1_000_000))

    class Turns:
        def read(self):
            raise (RuntimeError if next(causes) % 2 else KeyError)("test: cause")

    script.read = Turns().read
    _run_until(cluster, lambda: len(_follower_records(caplog)) >= 5, "five failures")
    errors = [r for r in _follower_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [_rendered(r) for r in _follower_records(caplog)]


def test_an_unexpected_error_that_holds_a_password_is_logged_without_it(cluster, script, caplog):
    """A bug whose message carries a configured URL: its traceback is logged masked."""
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    script.answer = RuntimeError(f"test: could not read the map from {URL}")
    _run_until(cluster, lambda: len(_follower_records(caplog)) >= 2, "two failures")
    out = "\n".join(_rendered(r) for r in _follower_records(caplog))
    assert PW not in out, out
    assert "could not read the map from" in out and "Traceback" in out, out


# -- Router.data_modifying_with: asked of every read sent to a named shard --------------

def test_data_modifying_with_finds_the_write_in_mapped_and_unmapped_tables_once_per_shape(monkeypatch):
    from sqlalchemy import Column, Integer, MetaData, Table, delete, insert, select

    import shardkit._routing as routing
    from models import User, offline_cluster

    router = offline_cluster(["s0", "s1"]).router
    local = Table("dmw_local", MetaData(), Column("id", Integer, primary_key=True), Column("x", Integer))
    walks = []
    walk = routing._dml_cte
    monkeypatch.setattr(routing, "_dml_cte", lambda st: walks.append(st) or walk(st))

    def gone(k):
        cte = delete(local).where(local.c.x == k).returning(local.c.id).cte("gone")
        return select(cte.c.id)
    shapes = {
        "unmapped read": (lambda k: select(local).where(local.c.x == k), None),
        "unmapped delete": (gone, "DELETE of dmw_local in 'gone'"),
        "mapped insert": (lambda k: select(insert(User).values(id=k, name="n").returning(User.id)
                                            .cte("added").c.id), "INSERT of users in 'added'"),
        "mapped read": (lambda k: select(User).where(User.name == str(k)), None),
    }
    for name, (build, want) in shapes.items():
        walks.clear()
        for k in range(5):
            assert router.data_modifying_with(build(k)) == want, (name, k)
        assert len(walks) <= 1, f"{name}: looked through {len(walks)} times"
