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
from typing import TYPE_CHECKING

import psycopg
from sqlalchemy.exc import SQLAlchemyError

from ._config import conninfo, mask_url
from .catalog import MAP_CHANNEL

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

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        self._thread.join(timeout=5)

    def poke(self) -> None:
        """Reload the map soon (a shard said the map is stale)."""
        self._poke.set()

    def _dsn(self) -> str:
        url = self.cluster.config.catalog_url
        assert url is not None
        return conninfo(url)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn(), autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"LISTEN {MAP_CHANNEL}")
                    self.connected.set()
                    backoff = 0.2
                    self.cluster.refresh_map()  # whatever changed while not listening
                    last_poll = time.monotonic()
                    while not self._stop.is_set():
                        wait = 0.1
                        notified = False
                        for _ in conn.notifies(timeout=wait, stop_after=1):
                            notified = True
                        if self._poke.is_set():
                            self._poke.clear()
                            notified = True
                        if notified or time.monotonic() - last_poll >= self.poll_interval:
                            self.cluster.refresh_map()
                            last_poll = time.monotonic()
            except (psycopg.Error, SQLAlchemyError) as e:
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning("catalog %s: %s; retrying in %.1f s",
                            mask_url(self.cluster.config.catalog_url), str(e).strip().splitlines()[0]
                            if str(e).strip() else type(e).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # noqa: BLE001 - the follower must not die silently
                log.exception("map follower failed; restarting")
                self._stop.wait(1.0)
