"""``shardkit status``: shards and nodes at a glance (role, up, lag, connections, rows, buckets)."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import text

from ._cluster import Cluster
from ._guard import CONFIGURED_TABLES, configured_tables


# A table's row estimate: its reltuples, or a partitioned table's, the sum of its leaf
# partitions' (those analysed; -1 if none is).  A partitioned table holds no rows itself:
# autovacuum never analyses it, so its own reltuples stays -1, or frozen at the last ANALYZE
# that named it.
_ESTIMATE = ("CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pc.reltuples) FILTER "
             "(WHERE pc.reltuples >= 0), -1) FROM pg_partition_tree(c.oid) pt "
             "JOIN pg_class pc ON pc.oid = pt.relid WHERE pt.isleaf) ELSE c.reltuples END::bigint")


# The passwords a config file may hold: a URL's (``user:PASSWORD@``, a ``${VAR:-default}``
# there included; not past the next URL's ``://``: ``host:port/db`` of one without a
# password before it) and its query string's (``?password=``, ``&sslpassword=``).
_FILE_SECRETS = re.compile(r"(?P<user>://[^\s:/@\"'?#]*:)(?:(?!://)[^\s@])*(?=@)"
                           r"|(?P<key>[?&](?:ssl)?password=)[^\s&]*", re.IGNORECASE)
# Inside a TOML string (where every URL of a config is), a password ends where the string
# does, blanks included ("app:my secret@", "?password=my secret"): masked up to the '@' or
# '&' there, never past the string (the next URL of an inline array, a comment).
_TOML_STRING = re.compile(r'"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\r\n])*"|\'[^\'\r\n]*\'', re.S)
_STRING_SECRETS = re.compile(r"(?P<user>://[^\s:/@\"'?#]*:)[^@]*(?=@)"
                             r"|(?P<key>[?&](?:ssl)?password=)[^&]*", re.IGNORECASE)


def _mask_secrets(text_: str) -> str:
    """``text_`` (a config file) with its passwords as ``***``: in each string by
    _STRING_SECRETS, elsewhere (a URL in a comment) by _FILE_SECRETS."""
    def mask(pattern: re.Pattern[str], part: str) -> str:
        return pattern.sub(lambda m: (m.group("user") or m.group("key")) + "***", part)

    out, at = [], 0
    for m in _TOML_STRING.finditer(text_):
        quote = 3 if m.group().startswith(('"""', "'''")) else 1
        out += [mask(_FILE_SECRETS, text_[at:m.start()]), m.group()[:quote],
                mask(_STRING_SECRETS, m.group()[quote:-quote]), m.group()[-quote:]]
        at = m.end()
    return "".join(out) + mask(_FILE_SECRETS, text_[at:])


def config_version(source: str | os.PathLike[str]) -> str:
    """A short fingerprint of the config file, to spot processes running different configs.

    Its passwords are left out: a hash of the file's bytes, shown by ``status`` (in output
    that is pasted and logged), confirmed any guess of a password written in it."""
    data = Path(source).read_bytes()
    try:
        text_ = data.decode("utf-8")
    except UnicodeDecodeError:  # (not a config load_config reads)
        return hashlib.sha256(data).hexdigest()[:12]
    return hashlib.sha256(_mask_secrets(text_).encode("utf-8")).hexdigest()[:12]


