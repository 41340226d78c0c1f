"""Replica health, lag and selection; consistency tokens for read-your-writes.

A background :class:`HealthMonitor` polls every node on a short interval with
short connect and statement timeouts (one thread per node, so a hung node
cannot stall the others) and records, per node: reachable or not, recovery
state, WAL position and latency.  Replica lag is derived from the samples:

* bytes: ``primary WAL position - replica replay position`` (a gap <= 0 is zero lag);
* seconds: ``now() - pg_last_xact_replay_timestamp()``, counted only while there
  is a byte gap, so an idle primary does not make its replicas look stale; held
  within what the monitor's own record of the primary's positions proves (at most
  the time since the primary was last seen at or before the replay position, at
  least the time since it was seen past it), so neither an idle primary nor a
  replica whose clock runs behind the primary's misstates it.

A replica seen replaying past a position the primary had not reached when asked
later is not following that primary (a failover left it on the old timeline, or
the primary is another server now): positions say nothing about it, and it gets
no reads until its replay position moves.

:class:`ReplicaSelector` picks, for one read, a replica that is up, not banned,
within the lag limits and (under read-your-writes) past the session's token;
otherwise it answers ``None`` and the read goes to the primary.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import random
import re
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg.rows import tuple_row
from sqlalchemy import exc as sa_exc

from ._config import ReplicaSettings, mask_url
from .errors import ShardkitError, first_line

if TYPE_CHECKING:
    from ._cluster import Cluster

__all__ = [
    "HealthMonitor",
    "NodeHealth",
    "ReplicaSelector",
    "format_lsn",
    "parse_lsn",
    "parse_token",
    "format_token",
    "replay_target",
]

log = logging.getLogger("shardkit.replicas")

_TOKEN_VERSION = "v1"


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> an integer WAL position."""
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


WAL_BLOCK_SIZE = 8192
WAL_SEGMENT_SIZE = 16 * 1024 * 1024


# A server's WAL position past every commit it has acknowledged (its insert position: the
# flushed one is not, under synchronous_commit = off); see replay_target.
WAL_POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"


def replay_target(insert_lsn: int, block_size: int = WAL_BLOCK_SIZE,
                  segment_size: int = WAL_SEGMENT_SIZE) -> int:
    """The replay position that means "everything before ``insert_lsn`` is applied".

    When the last record ends exactly at a page boundary, the insert position
    is reported past the next page's header, but replay stops at the boundary:
    without this adjustment a replica could look behind forever.
    """
    header = 40 if insert_lsn % segment_size < block_size else 24  # long / short page header
    if insert_lsn % block_size == header:
        return insert_lsn - header
    return insert_lsn


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# One shard's position in a token: a shard name (as the configuration allows them: ASCII,
# no spaces, at most 63 characters) and format_lsn's hex halves, 32 bits each.
_TOKEN_PART: Final = re.compile(
    r"(?P<shard>[A-Za-z_][A-Za-z0-9_\-]{0,62})=(?P<hi>[0-9A-Fa-f]{1,8})/(?P<lo>[0-9A-Fa-f]{1,8})")


def format_token(positions: Mapping[str, int]) -> str:
    """A consistency token as a short string (safe in a cookie or a job's arguments)."""
    body = ",".join(f"{s}={format_lsn(lsn)}" for s, lsn in sorted(positions.items()))
    return f"{_TOKEN_VERSION}:{body}"


def parse_token(token: str) -> dict[str, int]:
    """The inverse of :func:`format_token`; raises :class:`ShardkitError` on a malformed token."""
    if not isinstance(token, str):
        # (bytes from a raw header or a job queue, None or a number from a payload)
        raise ShardkitError(
            f"a consistency token is a str (what session.consistency_token() returned), "
            f"not {type(token).__name__}")
    version, sep, body = token.partition(":")
    if version != _TOKEN_VERSION or not sep:
        raise ShardkitError(
            f"not a shardkit consistency token: {token[:40]!r} (expected '{_TOKEN_VERSION}:s0=0/16B3A18,...')"
        )
    out: dict[str, int] = {}
    if not body:
        return out
    for part in body.split(","):
        # Exactly what format_token writes: an edited token is refused, never
        # read as some other position (which would change where reads go).
        m = _TOKEN_PART.fullmatch(part)
        if m is None or m["shard"] in out:
            what = "names a shard twice" if m is not None else f"has a malformed part {part[:40]!r}"
            raise ShardkitError(
                f"malformed consistency token {token[:80]!r}: it {what}; pass the string "
                "session.consistency_token() returned, unchanged")
        out[m["shard"]] = (int(m["hi"], 16) << 32) | int(m["lo"], 16)
    return out


