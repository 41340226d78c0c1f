"""A fuzzer of online moves during which a SERVER dies: the catalog's, the source
primary's or the target primary's, SIGKILLed (or stopped with ``pg_ctl stop -m
immediate``) at a random moment of the move (its capture, copy, catch-up, cut-over, the
map's publication, verification, clean-up or a grace wait), then started again after a
short while (crash recovery).  The movers killed at journal steps and at random moments
are covered by test_rebalance_crashes.py and test_move_kill_fuzz.py.

An episode: its own databases (two shards, s0 and s1, on two servers; the catalog on a
third server); writer threads insert, update and delete rows of moving and non-moving
buckets through ``shardkit.run_transaction``, keeping a ledger of acknowledged writes (a
write whose commit's answer was lost to the kill may or may not have happened: both are
accepted until a later acknowledged write of the key settles it); a mover subprocess runs
`shardkit rebalance apply --plan` (some buckets of s0 to s1); one server dies and comes
back; then `rebalance resume` or `rebalance abort`, chosen at random, until the move is
done or aborted.

Checked: the mover that met the dead server fails with one clear line naming that server
(the catalog, or the shard and its role in the batch), no traceback, no password;
`rebalance status` tells the truth (no mover once it exited; the commands it offers work);
every acknowledged write is present exactly once, on its owner, nothing is left on the
other shard; `shardkit verify` is clean; the writers of non-moving buckets on the live
shards kept working while the catalog (or the other shard) was down.

CI runs a few fixed seeds; ``SHARDKIT_SERVER_KILL_SEEDS=N`` runs N more (seeds 1000 to
1000+N-1; ``SHARDKIT_SERVER_KILL_SEED=S``: the one seed S).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import inproc_cli
import psycopg
import prefork
import pytest
from movers import WriterThreads
from test_move_kill_fuzz import _latest_move, _wait_for_lock_release
from sqlalchemy import BigInteger, Integer, delete, insert, update
from sqlalchemy import text as text_
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit.catalog import MOVER_LOCK_CLASS
from shardkit.verify import verify

pytestmark = pytest.mark.integration

BUCKETS = 32
N_ACCOUNTS = 2000
PASSWORD = "Sekr1t-pw-ks"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "ks_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


SCHEMA = "CREATE TABLE ks_accounts (id bigint PRIMARY KEY, balance int NOT NULL DEFAULT 0)"
GROUPS = {"groups": {"accounts": {"strategy": "hash", "tables": {"ks_accounts": "id"}}}}

# `shardkit rebalance VERB ...` that writes, to the file named by its first argument, the
# part of the mover it is in (and rests a little in each, a wider window for the kill).
_PHASED = r"""
import os, sys, time
from shardkit import cli, rebalance
from shardkit.catalog import Catalog

fd = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
rest = float(os.environ.get("KS_REST", "0"))
stack = []


def mark(s):
    os.pwrite(fd, s.encode().ljust(80), 0)


def wrap(owner, name, label, static=False):
    f = getattr(owner, name)

    def w(*a, **kw):
        stack.append(label)
        mark(" > ".join(stack))
        try:
            if rest:
                time.sleep(rest)
            return f(*a, **kw)
        finally:
            stack.pop()
            mark(" > ".join(stack + ["after " + label]))
    setattr(owner, name, staticmethod(w) if static else w)


for name, label in (("_capture", "capture"), ("_copy", "copy"), ("_catch_up", "catch-up"),
                    ("_cut_over", "cut-over"), ("_verify", "verify"), ("_clean_up", "clean-up"),
                    ("_apply_changes", "apply changes")):
    wrap(rebalance.Mover, name, label)
