"""A node URL's own ``connect_timeout`` wins over shardkit's default of 3 s."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

import shardkit


def _connect_params(url: str) -> dict[str, Any]:
    cluster = shardkit.Cluster.from_config({
        "shards": [{"name": "s0", "primary": url}],
        "groups": {"users": {"tables": {"users": "id"}}},
    })
    try:
        engine = cluster.primary("s0")
        seen: dict[str, Any] = {}

        @event.listens_for(engine, "do_connect")
        def capture(dialect, conn_rec, cargs, cparams):  # no server: stop before connecting
            seen.update(cparams)
            raise RuntimeError("captured")

        with pytest.raises(Exception, match="captured"):
            engine.connect()
        return seen
    finally:
        cluster.dispose()


def test_default_connect_timeout_is_three_seconds():
    assert _connect_params("postgresql+psycopg://app@127.0.0.1:1/db")["connect_timeout"] == 3


def test_the_urls_connect_timeout_wins():
    params = _connect_params("postgresql+psycopg://app@127.0.0.1:1/db?connect_timeout=9")
    assert str(params["connect_timeout"]) == "9"