@dataclass
class NodeHealth:
    """What the monitor last saw of one node.  Read it through :meth:`Cluster.health`."""

    shard: str
    name: str
    role: str
    index: int
    up: bool = False
    checked_at: float = 0.0
    in_recovery: bool | None = None
    read_only: bool | None = None       # primary: its transactions are read-only (it refuses writes)
    wal_lsn: int | None = None          # primary: current WAL position; replica: replay position
    replay_timestamp_age: float | None = None
    latency_ms: float | None = None     # moving average of the poll round trip
    error: str | None = None
    banned_until: float = 0.0
    ban_reason: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    # Replica: the WAL position it has received (streamed) from its primary; the lag's
    # reference while the primary has never answered this monitor (down when it started).
    receive_lsn: int | None = None
    _seen: bool = field(default=False, repr=False)
    # When the poll out now was sent (monotonic); None between polls.
    _asking_since: float | None = field(default=None, repr=False)
    _server_start: Any = field(default=None, repr=False)   # pg_postmaster_start_time()
    # (monotonic time, wal_lsn), set in one assignment: a primary's, when the poll that read
    # it was sent; a replica's, when its answer came.  See HealthMonitor._update_lag.
    _lsn_sample: tuple[float, int] | None = field(default=None, repr=False)
    # Replica: the replay position at which it was seen past the primary (not following it).
    _ahead_at: int | None = field(default=None, repr=False)
    # Replica: over the configured lag limits when its lag was last known (for the log).
    _over_lag: bool = field(default=False, repr=False)

    @property
    def not_following(self) -> bool:
        """Replica: seen replaying past the primary's WAL position, and not moved since."""
        return self._ahead_at is not None

    def banned(self, now: float | None = None) -> bool:
        return self.banned_until > (time.monotonic() if now is None else now)

    def heard_from(self, now: float, stale_after: float) -> bool:
        """Whether the last poll answered less than ``stale_after`` seconds ago."""
        return bool(self.checked_at) and now - self.checked_at <= stale_after

    def as_dict(self, stale_after: float | None = None, hung_after: float | None = None) -> dict[str, Any]:
        """The node's state for :meth:`Cluster.health`.  Past ``stale_after`` without an
        answer to the poll it is reported down; a primary (``hung_after`` given) only past
        ``hung_after``, as its writes are refused only then (before, they wait for the
        answer): until then it is up, with the late poll as its error."""
        now = time.monotonic()
        up, error = self.up, self.error
        if up and stale_after is not None and self.checked_at and not self.heard_from(now, stale_after):
            # A hung node (stopped, not refusing connections) leaves its poll
            # waiting: say so instead of repeating its last good sample.
            silent = f"no answer to the health poll for {now - self.checked_at:.1f} s"
            if hung_after is not None and self.heard_from(now, hung_after):
                error = (f"{silent}; writes wait for one, and are refused once it has been "
                         f"{hung_after:g} s")
            else:
                up, error = False, silent
        elif up and self.not_following:
            error = ("it replays past the primary's WAL position: it does not follow this "
                     "primary (a failover left it on another timeline?)")
        return {
            "shard": self.shard,
            "node": self.name,
            "role": self.role,
            "up": up,
            "in_recovery": self.in_recovery,
            "read_only": self.read_only,
            "lag_bytes": self.lag_bytes,
            # A replica reported down (or hung): how far behind it is now is unknown.
            "lag_seconds": (None if self.lag_seconds is None or (self.role == "replica" and not up)
                            else round(self.lag_seconds, 3)),
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "banned_for_s": round(self.banned_until - now, 2) if self.banned(now) else 0,
            "ban_reason": self.ban_reason if self.banned(now) else None,
            "error": error,
            "checked_ago_s": round(now - self.checked_at, 3) if self.checked_at else None,
        }