wrap(Catalog, "publish_map", "publish")
mark("start")
sys.exit(cli.main(sys.argv[1:]))
"""

PHASES = ["capture", "copy", "catch-up", "apply changes", "cut-over", "publish", "verify", "clean-up",
          "after copy", "after verify"]


# -- a world per episode -------------------------------------------------------------------


def _url(node: Any, dbname: str) -> str:
    return make_url(node.url).set(database=dbname, password=PASSWORD).render_as_string(hide_password=False)


@dataclass
class World:
    dev: Any
    dbname: str
    cfg_path: Path
    tmp: Path
    log: list[str] = field(default_factory=list)

    @property
    def catalog_node(self) -> Any:
        return self.dev.shards[2].primary

    def node(self, shard: str) -> Any:
        return next(s for s in self.dev.shards if s.name == shard).primary

    def conn(self, shard: str) -> psycopg.Connection:
        return psycopg.connect(self.node(shard).dsn, dbname=self.dbname, autocommit=True)

    def catalog(self) -> psycopg.Connection:
        return psycopg.connect(self.catalog_node.dsn, dbname=self.dbname + "_catalog", autocommit=True)

    def cluster(self, **kw: Any) -> shardkit.Cluster:
        return shardkit.Cluster.from_config(self.cfg_path, **{"follow_map": False, **kw})

    def rows(self) -> dict[int, list[tuple[str, int]]]:
        out: dict[int, list[tuple[str, int]]] = {}
        for shard in ("s0", "s1"):
            with self.conn(shard) as c:
                for key, balance in c.execute("SELECT id, balance FROM ks_accounts"):
                    out.setdefault(key, []).append((shard, balance))
        return out

    def say(self, line: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {line}")

    def text(self) -> str:
        return "\n".join(self.log)


def _make_world(dev: Any, tmp: Path, dbname: str) -> World:
    for shard in dev.shards[:2]:
        with psycopg.connect(shard.primary.dsn, dbname="postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            c.execute(f"CREATE DATABASE {dbname}")
        with psycopg.connect(shard.primary.dsn, dbname=dbname, autocommit=True) as c:
            c.execute(SCHEMA)
    cat = dev.shards[2].primary
    with psycopg.connect(cat.dsn, dbname="postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {dbname}_catalog WITH (FORCE)")
        c.execute(f"CREATE DATABASE {dbname}_catalog")
    tmp.mkdir(parents=True, exist_ok=True)
    shards = [{"name": s.name, "primary": _url(s.primary, dbname), "replicas": []} for s in dev.shards[:2]]
    cfg_path = dev.write_config(tmp / "shardkit.toml", {
        **GROUPS, "catalog": {"url": _url(cat, dbname + "_catalog")}, "shards": shards})
    w = World(dev, dbname, cfg_path, tmp)
    admin = w.cluster()
    try:
        rebalance.init(admin)
        live = admin.config.bucket_map
        for shard in ("s0", "s1"):
            keys = [k for k in range(N_ACCOUNTS) if live[shardkit.bucket_for(k, BUCKETS)] == shard]
            with w.conn(shard) as c:   # (one statement: 2000 single-row INSERTs took ~0.6 s)
                c.execute("INSERT INTO ks_accounts SELECT unnest(%s::bigint[]), 0", (keys,))
    finally:
        admin.dispose()
    return w


def _drop_world(w: World) -> None:
    for node in [w.node("s0"), w.node("s1"), w.catalog_node]:
        if not node.is_running():
            node.start()
    for shard in w.dev.shards[:2]:
        with psycopg.connect(shard.primary.dsn, dbname="postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {w.dbname} WITH (FORCE)")
    with psycopg.connect(w.catalog_node.dsn, dbname="postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {w.dbname}_catalog WITH (FORCE)")


# -- writers -------------------------------------------------------------------------------

_UNKNOWN = object()  # a write whose outcome was lost


@dataclass
class Op:
    t0: float
    t1: float
    key: int
    ok: bool
    error: str = ""


class Writers(WriterThreads):
    """Threads writing through run_transaction; each owns the accounts ``k % n == me`` and
    the ids it makes.  ``values[k]``: the set of values account ``k`` may hold (None: no
    row), one value once an acknowledged write settled it."""

    join_timeout = 120.0

    def __init__(self, Session: Any, n: int, seed: int) -> None:
        super().__init__(Session, n)
        self.seed = seed
        self.values: dict[int, set[int | None]] = {k: {0} for k in range(N_ACCOUNTS)}
        self.ops: list[Op] = []
        self.crashed: list[str] = []

    def _failed(self, error: BaseException) -> None:
        self.crashed.append(f"{type(error).__name__}: {error}")

    def _txn(self, key: int, fn: Any) -> bool:
        """run_transaction; NotOwned (a switch whose map is not published yet: the mover
        met the dead server between the shards' switch and the catalog's) is retried; any
        other error is recorded (the test judges it) and the write's outcome is unknown."""
        t0 = time.monotonic()
        while True:
            try:
                shardkit.run_transaction(self.Session, fn, refresh_timeout=1.0)
                ok, error = True, ""
                break
            except shardkit.NotOwned:
                if self.stop.is_set() and time.monotonic() - t0 > 60:
                    raise
                time.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - judged by the test
                ok, error = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                break
        with self.lock:
            self.ops.append(Op(t0, time.monotonic(), key, ok, error))
        if not ok:
            time.sleep(0.05)
        return ok

    def _set(self, key: int, ok: bool, value: int | None) -> None:
        if ok:
            self.values[key] = {value}
        else:
            self.values.setdefault(key, set()).add(value)

    def _run(self, me: int) -> None:
        rnd = random.Random(self.seed * 100 + me)
        accounts = [k for k in range(N_ACCOUNTS) if k % self.n == me]
        next_id = 10_000_000 * (me + 1)
        mine: list[int] = []     # accounts this writer inserted (acknowledged)
        while not self.stop.is_set():
            op = rnd.random()
            next_id += 1
            if op < 0.6:
                k, v = rnd.choice(accounts), rnd.randrange(1_000_000)
                ok = self._txn(k, lambda s: s.execute(update(Account).where(Account.id == k).values(balance=v)))
                self._set(k, ok, v)
            elif op < 0.85:
                k, v = next_id, rnd.randrange(1000)
                self.values[k] = {None}
                ok = self._txn(k, lambda s: s.execute(insert(Account).values(id=k, balance=v)))
                self._set(k, ok, v)
                if ok:
                    mine.append(k)
            elif mine:
                k = mine.pop(rnd.randrange(len(mine)))
                ok = self._txn(k, lambda s: s.execute(delete(Account).where(Account.id == k)))
                self._set(k, ok, None)
            time.sleep(rnd.random() * 0.004)


