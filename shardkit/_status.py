"""``shardkit status``: shards and nodes at a glance (role, up, lag, connections, rows, buckets)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import text

from ._cluster import Cluster


def config_version(source: str | os.PathLike[str]) -> str:
    """A short fingerprint of the config file, to spot processes running different configs."""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:12]


def collect(cluster: Cluster, config_source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Everything ``shardkit status`` shows, as plain data."""
    health = cluster.health()
    tables = sorted({t for g in cluster.config.groups for t in g.tables} | set(cluster.config.reference_tables))
    buckets = Counter(cluster.config.bucket_map)
    rows: dict[str, dict[str, int | None]] = {}
    connections: dict[str, int | None] = {}
    for n in health.nodes:
        shard, role = n["shard"], n["role"]
        if not n["up"]:
            connections[n["node"]] = None
            continue
        index = 0 if role == "primary" else int(n["node"].rsplit("/r", 1)[1])
        try:
            with cluster.engine(shard, role, index).connect() as c:
                connections[n["node"]] = c.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )).scalar_one()
                if role == "primary":
                    # to_regclass resolves each name (quoted: as SQLAlchemy writes it) as the application's queries do.
                    est = dict(c.execute(text(
                        "SELECT t.name, c.reltuples::bigint FROM unnest(CAST(:t AS text[])) AS t(name) "
                        "JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.name))"), {"t": tables}).all())
                    # reltuples is -1 until the table is first vacuumed or analysed.
                    rows[shard] = {t: (None if est.get(t, -1) < 0 else est[t]) for t in tables}
        except Exception:  # noqa: BLE001 - the node's row shows it as it is
            connections[n["node"]] = None
    shards = []
    for name in cluster.shard_names:
        shards.append({
            "shard": name,
            "buckets": buckets.get(name, 0),
            "rows_estimate": rows.get(name),
            "nodes": [dict(n, connections=connections.get(n["node"]))
                      for n in health.nodes if n["shard"] == name],
        })
    return {
        "cluster": cluster.config.name,
        "config_version": config_version(config_source) if config_source else None,
        "bucket_count": cluster.config.bucket_count,
        "ready": health.ready,
        "shards": shards,
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        f"cluster {data['cluster']}  config {data['config_version'] or '-'}  "
        f"buckets {data['bucket_count']}  ready: {'yes' if data['ready'] else 'NO'}",
        "",
        f"{'shard':<8} {'node':<12} {'role':<8} {'up':<5} {'lag':>18} {'conns':>6} "
        f"{'buckets':>8} {'rows (est.)':>12}",
    ]
    for s in data["shards"]:
        rows = s["rows_estimate"]
        total = None if rows is None or any(v is None for v in rows.values()) else sum(rows.values())
        for i, n in enumerate(s["nodes"]):
            if n["role"] == "primary":
                lag = "-"
            elif n["lag_bytes"] is None:
                lag = "unknown"
            elif n["lag_seconds"] is None:
                lag = f"? s / {n['lag_bytes']} B"
            else:
                lag = f"{n['lag_seconds']:.1f} s / {n['lag_bytes']} B"
            if n.get("ban_reason"):
                lag += " (banned)"
            lines.append(
                f"{s['shard'] if i == 0 else '':<8} {n['node']:<12} {n['role']:<8} "
                f"{'yes' if n['up'] else 'NO':<5} {lag:>18} "
                f"{'-' if n['connections'] is None else n['connections']:>6} "
                f"{s['buckets'] if i == 0 else '':>8} "
                f"{('-' if total is None else total) if i == 0 else '':>12}"
            )
            if not n["up"] and n.get("error"):
                lines.append(f"{'':<8} {'':<12} error: {n['error']}")
    return "\n".join(lines)