@dataclass
class _ShardState:
    primary: NodeHealth
    replicas: list[NodeHealth]
    weights: tuple[float, ...]
    rr: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)
    # (monotonic time, the primary's WAL position then), one entry per position seen,
    # with the last time it was seen; see HealthMonitor._update_lag.
    history: list[tuple[float, int]] = field(default_factory=list)

    def note_primary_position(self, at: float, lsn: int) -> None:
        """Called by the primary's poll thread only.  Other threads read the history: it is
        only appended to or has its last entry replaced in place; trimming it or starting
        it afresh makes a new list."""
        h = self.history
        if h and h[-1][1] == lsn:
            h[-1] = (at, lsn)
            return
        if h and lsn < h[-1][1]:
            # A different server (failover, restore): its positions start afresh.
            self.history = [(at, lsn)]
            return
        h.append((at, lsn))
        if len(h) > 2 * _HISTORY:
            self.history = h[-_HISTORY:]

    def seen_past(self, lsn: int) -> float | None:
        """A time the primary was seen at a position > ``lsn``: the earliest entry's (each
        keeps the last time its position was seen), None if none is in the history."""
        h = self.history
        i = bisect.bisect_right(h, lsn, key=lambda e: e[1])
        return h[i][0] if i < len(h) else None

    def last_seen_at_or_before(self, lsn: int) -> float | None:
        """When the primary was last seen at a position <= ``lsn`` (None: not in the history)."""
        h = self.history
        i = bisect.bisect_right(h, lsn, key=lambda e: e[1])
        return h[i - 1][0] if i else None


# Primary positions kept per shard (at least): minutes of history at the default poll interval.
_HISTORY: Final = 1024


def _poll_thread(ref: weakref.ref[HealthMonitor], node: NodeHealth, stop: threading.Event) -> None:
    """A poll thread: polls ``node`` until ``stop`` is set, or until its monitor is gone.
    It holds the monitor only while polling, so a cluster dropped without dispose() (and
    its monitor with it) ends its poll threads and their connections, rather than
    leaving them polling for the life of the process."""
    conn: psycopg.Connection[Any] | None = None
    try:
        while not stop.is_set():
            monitor = ref()
            if monitor is None:
                break
            started = time.monotonic()
            conn = monitor._poll_once(conn, node, started)
            interval = monitor.settings.poll_interval
            del monitor
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        _close_quietly(conn)


def _close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):  # it is gone already
            conn.close()