def collect(cluster: Cluster, config_source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Everything ``shardkit status`` shows, as plain data."""
    health = cluster.health()
    tables = sorted({t for g in cluster.config.groups for t in g.tables} | set(cluster.config.reference_tables))
    buckets = Counter(cluster.config.bucket_map)
    rows: dict[str, dict[str, int | None]] = {}
    unknown: dict[str, dict[str, str]] = {}
    connections: dict[str, int | None] = {}
    mon = cluster._monitor
    for n in health.nodes:
        shard, role = n["shard"], n["role"]
        index = 0 if role == "primary" else int(n["node"].rsplit("/r", 1)[1])
        # A primary whose poll is late is up (its writes wait for the answer), but a
        # query to it (on a pooled connection to a stopped server) could wait for ever.
        node = None if mon is None else (
            mon.shards[shard].primary if role == "primary" else mon.shards[shard].replicas[index])
        if not n["up"] or (node is not None and not mon.answers(node)):
            connections[n["node"]] = None
            continue
        try:
            with cluster.engine(shard, role, index).connect() as c:
                connections[n["node"]] = c.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )).scalar_one()
                if role == "primary":
                    # to_regclass resolves each name (quoted: as SQLAlchemy writes it, schema
                    # included) as the application's queries do.
                    est = dict(c.execute(text(f"SELECT n.tbl, {_ESTIMATE} FROM {CONFIGURED_TABLES}"),
                                         configured_tables(tables)).all())
                    # reltuples is -1 until the table is first vacuumed or analysed.
                    rows[shard] = {t: (None if est.get(t, -1) < 0 else est[t]) for t in tables}
                    unknown[shard] = {t: ("never analysed" if t in est else "no such table")
                                      for t in tables if rows[shard][t] is None}
        except Exception:  # noqa: BLE001 - the node's row shows it as it is
            connections[n["node"]] = None
    shards = []
    for name in cluster.shard_names:
        shards.append({
            "shard": name,
            "buckets": buckets.get(name, 0),
            # Per table (None: unknown); the sum of the known ones, partial when some tables
            # are unknown (listed, with why) rather than no sum at all.  All None: the primary
            # could not be read.
            "rows_estimate": rows.get(name),
            "rows_estimate_total": _known_total(rows.get(name)),
            "rows_estimate_partial": None if name not in unknown else bool(unknown[name]),
            "rows_estimate_unknown": unknown.get(name),
            "nodes": [dict(n, connections=connections.get(n["node"]))
                      for n in health.nodes if n["shard"] == name],
        })
    return {
        "cluster": cluster.config.name,
        "config_version": config_version(config_source) if config_source else None,
        "bucket_count": cluster.config.bucket_count,
        # The map the bucket counts come from: the catalog's version, or None (the config
        # file's: no catalog, it has no map yet, or it could not be read: catalog_error).
        # With a version, catalog_error says why a process no longer follows the catalog.
        "map_version": cluster.map_version,
        "catalog_error": health.catalog["error"] if health.catalog else None,
        "ready": health.ready,
        "shards": shards,
    }


def _known_total(rows: dict[str, int | None] | None) -> int | None:
    """The sum of the known estimates; None when the primary could not say or no table is known."""
    if rows is None:
        return None
    known = [v for v in rows.values() if v is not None]
    return sum(known) if known or not rows else None


def render(data: dict[str, Any]) -> str:
    # A config given as a dict (the demo's tour, an application) has no file to fingerprint.
    config = f"  config {data['config_version']}" if data["config_version"] else ""
    version = data.get("map_version")
    lines = [
        f"cluster {data['cluster']}{config}  "
        f"buckets {data['bucket_count']}  map {'of the config file' if version is None else f'v{version}'}  "
        f"ready: {'yes' if data['ready'] else 'NO'}",
    ]
    if data.get("catalog_error"):
        counts = "the config file's map's" if version is None else f"map v{version}'s, the last read"
        lines.append(f"catalog: {data['catalog_error']}; the bucket counts are {counts}")
    lines += [
        "",
        f"{'shard':<8} {'node':<12} {'role':<8} {'up':<5} {'lag':>18} {'conns':>6} "
        f"{'buckets':>8} {'rows (est.)':>12}",
    ]
    notes = []
    for s in data["shards"]:
        total, unknown = s["rows_estimate_total"], s["rows_estimate_unknown"]
        if s["rows_estimate"] is None:
            shown = "-"
        elif total is None:
            shown = "?"
        else:
            shown = f"{total}+" if unknown else str(total)
        if unknown:
            notes.append(f"{s['shard']}: " + ", ".join(f"{t} ({why})" for t, why in unknown.items()))
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
                f"{shown if i == 0 else '':>12}"
            )
            if n.get("error"):   # down, or up but unusable (a replica not following its primary)
                lines.append(f"{'':<8} {'':<12} error: {n['error']}")
            if n.get("read_only"):
                lines.append(f"{'':<8} {'':<12} read-only: its transactions are read-only, it refuses writes")
    if notes:
        lines += ["", "rows (est.): N+ sums only the tables with an estimate, ? means none has one; "
                      "without an estimate (ANALYZE gives a table one):"]
        lines += [f"  {note}" for note in notes]
    return "\n".join(lines)