# -- processes -----------------------------------------------------------------------------


class Proc:
    numbers = iter(range(10**9))

    def __init__(self, w: World, *args: str, rest: float = 0.0, script: str = _PHASED) -> None:
        """`shardkit rebalance ARGS` run by ``script``, a process of its own forked without
        its imports (tests/prefork.py)."""
        n = next(Proc.numbers)
        self.args = args
        self.phase_file = w.tmp / f"phase{n}"
        self.out_path, self.err_path = w.tmp / f"out{n}", w.tmp / f"err{n}"
        self.out_path.write_text("")
        self.err_path.write_text("")
        self.p = prefork.popen(script, [str(self.phase_file), "rebalance", *args, "--config", str(w.cfg_path)],
                               stdout=self.out_path, stderr=self.err_path, env={"KS_REST": str(rest)})

    def phase(self) -> str:
        try:
            return self.phase_file.read_text().strip() or "start"
        except FileNotFoundError:
            return "interpreter start"

    def wait(self, timeout: float = 180) -> int:
        return self.p.wait(timeout)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    @property
    def output(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()


def _cli(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    """`shardkit ARGS` run in this process (tests/inproc_cli.py: its exit status, stdout and
    stderr as a process's, without ~0.6 s of imports a call); the movers that are killed
    (:class:`Proc`) keep processes of their own."""
    return inproc_cli.run([*args, "--config", str(w.cfg_path)])


def _status(w: World, move_id: int) -> dict[str, Any]:
    r = _cli(w, "rebalance", "status", str(move_id), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    return data[0] if isinstance(data, list) else data


def _owns(w: World, shard: str, buckets: list[int]) -> int:
    with w.conn(shard) as c:
        return c.execute("SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = ANY(%s)",
                         (buckets,)).fetchone()[0]


# -- an episode ----------------------------------------------------------------------------


@dataclass
class Kill:
    victim: str            # "catalog", "source" or "target"
    node: Any
    how: str               # "kill" or "immediate"
    t_kill: float = 0.0
    t_back: float = 0.0
    phase: str = ""


def run_episode(dev: Any, tmp: Path, seed: int) -> None:
    w = _make_world(dev, tmp / f"ep{seed}", f"ks{seed}")
    try:
        _episode(w, random.Random(seed), seed)
    finally:
        print(w.text(), flush=True)  # (shown with -s)
        _drop_world(w)


def _episode(w: World, rnd: random.Random, seed: int) -> None:
    admin = w.cluster()
    app = w.cluster(follow_map=True, metadata=Base.metadata)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=app)
    try:
        before = list(admin.config.bucket_map)
        moving = sorted(rnd.sample([b for b, s in enumerate(before) if s == "s0"], 8))
        new = list(before)
        for b in moving:
            new[b] = "s1"
        plan_path = w.tmp / "plan.json"
        plan_path.write_text(json.dumps(plan_from_maps(before, new, f"seed {seed}").as_dict()))
        victim = rnd.choice(["catalog", "source", "target"])
        node = {"catalog": w.catalog_node, "source": w.node("s0"), "target": w.node("s1")}[victim]
        kill = Kill(victim, node, rnd.choice(["kill", "immediate"]))
        target_phase = rnd.choice(PHASES + ["any time"])
        rest = rnd.choice([0.05, 0.1, 0.2])
        w.say(f"seed {seed}: buckets {moving} s0 -> s1; {victim} ({node.name}) dies ({kill.how}) at "
              f"{target_phase} (rest {rest})")
        writers = Writers(Session, rnd.choice([2, 3]), seed)
        with writers:
            time.sleep(0.3)
            move_id = _drive(w, rnd, plan_path, kill, target_phase, rest)
            time.sleep(0.3)
        assert not writers.crashed, writers.crashed[:3]
        _check(w, admin, Session, writers, move_id, kill, moving, before)
    finally:
        app.dispose()
        admin.dispose()


def _drive(w: World, rnd: random.Random, plan_path: Path, kill: Kill, target_phase: str, rest: float) -> int:
    before = _latest_move(w)
    mover = Proc(w, "apply", "--plan", str(plan_path), "--batch-buckets", str(rnd.choice([4, 8])),
                 "--grace", rnd.choice(["0", "0.2"]), rest=rest)
    rc = _kill_during(w, rnd, mover, kill, target_phase, rest)
    move_id = _latest_move(w)
    _check_failure(w, kill, rc, mover, None if move_id == before else move_id)
    if move_id == before:
        # It died before it began the move (its checks met the dead server): apply again.
        r = _cli(w, "rebalance", "apply", "--plan", str(plan_path), "--grace", "0")
        w.say(f"apply again -> {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]!r}")
        assert r.returncode == 0, (r.stderr, w.text())
        move_id = _latest_move(w)
        assert move_id != before, w.text()
    return _finish(w, rnd, move_id)


def _kill_during(w: World, rnd: random.Random, mover: Proc, kill: Kill, target_phase: str, rest: float) -> int:
    """Kill ``kill``'s server while ``mover`` (a `rebalance` command) is in ``target_phase``
    (or at a random time), start it again after a while; the command's exit status."""
    # The moment: once the mover is in ``target_phase`` (a little after it entered it), or
    # at a random time over a move's usual life.
    t0 = time.monotonic()
    if target_phase == "any time":
        while mover.p.poll() is None and mover.phase() == "interpreter start":
            time.sleep(0.005)
        t0 = time.monotonic()
        delay = rnd.uniform(0, 3.0)
        while time.monotonic() < t0 + delay and mover.p.poll() is None:
            time.sleep(0.005)
    else:
        while mover.p.poll() is None and target_phase not in mover.phase():
            assert time.monotonic() < t0 + 120, f"the mover never reached {target_phase}"
            time.sleep(0.002)
        time.sleep(rnd.uniform(0, rest * 1.5))
    kill.phase = mover.phase() if mover.p.poll() is None else "(mover ended)"
    kill.t_kill = time.monotonic()
    if kill.how == "kill":
        kill.node.kill()
    else:
        kill.node.stop("immediate")
    w.say(f"{kill.victim} {kill.node.name} down ({kill.how}) in mover phase {kill.phase!r}")
    down_for = rnd.uniform(0.5, 2.5)
    # The mover meets the dead server (or never needs it again); it must not hang on it.
    try:
        mover.wait(timeout=down_for)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(max(0.0, kill.t_kill + down_for - time.monotonic()))
    kill.node.start()
    kill.t_back = time.monotonic()
    w.say(f"{kill.node.name} back after {kill.t_back - kill.t_kill:.2f}s")
    try:
        rc = mover.wait(timeout=120)
    except subprocess.TimeoutExpired:
        mover.p.kill()
        pytest.fail(f"the mover still runs 120 s after {kill.node.name} came back (phase "
                    f"{mover.phase()!r}):\n{mover.output}\n{w.text()}")
    out = mover.output
    w.say(f"{mover.args[0]} -> {rc}: {out.strip()[-400:]!r}")
    return rc


def _finish(w: World, rnd: random.Random, move_id: int) -> int:
    """Resume or abort, at random, until the move ends; checks what `status` offers."""
    for attempt in range(8):
        _wait_for_lock_release(w, move_id)
        st = _status(w, move_id)
        if st["state"] != "running":
            w.say(f"move {move_id} {st['state']}")
            return move_id
        # Status tells the truth: no process holds the move; it offers what will work.
        assert not st["mover"], (st, w.text())
        assert st["next"], (st, w.text())
        verb = rnd.choice(["resume", "abort"])
        r = _cli(w, "rebalance", verb, str(move_id), *(["--grace", "0"] if verb == "resume" else []))
        w.say(f"{verb} -> {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]!r} (status offered {st['next']})")
        assert "Traceback" not in r.stderr, r.stderr
        assert PASSWORD not in r.stdout + r.stderr
        if verb in st["next"]:
            if verb == "abort" and r.returncode != 0:
                # An abort the status offered may be refused only because the cut-over had
                # begun and had switched on the shards, which the status marks.
                assert "has switched" in r.stderr, (r.stderr, w.text())
                assert any(b["cutting_over"] for b in st["batches"]), (st, r.stderr, w.text())
            else:
                assert r.returncode == 0, (r.stderr, w.text())
        else:
            assert r.returncode != 0, (f"status did not offer {verb}, which worked", st, w.text())
    pytest.fail(f"move {move_id} still running:\n{w.text()}")


def _check_failure(w: World, kill: Kill, rc: int, mover: Proc, move_id: int | None) -> None:
    """The mover that met a dead server stops with one clear line naming it (the catalog,
    or the shard and its role in the batch) and, once it began the move, the command that
    goes on from there."""
    err = mover.stderr
    assert "Traceback" not in err, f"{err}\n{w.text()}"
    assert PASSWORD not in mover.output, f"{mover.output}\n{w.text()}"
    if rc == 0:
        return  # (it never needed the server while it was down)
    assert rc == 2, f"rc {rc}: {err}\n{w.text()}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"{err}\n{w.text()}"
    message = lines[0]
    if kill.victim == "catalog":
        assert "the catalog" in message, f"the error does not name the catalog: {message}\n{w.text()}"
    else:
        shard = kill.node.shard
        assert (f"{shard} (the batch's {kill.victim}, 127.0.0.1:{kill.node.port})" in message
                or f"shard {shard}: node {shard}/primary " in message), (
            f"the error does not name {shard}, the {kill.victim}, as the server that failed: {message}\n{w.text()}")
    if move_id is not None:
        assert f"shardkit rebalance resume {move_id}`" in message, (
            f"the error does not say how to go on: {message}\n{w.text()}")
        if kill.victim != "catalog":
            # Recorded as the move's error, which `rebalance status` shows.
            recorded = _status(w, move_id)["error"] or ""
            assert kill.node.shard in recorded and "127.0.0.1" in recorded, (recorded, w.text())


def _check(w: World, admin: Any, Session: Any, writers: Writers, move_id: int, kill: Kill,
           moving: list[int], before: list[str]) -> None:
    log = w.text()
    admin.refresh_map()
    status = rebalance.move_status(admin, move_id)[0]
    assert status["state"] in ("done", "aborted") and not status["mover"], (status, log)
    with w.catalog() as c:
        batches = c.execute("SELECT source, target, buckets, step FROM shardkit_catalog.move_batches "
                            "WHERE move_id = %s", (move_id,)).fetchall()
    live = admin.config.bucket_map
    for source, target, buckets, step in batches:
        assert step in ("cleaned", "aborted"), (step, log)
        for b in buckets:
            assert live[b] == (target if step == "cleaned" else source), (b, step, log)
    assert [live[b] for b in range(BUCKETS) if b not in moving] == [before[b] for b in range(BUCKETS)
                                                                   if b not in moving], log
    for shard in ("s0", "s1"):
        with w.conn(shard) as c:
            owned = {r[0] for r in c.execute("SELECT bucket FROM shardkit.owned_buckets")}
            assert owned == {b for b in range(BUCKETS) if live[b] == shard}, (shard, owned, log)
            assert c.execute("SELECT count(*) FROM shardkit.moving_buckets").fetchone()[0] == 0, (shard, log)
            assert c.execute("SELECT count(*) FROM shardkit.changes").fetchone()[0] == 0, (shard, log)
    report = verify(admin)
    assert report.ok, report.render() + "\n" + log
    # The ledger: every acknowledged write once, on its owner.
    rows = w.rows()
    for k, places in rows.items():
        assert len(places) == 1, f"account {k} is on {places}\n{log}"
        assert places[0][0] == admin.shard_for("ks_accounts", k), f"account {k} on {places}, not its owner\n{log}"
    for k, values in writers.values.items():
        found = rows[k][0][1] if k in rows else None
        assert found in values, f"account {k}: the ledger allows {values}, found {rows.get(k)}\n{log}"
    # Writers: errors only where a dead server (or the map of a move it stopped) explains them.
    moving_set = set(moving)
    settle = 10.0
    bad = []
    for op in writers.ops:
        if op.ok:
            continue
        b = shardkit.bucket_for(op.key, BUCKETS)
        owners = {before[b], live[b]}
        in_outage = op.t1 >= kill.t_kill and op.t0 <= kill.t_back + settle
        if not in_outage:
            bad.append(op)
        elif kill.victim == "catalog":
            if b not in moving_set:
                bad.append(op)  # a non-moving bucket needs no catalog
        elif kill.node.shard not in owners and b not in moving_set:
            bad.append(op)
    assert not bad, "writes that failed and should not have:\n" + "\n".join(
        f"{o.key} (bucket {shardkit.bucket_for(o.key, BUCKETS)}) {o.t0 - kill.t_kill:+.2f}s: {o.error}"
        for o in bad[:10]) + "\n" + log
    # Writers of non-moving buckets on live shards kept working while the server was down.
    down = [op for op in writers.ops if op.t0 >= kill.t_kill and op.t1 <= kill.t_back
            and shardkit.bucket_for(op.key, BUCKETS) not in moving_set
            and (kill.victim == "catalog" or live[shardkit.bucket_for(op.key, BUCKETS)] != kill.node.shard)]
    if kill.t_back - kill.t_kill > 1.0:
        assert any(op.ok for op in down), (len(down), log)
    # Writers of every bucket go on (no lock left behind).
    probe = [next(k for k in range(N_ACCOUNTS) if shardkit.bucket_for(k, BUCKETS) == b) for b in range(BUCKETS)]
    t0 = time.monotonic()
    shardkit.run_transaction(Session, lambda s: s.execute(
        update(Account).where(Account.id.in_(probe)).values(balance=Account.balance)))
    assert time.monotonic() - t0 < 10, log


# -- tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(shardkit_module_cluster_factory):
    # s0 and s1 are the shards; s2's server only holds the catalog.
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)


def _seeds() -> list[int]:
    if one := os.environ.get("SHARDKIT_SERVER_KILL_SEED"):
        return [int(one)]
    more = int(os.environ.get("SHARDKIT_SERVER_KILL_SEEDS", "0"))
    return [2, 4, 5, 22] + list(range(1000, 1000 + more))


@pytest.mark.parametrize("seed", _seeds())
def test_move_survives_a_server_killed_at_a_random_moment(servers, tmp_path, seed):
    run_episode(servers, tmp_path, seed)


def _one_batch_plan(admin: Any) -> Any:
    live = admin.config.bucket_map
    new = list(live)
    for b in [b for b, s in enumerate(live) if s == "s0"][:4]:
        new[b] = "s1"
    return plan_from_maps(live, new, "test")


def test_a_mover_whose_catalog_restarted_holds_its_move_again(servers, tmp_path):
    """The mover's lock on its move lives in a catalog session; a catalog restarted while
    the mover copies (the mover itself saw nothing: its pool reconnects) took it away, and
    the mover went on without it: `rebalance status` said no process ran the move and
    offered `resume` and `abort`, and a second mover could start on it.  At its next
    catalog write the mover takes the lock again (or stops, if another process has it)."""
    w = _make_world(servers, tmp_path / "w", "kslock")
    admin = w.cluster()
    seen: dict[str, Any] = {}
    try:
        class RestartsTheCatalog(rebalance.Mover):
            def _record(self, move_id: int, batch: int, step: str, detail: Any = None) -> None:
                super()._record(move_id, batch, step, detail)
                if step == "capturing":
                    w.catalog_node.stop("immediate")
                    w.catalog_node.start()
                elif step == "copied":
                    observer = w.cluster()
                    try:
                        seen["status"] = rebalance.move_status(observer, move_id)[0]
                        with pytest.raises(rebalance.RebalanceError, match="being run by another mover"):
                            rebalance.Mover(observer, grace=0, progress=lambda line: None).run(move_id)
                    finally:
                        observer.dispose()

        move_id = RestartsTheCatalog(admin, grace=0, progress=lambda line: None).apply(_one_batch_plan(admin))
        assert seen["status"]["mover"] and seen["status"]["next"] == [], seen["status"]
        admin.refresh_map()
        status = rebalance.move_status(admin, move_id)[0]
        assert status["state"] == "done" and not status["mover"], status
        assert verify(admin).ok
        _wait_for_lock_release(w, move_id, timeout=5)
    finally:
        admin.dispose()
        _drop_world(w)


def test_a_mover_that_lost_its_move_to_another_while_the_catalog_restarted_stops(servers, tmp_path):
    """The lock lost with the catalog's session, another process took the move before the
    mover's next catalog write: the mover stops there (the other holds the lock), and says so."""
    w = _make_world(servers, tmp_path / "w", "kslock2")
    admin = w.cluster()
    try:
        other = w.cluster()
        held: list[Any] = []

        class RestartsTheCatalog(rebalance.Mover):
            def _record(self, move_id: int, batch: int, step: str, detail: Any = None) -> None:
                super()._record(move_id, batch, step, detail)
                if step == "capturing":
                    w.catalog_node.stop("immediate")
                    w.catalog_node.start()
                    # Another process takes the move's lock (as a resume or an abort would first).
                    held.append(other.catalog.engine.connect())
                    assert held[0].execute(text_("SELECT pg_try_advisory_lock(:c, :m)"),
                                           {"c": MOVER_LOCK_CLASS, "m": move_id}).scalar()
                    held[0].commit()

        mover = RestartsTheCatalog(admin, grace=0, progress=lambda line: None)
        move_id = mover.start(_one_batch_plan(admin))
        with pytest.raises(rebalance.RebalanceError, match="another process holds the move"):
            mover.run(move_id)
        status = rebalance.move_status(admin, move_id)[0]
        assert status["state"] == "running" and status["mover"], status
        held[0].execute(text_("SELECT pg_advisory_unlock_all()"))
        held[0].commit()
        held[0].close()
        other.dispose()
        rebalance.Mover(admin, grace=0, progress=lambda line: None).run(move_id)
        admin.refresh_map()
        assert rebalance.move_status(admin, move_id)[0]["state"] == "done"
        assert verify(admin).ok
    finally:
        admin.dispose()
        _drop_world(w)
