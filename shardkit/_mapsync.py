"""Keeping a process's bucket map in step with the catalog.

A :class:`MapFollower` thread LISTENs on the catalog's ``shardkit_map``
channel and reloads the map when a new version is announced, when a shard
refuses a write as not owned (:meth:`MapFollower.poke`), and every
``poll_interval`` seconds in case a notification was missed (a dropped
connection).  Reconnects with back-off (0.2 s, doubling up to 5 s) when the
catalog is unreachable, with a warning once per outage and cause (then a reminder
every ``_REPEAT_WARNING`` seconds, the retries at DEBUG); an unexpected error (a bug,
a catalog row it cannot read) is said the same way, at ERROR with its traceback the
first time, and retried with the same back-off.  The process keeps routing by
the map it has meanwhile, which the shards' guards make safe: a stale map can
cost a refused write, never a misplaced one.  A catalog map that does not fit
the config file (a shard the file does not name) is an error said once, and the
process's sessions refuse every statement meanwhile (see Cluster.refuse_misfit); the
follower keeps listening and takes the next map that fits.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy.exc import SQLAlchemyError

from ._config import conninfo, mask_url
from .catalog import MAP_CHANNEL, connect_timeout_args
from .errors import ConfigurationError, ShardUnavailable

if TYPE_CHECKING:
    from ._cluster import Cluster

log = logging.getLogger("shardkit.catalog")
# While the catalog stays out with the same error, its warning is repeated this often (s).
_REPEAT_WARNING = 60.0


class MapFollower:
    def __init__(self, cluster: Cluster, *, poll_interval: float = 30.0) -> None:
        # Weakly: the thread holds the follower, which must not keep the cluster alive.
        # A cluster dropped without dispose() stops its follower when it is collected.
        self._cluster = weakref.ref(cluster)
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        weakref.finalize(cluster, self._stop.set)
        self._poke = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardkit-map-follower", daemon=True)
        self.connected = threading.Event()
        # In a connection attempt, which nothing interrupts (psycopg's connect_timeout ends it).
        self._connecting = False
        # Said once that the catalog has no map yet (until it has one).
        self._said_empty = False
        # The last catalog map that did not fit the config file, said once.
        self._said_misfit: str | None = None
        #: Why the follower cannot follow the catalog now (passwords masked), as its
        #: warning says it; None while it follows (see Cluster.health()).
        self.error: str | None = None

    @property
    def cluster(self) -> Cluster:
        cluster = self._cluster()
        if cluster is None:
            # (What a weakref.proxy raises: the cluster was collected, dropped without dispose().)
            raise ReferenceError("the follower's cluster is gone")
        return cluster

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop following.  Returns at once while the thread is in a connection attempt
        (to a catalog that does not answer, up to the connection timeout): the thread
        then ends when the attempt does, without using the connection or the cluster."""
        self._stop.set()
        self._poke.set()
        if self._thread.ident is not None and not self._connecting:
            self._thread.join(timeout=timeout)

    def poke(self) -> None:
        """Reload the map soon (a shard said the map is stale)."""
        self._poke.set()

    def _dsn(self) -> str:
        url = self.cluster.config.catalog_url
        assert url is not None
        return conninfo(url)

    def _connect(self) -> psycopg.Connection[Any]:
        self._connecting = True
        try:
            # The URL's connect_timeout, if it has one, else the catalog's default.
            url = self.cluster.config.catalog_url
            assert url is not None
            return psycopg.connect(self._dsn(), autocommit=True, **connect_timeout_args(url))
        finally:
            self._connecting = False

    def _using(self) -> str:
        version = self.cluster.map_version
        return "the config file's map" if version is None else f"map version {version}"

    def _describe(self, e: BaseException) -> str:
        """What went wrong, naming the catalog once."""
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        if isinstance(e, ShardUnavailable):
            return reason  # the catalog's own error: it names the catalog
        where = f"the catalog ({mask_url(self.cluster.config.catalog_url)})"
        if isinstance(e, psycopg.OperationalError) or isinstance(getattr(e, "orig", None), psycopg.OperationalError):
            return f"{where} is unreachable: {reason}"
        return f"{where} cannot be read: {reason}"

    def _unexpected(self, e: BaseException) -> str:
        """What went wrong, for an error the follower does not expect (passwords masked)."""
        from .rebalance import mask_secrets

        text = mask_secrets(str(e), self.cluster).strip()
        reason = text.splitlines()[0] if text else ""
        return (f"the map follower failed on the catalog ({mask_url(self.cluster.config.catalog_url)}): "
                f"{type(e).__name__}: {reason}").rstrip(": ")

    def _log_traceback(self, e: BaseException, msg: str, args: tuple[Any, ...]) -> None:
        """Log ``msg`` at ERROR with ``e``'s traceback; one written out in the message,
        passwords masked, if its text holds a configured password."""
        from .rebalance import mask_secrets

        tb = "".join(traceback.format_exception(e))
        masked = mask_secrets(tb, self.cluster)
        if masked == tb:
            log.error(msg, *args, exc_info=e)
        else:
            log.error(msg + "\n%s", *args, masked.rstrip())

    def _refresh(self) -> None:
        try:
            self.cluster.refresh_map()
        except ConfigurationError as e:
            # The catalog answers; its map is what the file cannot route by.  Said once
            # per problem: the same map is read again at every notification and poll.
            if str(e) != self._said_misfit:
                log.error("catalog %s: %s", mask_url(self.cluster.config.catalog_url), e)
                self._said_misfit = str(e)
            return
        self._said_misfit = None
        if self.cluster.map_version is None:
            if not self._said_empty:
                log.warning("catalog %s has no bucket map yet (run `shardkit rebalance init`); routing by "
                            "the config file's map until it has one",
                            mask_url(self.cluster.config.catalog_url))
                self._said_empty = True
        else:
            self._said_empty = False

    def _run(self) -> None:
        backoff = 0.2
        failed = False
        # This outage's causes said (at WARNING, or ERROR if unexpected), when the last
        # was, when it began.
        said: set[str] = set()
        said_at = failing_since = 0.0
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    if self._stop.is_set():
                        return  # stopped while connecting: the cluster may be disposed
                    conn.execute(f"LISTEN {MAP_CHANNEL}")
                    self.connected.set()
                    self._refresh()  # whatever changed while not listening
                    # (Only now: a catalog that connects but whose map cannot be read is
                    # retried with the same back-off as one that does not connect.)
                    backoff = 0.2
                    self.error = None
                    if failed:
                        log.info("catalog %s answers again (map version %s)",
                                 mask_url(self.cluster.config.catalog_url), self.cluster.map_version)
                        failed = False
                    last_poll = time.monotonic()
                    while not self._stop.is_set():
                        wait = 0.1
                        notified = False
                        for _ in conn.notifies(timeout=wait, stop_after=1):
                            notified = True
                        if self._stop.is_set():
                            return
                        if self._poke.is_set():
                            self._poke.clear()
                            notified = True
                        if notified or time.monotonic() - last_poll >= self.poll_interval:
                            self._refresh()
                            last_poll = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the follower must not die silently
                self.connected.clear()
                # Held while the failure is said (its config names the catalog); let go
                # of, with the error, before the wait: a cluster dropped meanwhile ends it.
                alive = self._cluster()
                if self._stop.is_set() or alive is None:  # (None: e is the property's ReferenceError)
                    return
                # Expected: the catalog is out or refuses (WARNING).  Anything else is
                # a bug or a catalog row it cannot read (ERROR, with the traceback).
                # Either is said once per outage and cause, not at every retry.
                expected = isinstance(e, (psycopg.Error, SQLAlchemyError, ShardUnavailable))
                now = time.monotonic()
                what = self._describe(e) if expected else self._unexpected(e)
                self.error = what
                if not failed:
                    failing_since, said = now, set()
                if what not in said or now - said_at >= _REPEAT_WARNING:
                    # Once per outage and cause (causes may take turns: the hosts of a
                    # multi-host URL), then a reminder a minute: retries come every few
                    # seconds for as long as the catalog is out.
                    took = f" (failing for {now - failing_since:.0f} s)" if failed else ""
                    msg = "%s; routing by %s meanwhile, retrying in %.1f s%s"
                    args = (what, self._using(), backoff, took)
                    if expected:
                        log.warning(msg, *args)
                    elif what in said:
                        log.error(msg, *args)
                    else:
                        self._log_traceback(e, msg, args)
                    said.add(what)
                    said_at = now
                else:
                    log.debug("%s; retrying in %.1f s", what, backoff)
                failed = True
                del alive
            if failed:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