class HealthMonitor:
    """Polls every node of a cluster in background threads."""

    #: What a poll selects: (in recovery, WAL position, seconds since the last replayed
    #: transaction (a replica) or whether transactions are read-only (a primary: e.g.
    #: default_transaction_read_only), server start time); a replica's also the WAL
    #: position it has received.
    primary_poll_sql: str = (
        "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL "
        "ELSE pg_current_wal_lsn()::text END, current_setting('transaction_read_only') = 'on', "
        "pg_postmaster_start_time()")
    replica_poll_sql: str = (
        "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
        "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, "
        "pg_postmaster_start_time(), pg_last_wal_receive_lsn()::text")

    def __init__(self, cluster: Cluster, settings: ReplicaSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.shards: dict[str, _ShardState] = {}
        # A node whose last answer is older than this is treated as not up: we
        # do not know its state (nor, for a replica, how far behind it is).
        self.stale_after = max(2.0, 5 * settings.poll_interval, 2 * settings.poll_timeout)
        # A primary that many seconds late is hung: writes are refused.  Between the two a
        # write waits for its answer (see wait_for_answer).
        self.hung_after = 2 * self.stale_after
        for sc in cluster.config.shards:
            primary = NodeHealth(sc.name, f"{sc.name}/primary", "primary", 0)
            reps = [NodeHealth(sc.name, f"{sc.name}/r{i}", "replica", i) for i in range(len(sc.replicas))]
            self.shards[sc.name] = _ShardState(primary, reps, sc.replica_weights or (1.0,) * len(reps))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._started_at = 0.0
        # Every node answered its first poll, or the wait for that is over (wait_first_poll).
        self.first_polled = False
        self._lock = threading.Lock()
        # _update_lag runs from the poll threads and from the threads that learn a replay
        # position by a read-your-writes probe: one at a time (it writes several fields
        # of each replica that it reads again).
        self._lag_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            self._started_at = time.monotonic()
            for state in self.shards.values():
                for node in (state.primary, *state.replicas):
                    t = threading.Thread(target=_poll_thread, args=(weakref.ref(self), node, self._stop),
                                         daemon=True, name=f"shardkit-monitor-{node.name}")
                    t.start()
                    self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for state in self.shards.values():
            with state.changed:
                state.changed.notify_all()  # (wait_for_answer returns)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def describe(self, node: NodeHealth) -> dict[str, Any]:
        """``node``'s state as :meth:`Cluster.health` (and the metrics) report it: a
        silent primary is down from ``hung_after``, when its writes are refused."""
        return node.as_dict(self.stale_after, self.hung_after if node.role == "primary" else None)

    @property
    def running(self) -> bool:
        return self._started and not self._stop.is_set()

    def answers(self, node: NodeHealth) -> bool:
        """Whether a query sent to ``node`` can be expected to answer: up, and (while polls
        run) its last poll answered lately, not hung (a stopped server accepts TCP but
        never answers: a query would wait for ever)."""
        return node.up and not (self.running and not node.heard_from(time.monotonic(), self.stale_after))

    def wait_for_answer(self, node: NodeHealth, until: float) -> bool:
        """Wait, up to the ``time.monotonic()`` time ``until``, for ``node``'s poll to
        answer after it has not answered for ``stale_after``: whether it did (up or down:
        see ``node.up``), or the monitor stopped meanwhile; False at ``until``."""
        state = self.shards[node.shard]
        with state.changed:
            while self.running:
                now = time.monotonic()
                if node.heard_from(now, self.stale_after):
                    return True
                if now >= until:
                    return False
                state.changed.wait(until - now)
        return True

    def wait_first_poll(self) -> None:
        """Block until every node has been polled once, at most until 2 s + ``poll_timeout``
        after the monitor started (a hung node answers no poll); from then on
        :attr:`first_polled`."""
        deadline = self._started_at + 2 + self.settings.poll_timeout
        for state in self.shards.values():
            nodes = (state.primary, *state.replicas)
            with state.changed:  # (notified by each poll of the shard's nodes, and by stop())
                while self.running and not all(n.checked_at for n in nodes):
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    state.changed.wait(deadline - now)
        if self.running:
            self.first_polled = True

    # -- polling -------------------------------------------------------------------

    def _conninfo(self, node: NodeHealth) -> dict[str, Any]:
        """Connection parameters for polling ``node``: what its engine connects with (the
        URL with its query string, the engine options' connect_args), plus a short connect
        timeout.  No startup ``options``: PgBouncer refuses them (see :meth:`_poll`)."""
        url = self.cluster.node_url(node.shard, node.role, node.index)
        _, kw = url.get_dialect()().create_connect_args(url)
        kw = {**self.cluster._engine_options.get("connect_args", {}), **kw}
        kw.update({
            "autocommit": True,
            # libpq's connect_timeout is whole seconds, 2 at least.
            "connect_timeout": max(2, int(self.settings.poll_timeout + 0.999)),
            # A host that stops answering (network gone, not refused) would otherwise hold
            # the poll until TCP gives up, many minutes after the host is back: the
            # connection is dropped when a poll is not acknowledged in time, and the
            # next poll connects again.
            "tcp_user_timeout": max(2000, int(self.settings.poll_timeout * 4000)),
            "application_name": "shardkit-monitor",
        })
        return kw

    def _poll(self, conn: psycopg.Connection[Any], node: NodeHealth) -> tuple[Any, ...]:
        """One poll of ``node``, in one round trip: its statement timeout is set by the
        query itself (``SET LOCAL``, in the implicit transaction of a multi-statement simple
        query), so it holds behind PgBouncer in transaction mode, which refuses a startup
        ``options`` parameter (or drops it under ``ignore_startup_parameters``), and it is
        left on no server connection.  Never a prepared statement (several statements)."""
        timeout_ms = max(1, int(self.settings.poll_timeout * 1000))
        sql = self.primary_poll_sql if node.role == "primary" else self.replica_poll_sql
        # Text rows as tuples, whatever cursor options the engines' connect_args give.
        with conn.cursor(binary=False, row_factory=tuple_row) as cur:
            cur.execute(f"SET LOCAL statement_timeout = {timeout_ms}; {sql}", prepare=False)
            while cur.description is None and cur.nextset():
                pass  # past the SET's result
            row = cur.fetchone()
        assert row is not None
        return tuple(row)

    def _poll_once(self, conn: psycopg.Connection[Any] | None, node: NodeHealth,
                   started: float) -> psycopg.Connection[Any] | None:
        """Poll ``node`` on ``conn`` (connecting if it has none) and record the answer;
        the connection to poll on next time (None after a failure)."""
        node._asking_since = started
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(**self._conninfo(node))
                row = self._poll(conn, node)
            else:
                try:
                    row = self._poll(conn, node)
                except psycopg.OperationalError:
                    if not conn.broken or time.monotonic() - started > self.settings.poll_timeout:
                        raise
                    # The connection of the last poll was lost at once (the server restarted
                    # since, an operator or a proxy ended the backend): that says nothing of
                    # the node now.  Asked again on a new one before calling it down.
                    _close_quietly(conn)
                    conn = None
                    started = time.monotonic()
                    conn = psycopg.connect(**self._conninfo(node))
                    row = self._poll(conn, node)
            in_recovery, lsn, third, server_start, *received = row
            rtt = (time.monotonic() - started) * 1000
            primary = node.role == "primary"
            self._record(node, up=True, in_recovery=in_recovery,
                         lsn=parse_lsn(lsn) if lsn else None, age=None if primary else third,
                         rtt=rtt, server_start=server_start, asked_at=started,
                         read_only=bool(third) if primary else None,
                         received=parse_lsn(received[0]) if received and received[0] else None)
            return conn
        except Exception as e:  # noqa: BLE001 - any failure means "down" for routing
            _close_quietly(conn)
            self._record(node, up=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            return None

    def _record(self, node: NodeHealth, *, up: bool, in_recovery: bool | None = None,
                lsn: int | None = None, age: float | None = None, rtt: float | None = None,
                error: str | None = None, server_start: Any = None, asked_at: float = 0.0,
                read_only: bool | None = None, received: int | None = None) -> None:
        state = self.shards[node.shard]
        node._asking_since = None
        was_up = node.up
        first = not node._seen
        node._seen = True
        if up and server_start != node._server_start and (node._server_start is not None or not first):
            # The server restarted (seen down or not), or it is up after every poll since
            # the monitor started found it down (connections pooled before the monitor
            # started, to a server that stopped): the connections pooled before are to a
            # server process that is gone.  Let them go, so the next statement does not
            # fail on one.
            self.cluster._renew_pool(node.shard, node.role, node.index)
        if up:
            node._server_start = server_start
        node.up = up
        node.checked_at = time.monotonic()
        node.error = error
        if up:
            node.in_recovery = in_recovery
            node.read_only = read_only
            if lsn is not None:
                node.wal_lsn = lsn
                if node.role == "primary":
                    node._lsn_sample = (asked_at, lsn)
                    state.note_primary_position(node.checked_at, lsn)
                else:
                    node._lsn_sample = (node.checked_at, lsn)
            node.replay_timestamp_age = age
            node.receive_lsn = received
            node.latency_ms = rtt if node.latency_ms is None else 0.8 * node.latency_ms + 0.2 * (rtt or 0)
        # Each change once; a node down at the first poll (down when the process started)
        # too: it gets no reads (a primary: no writes) from the start.
        if (was_up != up and not first) or (first and not up):
            log.log(logging.INFO if up else logging.WARNING, "%s is %s%s", node.name,
                    "up" if up else "down", f" ({error})" if error else "")
        self._update_lag(state)
        with state.changed:
            state.changed.notify_all()

    def _update_lag(self, state: _ShardState) -> None:
        with self._lag_lock:
            self._update_lag_locked(state)

    def _update_lag_locked(self, state: _ShardState) -> None:
        primary_lsn = state.primary.wal_lsn
        p_sample = state.primary._lsn_sample
        # The primary not polled yet (the monitor just started: a new process or forked
        # worker, a cluster used again after dispose()): a replica's lag is unknown, not
        # zero, until the primary's first poll answers.  A primary that never answered (down
        # when the monitor started): a replica is behind by at least what it received from
        # it and has not replayed yet; without that (it received nothing since it started)
        # its lag is unknown.  (Not zero: a replica an hour behind would get reads.)
        unknown = primary_lsn is None and not state.primary.checked_at
        for r in state.replicas:
            reference = primary_lsn if primary_lsn is not None else r.receive_lsn
            if r.wal_lsn is None or unknown or reference is None:
                r.lag_bytes = r.lag_seconds = None
                continue
            r_sample = r._lsn_sample
            if r_sample is not None:
                if r._ahead_at is not None and r._ahead_at != r_sample[1]:
                    r._ahead_at = None  # it replays again: judge it afresh
                # A replica never replays past what its primary has written: past a
                # position the primary was asked for after the replica answered, it does
                # not follow this primary (left on the old timeline by a failover, or the
                # primary is another server), whatever the positions say.
                if p_sample is not None and p_sample[0] >= r_sample[0] and r_sample[1] > p_sample[1]:
                    if r._ahead_at is None:
                        log.warning("%s replays past its primary's WAL position (%s > %s): it does "
                                    "not follow it and gets no reads", r.name,
                                    format_lsn(r_sample[1]), format_lsn(p_sample[1]))
                    r._ahead_at = r_sample[1]
            if r._ahead_at is not None:
                r.lag_bytes = r.lag_seconds = None  # unknown: not behind this primary at all
                continue
            gap = reference - r.wal_lsn
            r.lag_bytes = lag_bytes = max(0, gap)
            if not r.up:
                # Its last replay age is frozen at the moment it went down; how far
                # behind in time it is now is unknown (the byte gap keeps growing).
                r.lag_seconds = None
                continue
            # A gap <= 0 is zero lag; time lag counts only while there is a gap,
            # otherwise an idle primary would make every replica look stale.  With a
            # gap, the age of the last transaction it replayed overstates the lag after
            # the primary sat idle (that transaction is old, yet the replica missed only
            # what came since): the replica has everything the primary had when last
            # seen at or before its replay position, so it is at most that far behind.
            if lag_bytes <= 0:
                r.lag_seconds = 0.0
                continue
            now = time.monotonic()
            since = state.last_seen_at_or_before(r.wal_lsn)
            bound = None if since is None else max(0.0, now - since)  # at most this
            past = state.seen_past(r.wal_lsn)
            # At least this: when the replica was seen at its position, the primary had
            # had WAL it lacks for that long.  (The replay timestamp's age compares the
            # replica's clock with the primary's: a replica whose clock runs behind
            # would look fresher than it is.)
            seen_at = r._lsn_sample[0] if r._lsn_sample is not None else now
            floor = 0.0 if past is None else max(0.0, seen_at - past)
            age = r.replay_timestamp_age  # None: nothing replayed since the replica started
            if age is None:
                # Behind all the history (the primary was never seen where it is) and no
                # transaction replayed to date it: how far behind is unknown (at least
                # since the history starts, which on an idle primary is its last poll), so
                # it gets no reads until it replays a transaction or catches up.
                r.lag_seconds = bound
            else:
                r.lag_seconds = max(floor, max(0.0, age) if bound is None else min(age, bound))
        state.primary.lag_bytes = 0
        state.primary.lag_seconds = 0.0
        self._log_lag_limits(state)

    def _log_lag_limits(self, state: _ShardState) -> None:
        """Log a replica going past the configured lag limits (it gets no reads under them)
        and coming back within them, once each.  A replica down, or whose lag is unknown,
        keeps its state: those are logged as such."""
        max_s, max_b = self.settings.max_lag_seconds, self.settings.max_lag_bytes
        for r in state.replicas:
            lag_b, lag_s = r.lag_bytes, r.lag_seconds
            if not r.up or lag_b is None or lag_s is None:
                continue
            over = lag_b > max_b or lag_s > max_s
            if over == r._over_lag:
                continue
            r._over_lag = over
            if over:
                log.warning("replica %s is %.1f s and %d bytes behind its primary, past the lag limits "
                            "(max_lag_seconds = %g, max_lag_bytes = %d): it gets no reads under them "
                            "until it catches up", r.name, lag_s, lag_b, max_s, max_b)
            else:
                log.info("replica %s is within the lag limits again (%.1f s, %d bytes behind its "
                         "primary): it gets reads", r.name, lag_s, lag_b)

    def note_replay_position(self, shard: str, index: int, lsn: int) -> None:
        """Record a replay position learned outside the poll (a read-your-writes probe)."""
        state = self.shards[shard]
        r = state.replicas[index]
        with self._lag_lock:
            if r.wal_lsn is None or lsn > r.wal_lsn:
                r.wal_lsn = lsn
                r._lsn_sample = (time.monotonic(), lsn)
                self._update_lag_locked(state)

    def ban(self, shard: str, index: int, reason: str, seconds: float | None = None) -> None:
        r = self.shards[shard].replicas[index]
        r.banned_until = time.monotonic() + (self.settings.ban_seconds if seconds is None else seconds)
        r.ban_reason = reason
        log.warning("replica %s banned for %.1f s: %s", r.name,
                    self.settings.ban_seconds if seconds is None else seconds, reason)


class ReplicaSelector:
    """Chooses a replica for a read, by policy, among those fresh enough."""

    def __init__(self, cluster: Cluster, monitor: HealthMonitor, settings: ReplicaSettings) -> None:
        self.cluster = cluster
        self.monitor = monitor
        self.settings = settings
        # A replica whose last sample is older than this is not used: we do not
        # know how far behind it is.
        self._stale_after = monitor.stale_after
        self._rand = random.Random()
        self._lock = threading.Lock()

    def eligible(self, shard: str, *, max_lag_seconds: float, max_lag_bytes: int,
                 min_lsn: int | None, exclude: frozenset[int] = frozenset()
                 ) -> tuple[list[NodeHealth], list[NodeHealth]]:
        """(replicas usable now, replicas only short of the token)."""
        state = self.monitor.shards[shard]
        now = time.monotonic()
        stale_after = self._stale_after
        ok, behind_token = [], []
        for r in state.replicas:
            if not r.up or r.banned_until > now or r.in_recovery is False or r.index in exclude:
                continue
            lag_b, lag_s = r.lag_bytes, r.lag_seconds  # (the poll threads update them)
            if now - r.checked_at > stale_after or lag_b is None or lag_s is None:
                continue  # no recent sample, or it says nothing about how far behind it is
            if lag_b > max_lag_bytes or lag_s > max_lag_seconds:
                continue
            if min_lsn is not None and (r.wal_lsn is None or r.wal_lsn < min_lsn):
                behind_token.append(r)
                continue
            ok.append(r)
        return ok, behind_token

    def pick(self, shard: str, candidates: list[NodeHealth]) -> NodeHealth:
        policy = self.settings.policy
        if len(candidates) == 1:
            return candidates[0]
        state = self.monitor.shards[shard]
        if policy == "random":
            weights = [state.weights[r.index] for r in candidates]
            return self._rand.choices(candidates, weights=weights)[0]
        if policy == "least_outstanding":
            # This process's reads in progress on each; among the least busy, the next in
            # turn: reads that never overlap (a worker serving one request at a time) find
            # every replica idle, and a tie given to the first would send them all there.
            engines = self.cluster._engines
            least, tied = -1, []
            for r in candidates:
                eng = engines.get((shard, "replica", r.index))
                out = eng.pool.checkedout() if eng is not None else 0  # type: ignore[attr-defined]
                if out < least or least < 0:
                    least, tied = out, [r]
                elif out == least:
                    tied.append(r)
            if len(tied) == 1:
                return tied[0]
            state.rr = turn = state.rr + 1  # (unlocked: a lost turn only repeats a replica)
            return tied[turn % len(tied)]
        if policy == "lowest_latency":
            return min(candidates, key=lambda r: r.latency_ms if r.latency_ms is not None else 1e9)
        with self._lock:
            state.rr += 1
            return candidates[state.rr % len(candidates)]

    def probe_reached(self, shard: str, replica: NodeHealth, min_lsn: int, wait: float) -> bool:
        """Ask the replica itself whether it has replayed ``min_lsn``, waiting up to ``wait`` s."""
        deadline = time.monotonic() + wait
        engine = self.cluster.engine(shard, "replica", replica.index)
        try:
            with engine.connect() as conn:
                while True:
                    text = conn.exec_driver_sql("SELECT pg_last_wal_replay_lsn()::text").scalar()
                    if text:
                        lsn = parse_lsn(text)
                        self.monitor.note_replay_position(shard, replica.index, lsn)
                        if lsn >= min_lsn:
                            return True
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.002)
        except sa_exc.TimeoutError:
            return False  # this process's pool for it is busy: nothing wrong with the replica
        except Exception as e:  # noqa: BLE001 - a failed probe means "not this replica"
            self.monitor.ban(shard, replica.index, f"probe failed: {first_line(e)}"[:200])
            return False


def describe_node(cluster: Cluster, shard: str, role: str, index: int) -> str:
    return mask_url(cluster.node_url(shard, role, index))
