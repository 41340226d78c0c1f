"""Keeping a process's bucket map in step with the catalog.

A :class:`MapFollower` thread LISTENs on the catalog's ``shardkit_map``
channel and reloads the map when a new version is announced, when a shard
refuses a write as not owned (:meth:`MapFollower.poke`), and every
``poll_interval`` seconds in case a notification was missed (a dropped
connection).  Reconnects with back-off when the catalog is unreachable; the
process keeps routing by the map it has meanwhile, which the shards' guards
make safe: a stale map can cost a refused write, never a misplaced one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy.exc import SQLAlchemyError

from ._config import conninfo, mask_url
from .catalog import MAP_CHANNEL
from .errors import ShardUnavailable

if TYPE_CHECKING:
    from ._cluster import Cluster

log = logging.getLogger("shardkit.catalog")


class MapFollower:
    def __init__(self, cluster: Cluster, *, poll_interval: float = 30.0) -> None:
        self.cluster = cluster
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardkit-map-follower", daemon=True)
        self.connected = threading.Event()
        # In a connection attempt, which nothing interrupts (psycopg's connect_timeout ends it).
        self._connecting = False
        # Said once that the catalog has no map yet (until it has one).
        self._said_empty = False

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
            return psycopg.connect(self._dsn(), autocommit=True, connect_timeout=3)
        finally:
            self._connecting = False

    def _refresh(self) -> None:
        self.cluster.refresh_map()
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
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    if self._stop.is_set():
                        return  # stopped while connecting: the cluster may be disposed
                    conn.execute(f"LISTEN {MAP_CHANNEL}")
                    self.connected.set()
                    backoff = 0.2
                    self._refresh()  # whatever changed while not listening
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
            except (psycopg.Error, SQLAlchemyError, ShardUnavailable) as e:
                self.connected.clear()
                if self._stop.is_set():
                    return
                failed = True
                log.warning("catalog %s: %s; retrying in %.1f s",
                            mask_url(self.cluster.config.catalog_url), str(e).strip().splitlines()[0]
                            if str(e).strip() else type(e).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # noqa: BLE001 - the follower must not die silently
                self.connected.clear()
                if self._stop.is_set():
                    return
                failed = True
                log.exception("map follower failed; restarting")
                self._stop.wait(1.0)
