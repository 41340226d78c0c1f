"""Helpers for the integration tests of online moves: a guarded cluster, writer threads,
the journal, a mover killed at a step, rows read from every shard."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import prefork
import psycopg
import pytest
from sqlalchemy import create_engine, text

import shardkit
from shardkit import rebalance


def guarded_cluster(dev: Any, metadata: Any, groups: dict[str, Any], cfg_path: Any,
                    **options: Any) -> shardkit.Cluster:
    """``dev``'s shards with ``metadata``'s tables, a config at ``cfg_path`` naming a
    catalog on the first shard's server, and ``rebalance init`` run: the map is the
    config's, the ownership guard installed.  ``options`` go to ``Cluster.from_config``."""
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        metadata.create_all(eng)
        eng.dispose()
    dev.write_config(cfg_path, {**groups, "catalog": {"url": dev.create_catalog()}})
    cluster = shardkit.Cluster.from_config(cfg_path, **options)
    rebalance.init(cluster)
    return cluster


class WriterThreads:
    """Threads that write until stopped, each running ``_run(me)``; subclasses write through
    ``shardkit.run_transaction`` and keep a ledger of what each acknowledged commit left."""

    generation = 0  # ids made from ``base`` never repeat across writers in one test session
    join_timeout = 60.0  # seconds a writer may take to stop once told to (else a failure)

    def __init__(self, Session: Any, n: int = 4) -> None:
        WriterThreads.generation += 1
        self.base = 100_000_000 * WriterThreads.generation
        self.Session = Session
        self.n = n
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.ops = 0
        self.threads = [threading.Thread(target=self._guarded_run, args=(i,), daemon=True) for i in range(n)]

    def _guarded_run(self, me: int) -> None:
        try:
            self._run(me)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self._failed(e)

    def _failed(self, error: BaseException) -> None:
        """Record a writer's failure (or a writer that did not stop) for the test to judge."""
        self.errors.append(error)

    def _run(self, me: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> WriterThreads:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_timeout)
            if t.is_alive():
                self._failed(TimeoutError(f"writer {t.name} still blocked {self.join_timeout:g} s after "
                                          "it was told to stop"))


def journal_steps(cluster: Any, move_id: int) -> list[str]:
    with cluster.catalog.engine.connect() as c:
        return [r[0] for r in c.execute(text(
            "SELECT step FROM shardkit_catalog.journal WHERE move_id = :m ORDER BY id"), {"m": move_id})]


def latest_move(cluster: Any) -> int | None:
    with cluster.catalog.engine.connect() as c:
        return c.execute(text("SELECT max(id) FROM shardkit_catalog.moves")).scalar()


# `shardkit rebalance apply` (the CLI's main, in a process of its own) whose mover, once it
# has recorded the step named by its first argument (the commit of the journal entry, where
# --step-delay sleeps), sleeps until it is killed; after the other steps, --step-delay.
_PAUSED_AT_STEP = """
import sys
from shardkit import cli, rebalance
from shardkit.catalog import Catalog

pause_at = sys.argv.pop(1)
last = [None]
_record = Catalog.record


def record(conn, move_id, batch, step, detail=None):
    _record(conn, move_id, batch, step, detail)
    last[0] = step


class PausedMover(rebalance.Mover):
    @property
    def step_delay(self):
        return 3600.0 if last[0] == pause_at else self._step_delay

    @step_delay.setter
    def step_delay(self, value):
        self._step_delay = value


Catalog.record = staticmethod(record)
rebalance.Mover = PausedMover
sys.exit(cli.main(sys.argv[1:]))
"""


def kill_mover_after(cluster: Any, cfg_path: Any, step: str, *args: str) -> int:
    """Run `shardkit rebalance apply ARGS` and SIGKILL it once the journal shows ``step``
    (the mover waits there until it is killed; it rests 0.2 s after each earlier step,
    writers going on meanwhile); return the move's id (still running).  The mover is a
    process of its own, forked without its imports (tests/prefork.py)."""
    before = latest_move(cluster)
    with tempfile.TemporaryDirectory(prefix="mover-") as out:
        paths = os.path.join(out, "stdout"), os.path.join(out, "stderr")
        proc = prefork.popen(_PAUSED_AT_STEP, [step, "rebalance", "apply", "--config", str(cfg_path), *args,
                                               "--grace", "0.2", "--step-delay", "0.2"],
                             stdout=paths[0], stderr=paths[1])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            move_id = latest_move(cluster)
            if move_id != before and step in journal_steps(cluster, move_id):
                break
            if proc.poll() is not None:
                pytest.fail(f"the mover ended ({proc.returncode}) before {step}:\n"
                            + "".join(Path(p).read_text() for p in paths if os.path.exists(p)))
            time.sleep(0.05)
        else:
            pytest.fail(f"the mover never reached {step}")
        proc.kill()
        proc.wait(60)
    # Its catalog session holds the move's lock until the server notices the connection is
    # gone: a resume at once (in this process, not after a CLI's start) would be refused.
    wait_for_mover_lock_release(cluster, move_id)
    assert rebalance.move_status(cluster, move_id)[0]["state"] == "running"
    return move_id


def wait_for_mover_lock_release(cluster: Any, move_id: int, timeout: float = 30.0) -> None:
    """Wait until no catalog session holds move ``move_id``'s mover lock."""
    deadline = time.monotonic() + timeout
    with cluster.catalog.engine.connect() as c:
        while c.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :c "
                "AND objid = :m AND granted"), {"c": rebalance.MOVER_LOCK_CLASS, "m": move_id}).scalar():
            c.rollback()
            assert time.monotonic() < deadline, f"move {move_id}'s killed mover still holds its lock"
            time.sleep(0.02)


def resume(cfg_path: Any, move_id: int) -> None:
    """`shardkit rebalance resume MOVE`, which must succeed."""
    r = subprocess.run([sys.executable, "-m", "shardkit.cli", "rebalance", "resume", str(move_id),
                        "--config", str(cfg_path), "--grace", "0.2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def rows_by_key(shards: Any, query: str) -> dict[Any, list[tuple[Any, ...]]]:
    """``query``'s rows read directly from each shard's primary: first column ->
    [(shard, other columns...), ...], one entry per shard holding the row."""
    out: dict[Any, list[tuple[Any, ...]]] = {}
    for shard in shards:
        with psycopg.connect(shard.primary.dsn) as c:
            for key, *rest in c.execute(query):
                out.setdefault(key, []).append((shard.name, *rest))
    return out


class ReadPasses:
    """The passes of a test's read loop (``passed()`` at the end of each), which a
    :class:`HeldMover` waits for: a fixed step delay is too short on a loaded machine, and
    longer than needed on an idle one."""

    def __init__(self, per_step: int = 3, timeout: float = 30.0) -> None:
        self.per_step = per_step
        self.timeout = timeout
        self.count = 0
        self._cond = threading.Condition()

    def passed(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self) -> None:
        """Until ``per_step`` more passes have ended (the first may have begun before the
        caller's state was there), or ``timeout`` seconds."""
        with self._cond:
            goal = self.count + self.per_step
            self._cond.wait_for(lambda: self.count >= goal, self.timeout)


class HeldMover(rebalance.Mover):
    """A mover that, after recording each step (split, capturing, copied, switched,
    verified, cleaned), waits until the read loop has read the cluster in that state
    (``passes``: see :class:`ReadPasses`)."""

    def __init__(self, cluster: Any, passes: ReadPasses, **kw: Any) -> None:
        super().__init__(cluster, **kw)
        self.passes = passes

    def _record(self, *a: Any, **kw: Any) -> None:
        super()._record(*a, **kw)
        self.passes.wait()

    def _cut_over(self, *a: Any, **kw: Any) -> Any:
        result = super()._cut_over(*a, **kw)
        self.passes.wait()
        return result

    def _split(self, *a: Any, **kw: Any) -> None:
        super()._split(*a, **kw)
        self.passes.wait()
