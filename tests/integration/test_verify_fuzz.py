"""``shardkit verify`` against planted problems, a seeded fuzzer.

One module-scoped dev cluster (3 shards, no replicas, 16 buckets) with a catalog
(``rebalance init``: the ownership guard and the SQL functions installed), holding:
three hash groups (a bigint key with a colocated integer child whose key may be NULL;
a text key with a colocated char(n) child; a uuid key), a range group with a gap
(colocated integer child), a list group without a default (colocated char(n) child), a
composite-key range group (not movable, streamed) and a reference table; ~4,500 rows.

Each episode plants a random set of problems straight on the shards with psycopg,
past the guard (``SET shardkit.mover = on`` or ``session_replication_role =
replica``, at random): a row copied to a wrong shard, a row moved to one, a row's key
changed in place, a row deleted, a row with a NULL key (or NULL key part), a row whose
key no shard owns, a reference row changed or deleted on one shard, a bucket or slice
missing from or added to a shard's ``shardkit.owned_buckets`` (or a number no map knows),
a sharded table renamed away on one shard (missing); some episodes first
stop a real move part-way (its copies on the target, or its leftovers on the source).
The report of ``verify()`` (by the SQL hash or, every other episode, streamed through
Python) and of ``shardkit verify --json`` is compared with a report computed here from
every shard's rows, the catalog's live map and moves, and what was planted: every
table and shard's ``rows``, ``misplaced`` by owner, ``duplicates``,
``duplicates_checked``, ``in_flight`` and ``method``, the ``ownership`` problems, ``ok``
and the exit status.  The plantings are then undone (the shards' rows compared with
the state before), and verify must be clean again.

What verify does not promise is checked as not reported: a deleted row (verify cannot
know a row is missing; the ``missing`` it reports are buckets of the guard's ownership
table), and reference tables (verify reads the sharded tables only).
``SHARDKIT_VERIFY_FUZZ_EPISODES`` sets the number of episodes (default 16, times
``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py).
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from typing import Any

import inproc_cli
import psycopg
import pytest
from fuzz_size import fuzz_size
from sqlalchemy import text

import shardkit
import shardkit.verify as verify_mod
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps, plan_move_value
from shardkit._slices import SLICE_BASE
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration

SEED = 20241208
EPISODES = fuzz_size("SHARDKIT_VERIFY_FUZZ_EPISODES", 16)
BUCKETS = 16
NULL, NO_OWNER = "(null key)", "(no owner)"

SCHEMA = """
CREATE TABLE vf8_accounts (id bigint PRIMARY KEY, name text);
CREATE TABLE vf8_entries (id bigint PRIMARY KEY, account_id integer, amount int);
CREATE TABLE vf8_handles (handle text PRIMARY KEY, score int);
CREATE TABLE vf8_handle_badges (id bigint PRIMARY KEY, handle char(24));
CREATE TABLE vf8_devices (id uuid PRIMARY KEY, label text);
CREATE TABLE vf8_events (id bigint PRIMARY KEY, k bigint, note text);
CREATE TABLE vf8_event_notes (id bigint PRIMARY KEY, k integer);
CREATE TABLE vf8_regions (id bigint PRIMARY KEY, region text);
CREATE TABLE vf8_region_orders (id bigint PRIMARY KEY, region char(4), total int);
CREATE TABLE vf8_pairs (id bigint PRIMARY KEY, a bigint, b bigint);
CREATE TABLE vf8_countries (code text PRIMARY KEY, name text);
"""

# (gap [3000, 3100): no shard owns it)
EV_RANGES = [{"to": 1000, "shard": "s0"}, {"from": 1000, "to": 2000, "shard": "s1"},
             {"from": 2000, "to": 3000, "shard": "s2"}, {"from": 3100, "shard": "s0"}]
# composite range (not movable; gap [[20, 0], [30, 0]))
PAIR_RANGES = [((None, None), (5, 0), "s0"), ((5, 0), (10, 0), "s1"), ((10, 0), (20, 0), "s2"),
               ((30, 0), (None, None), "s0")]
GROUPS = {
    "reference_tables": ["vf8_countries"],
    "groups": {
        "accts": {"strategy": "hash", "tables": {"vf8_accounts": "id", "vf8_entries": "account_id"}},
        "handles": {"strategy": "hash", "tables": {"vf8_handles": "handle", "vf8_handle_badges": "handle"}},
        "devices": {"strategy": "hash", "tables": {"vf8_devices": "id"}},
        "ev": {"strategy": "range", "tables": {"vf8_events": "k", "vf8_event_notes": "k"},
               "ranges": EV_RANGES},
        "reg": {"strategy": "list", "tables": {"vf8_regions": "region", "vf8_region_orders": "region"},
                "values": {"s0": ["eu"], "s1": ["us", "ca"], "s2": ["ap"]}},
        "pairs": {"strategy": "range", "tables": {"vf8_pairs": ["a", "b"]},
                  "ranges": [{**({"from": list(lo)} if lo[0] is not None else {}),
                              **({"to": list(hi)} if hi[0] is not None else {}), "shard": s}
                             for lo, hi, s in PAIR_RANGES]},
    },
}

# table -> (group, key columns, primary key columns)
TABLES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "vf8_accounts": ("accts", ("id",), ("id",)),
    "vf8_entries": ("accts", ("account_id",), ("id",)),
    "vf8_handles": ("handles", ("handle",), ("handle",)),
    "vf8_handle_badges": ("handles", ("handle",), ("id",)),
    "vf8_devices": ("devices", ("id",), ("id",)),
    "vf8_events": ("ev", ("k",), ("id",)),
    "vf8_event_notes": ("ev", ("k",), ("id",)),
    "vf8_regions": ("reg", ("region",), ("id",)),
    "vf8_region_orders": ("reg", ("region",), ("id",)),
    "vf8_pairs": ("pairs", ("a", "b"), ("id",)),
}
HASHED = {"accts", "handles", "devices"}
#: char(n) key columns: PostgreSQL returns them padded, the key is without the blanks.
PADDED = {"vf8_handle_badges", "vf8_region_orders"}
REGIONS = ["eu", "us", "ca", "ap"]


# -- the oracle: where rows belong, computed here -------------------------------------------


class Truth:
    """The catalog's live state, read directly: the bucket map, the slices, the units of
    moves in flight per shard."""

    def __init__(self, cluster: shardkit.Cluster) -> None:
        with cluster.catalog.engine.connect() as c:
            live = cluster.catalog.current_map(c)
            self.version = live.version
            self.bucket_map = tuple(live.bucket_map)
            self.slices = list(live.slices)
            self.foreign: dict[str, set[int]] = {}
            for source, target, units, step in c.execute(text(
                    "SELECT b.source, b.target, b.buckets, b.step FROM shardkit_catalog.move_batches b "
                    "JOIN shardkit_catalog.moves m ON m.id = b.move_id WHERE (m.state = 'running' "
                    "AND b.step IN ('capturing', 'copied', 'switched', 'verified')) "
                    "OR b.step = 'leftovers'")):
                holder = target if step in ("capturing", "copied", "leftovers") else source
                self.foreign.setdefault(holder, set()).update(units)

    def slice_of(self, group: str, key: Any) -> Any:
        mine = [s for s in self.slices if s.group == group]
        for s in mine:
            if not s.default and s.contains(key):
                return s
        return next((s for s in mine if s.default), None)

    def unit(self, group: str, key: Any) -> int | None:
        if key is None or (isinstance(key, tuple) and None in key):
            return None
        if group in HASHED:
            return shardkit.bucket_for(key, BUCKETS)
        if group in ("ev", "reg"):
            s = self.slice_of(group, key)
            return None if s is None else s.id
        return None

    def owner(self, group: str, key: Any) -> str:
        if key is None or (isinstance(key, tuple) and None in key):
            return NULL
        if group in HASHED:
            return self.bucket_map[shardkit.bucket_for(key, BUCKETS)]
        if group in ("ev", "reg"):
            s = self.slice_of(group, key)
            return NO_OWNER if s is None else s.shard
        for lo, hi, shard in PAIR_RANGES:
            if (lo[0] is None or key >= lo) and (hi[0] is None or key < hi):
                return shard
        return NO_OWNER


class World:
    def __init__(self, dev: Any, cfg: Any, cluster: shardkit.Cluster) -> None:
        self.dev, self.cfg, self.cluster = dev, cfg, cluster
        self.shards = [s.name for s in dev.shards]
        self.dsn = {s.name: s.primary.dsn for s in dev.shards}

    def connect(self, shard: str, bypass: str | None = None) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn[shard], autocommit=True)
        if bypass == "mover":
            conn.execute("SET shardkit.mover = on")
        elif bypass == "replica":
            conn.execute("SET session_replication_role = replica")
        return conn

    def snapshot(self) -> dict[tuple[str, str], list[tuple]]:
        out = {}
        for shard in self.shards:
            with self.connect(shard) as c:
                for table in (*TABLES, "vf8_countries"):
                    if c.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                        out[(table, shard)] = None   # (renamed away by a planting)
                        continue
                    out[(table, shard)] = sorted(c.execute(f"SELECT * FROM {table}").fetchall(),
                                                 key=repr)
                out[("owned", shard)] = sorted(
                    r[0] for r in c.execute("SELECT bucket FROM shardkit.owned_buckets"))
        return out


def expected_report(world: World, truth: Truth, snap: dict, *, method_hash: str,
                    ownership: list[dict[str, Any]]) -> dict[str, Any]:
    """The report verify must give for the shards' rows ``snap``."""
    cols = {}
    for shard in world.shards:
        with world.connect(shard) as c:
            for table in TABLES:
                if snap[(table, shard)] is not None:
                    cols[table] = [d.name for d in c.execute(f"SELECT * FROM {table} LIMIT 0").description]
    pks: dict[tuple[str, str], set] = {}
    missing = []
    for (table, shard), rows in snap.items():
        if table in TABLES:
            if rows is None:
                pks[(table, shard)] = set()
                continue
            idx = [cols[table].index(p) for p in TABLES[table][2]]
            pks[(table, shard)] = {tuple(r[i] for i in idx) for r in rows}
    tables = []
    for group_name in GROUPS["groups"]:   # verify's order: groups, their tables, shards
        for table, (group, keys, pk) in TABLES.items():
            if group != group_name:
                continue
            kidx = [cols[table].index(k) for k in keys]
            pidx = [cols[table].index(p) for p in pk]
            for shard in world.shards:
                rows = snap[(table, shard)]
                if rows is None:
                    missing.append(f"{table} on {shard}")
                    continue
                misplaced: Counter[str] = Counter()
                dups = checked = in_flight = 0
                foreign = truth.foreign.get(shard, set())
                for r in rows:
                    key = r[kidx[0]] if len(kidx) == 1 else tuple(r[i] for i in kidx)
                    if table in PADDED and key is not None:
                        key = key.rstrip(" ")
                    if foreign and truth.unit(group, key) in foreign:
                        in_flight += 1
                        continue
                    owner = truth.owner(group, key)
                    if owner == shard:
                        continue
                    misplaced[owner] += 1
                    if owner not in (NULL, NO_OWNER) and snap[(table, owner)] is not None:
                        checked += 1
                        dups += tuple(r[i] for i in pidx) in pks[(table, owner)]
                tables.append({"table": table, "shard": shard, "rows": len(rows),
                               "misplaced": dict(misplaced), "duplicates": dups,
                               "duplicates_checked": checked, "in_flight": in_flight,
                               "method": method_hash if group in HASHED else "python"})
    ok = not ownership and not missing and all(not t["misplaced"] for t in tables)
    return {"ok": ok, "map_version": truth.version, "map_changed": False, "missing_tables": missing,
            "ownership": ownership, "tables": tables}


# -- the world ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(SCHEMA)
    cfg = tmp_path_factory.mktemp("verifyfuzz") / "shardkit.toml"
    dev.write_config(cfg, {**GROUPS, "catalog": {"url": dev.create_catalog()}})
    cluster = shardkit.Cluster.from_config(cfg)
    rebalance.init(cluster)
    w = World(dev, cfg, cluster)
    truth = Truth(cluster)
    rnd = random.Random(SEED)
    rows: dict[str, list[tuple[str, tuple]]] = {}   # table -> [(owner, row)]
    rows["vf8_accounts"] = [(truth.owner("accts", i), (i, f"a{i}")) for i in range(600)]
    rows["vf8_entries"] = [(truth.owner("accts", i % 600), (i, i % 600, i)) for i in range(1200)]
    rows["vf8_handles"] = [(truth.owner("handles", h), (h, i))
                           for i, h in enumerate(f"h{i}-{rnd.randrange(10**6)}" for i in range(300))]
    rows["vf8_handle_badges"] = [(s, (i, r[0])) for i, (s, r) in enumerate(rows["vf8_handles"] * 2)]
    rows["vf8_devices"] = [(truth.owner("devices", u), (u, "d"))
                           for u in (uuid.UUID(int=rnd.getrandbits(128)) for _ in range(200))]
    ks = [k for k in range(0, 4000, 6) if not 3000 <= k < 3100]
    rows["vf8_events"] = [(truth.owner("ev", k), (i, k, "n")) for i, k in enumerate(ks)]
    rows["vf8_event_notes"] = [(truth.owner("ev", k), (i, k)) for i, k in enumerate(ks[::2])]
    rows["vf8_regions"] = [(truth.owner("reg", REGIONS[i % 4]), (i, REGIONS[i % 4])) for i in range(400)]
    rows["vf8_region_orders"] = [(truth.owner("reg", REGIONS[i // 3 % 4]), (i, REGIONS[i // 3 % 4], i))
                                 for i in range(400)]
    pairs = [(a, b) for a in range(0, 40) for b in range(-3, 5) if not (20, 0) <= (a, b) < (30, 0)]
    rows["vf8_pairs"] = [(truth.owner("pairs", ab), (i, *ab)) for i, ab in enumerate(pairs)]
    for shard in w.shards:
        with w.connect(shard) as c:
            for table, owned in rows.items():
                mine = [r for s, r in owned if s == shard]
                if mine:
                    marks = ", ".join(["%s"] * len(mine[0]))
                    with c.cursor() as cur:
                        cur.executemany(f"INSERT INTO {table} VALUES ({marks})", mine)
            c.execute("INSERT INTO vf8_countries VALUES ('de', 'Germany'), ('fr', 'France'), "
                      "('jp', 'Japan')")
    total = sum(len(v) for v in rows.values())
    assert total > 3500
    yield w
    cluster.dispose()


def run_cli(world: World) -> tuple[int, dict[str, Any]]:
    r = inproc_cli.run(["verify", "--config", str(world.cfg), "--json"])
    return r.returncode, json.loads(r.stdout)


def check_verify(world: World, snap: dict, ownership: list[dict[str, Any]], *, python_hash: bool,
                 label: str) -> dict[str, Any]:
    """verify() and `shardkit verify --json` give the report computed here."""
    truth = Truth(world.cluster)
    want = expected_report(world, truth, snap, method_hash="python" if python_hash else "sql",
                           ownership=ownership)
    saved = verify_mod._sql_hash_installed
    if python_hash:
        verify_mod._sql_hash_installed = lambda conn: False
    try:
        got = verify(world.cluster).as_dict()
    finally:
        verify_mod._sql_hash_installed = saved
    _compare(got, want, f"{label} (verify(), {'python' if python_hash else 'sql'} hash)")
    code, cli = run_cli(world)
    by_sql = [{**t, "method": "sql" if t["table"] in _HASH_TABLES else t["method"]} for t in want["tables"]]
    _compare(cli, {**want, "tables": by_sql}, f"{label} (shardkit verify --json)")
    assert code == (0 if want["ok"] else 1), (label, code)
    return want


_HASH_TABLES = {t for t, (g, _, _) in TABLES.items() if g in HASHED}


def _compare(got: dict[str, Any], want: dict[str, Any], label: str) -> None:
    got, want = json.loads(json.dumps(got)), json.loads(json.dumps(want))
    def keyed(rep):
        return {(t["table"], t["shard"]): t for t in rep["tables"]}
    diffs = []
    g, w = keyed(got), keyed(want)
    for k in sorted(set(g) | set(w)):
        if g.get(k) != w.get(k):
            diffs.append(f"  {k}: got {g.get(k)} want {w.get(k)}")
    for field in ("ok", "map_version", "map_changed", "missing_tables", "ownership"):
        if got[field] != want[field]:
            diffs.append(f"  {field}: got {got[field]!r} want {want[field]!r}")
    assert not diffs, f"{label}: verify's report differs from the planted truth:\n" + "\n".join(diffs)


# -- planting ------------------------------------------------------------------------------------


class Planter:
    """Plants problems on the shards and records how to undo each."""

    turns: dict[str, int] = {}
    KINDS = ("copy", "copy2", "move", "rekey", "delete", "null", "no_owner", "ref",
             "own_missing", "own_extra", "table_missing")

    def __init__(self, world: World, rnd: random.Random, truth: Truth) -> None:
        self.w, self.rnd, self.truth = world, rnd, truth
        self.undo: list[tuple[str, str, tuple]] = []   # (shard, sql, params), run in reverse
        self.used: set[tuple[str, Any]] = set()
        self.kinds: Counter[str] = Counter()
        self.ownership: dict[str, dict[str, set[int]]] = {}
        self.next_id = 10_000_000
        self.renamed: set[tuple[str, str]] = set()

    def _exec(self, shard: str, sql: str, params: tuple, undo_sql: str, undo_params: tuple) -> None:
        with self.w.connect(shard, self.rnd.choice(["mover", "replica"])) as c:
            c.execute(sql, params)
        self.undo.append((shard, undo_sql, undo_params))

    def _row(self, table: str, *, unit: int | None = None) -> tuple[str, tuple, list[str]]:
        """A random row of ``table`` on its owner (not used yet this episode)."""
        group, keys, pk = TABLES[table]
        for _ in range(200):
            shard = self.rnd.choice(self.w.shards)
            with self.w.connect(shard) as c:
                cur = c.execute(f"SELECT * FROM {table} ORDER BY random() LIMIT 20")
                names = [d.name for d in cur.description]
                for r in cur.fetchall():
                    d = dict(zip(names, r))
                    key = d[keys[0]] if len(keys) == 1 else tuple(d[k] for k in keys)
                    if table in PADDED:
                        key = key.rstrip(" ")
                    pkv = tuple(d[p] for p in pk)
                    if (table, pkv) in self.used or self.truth.owner(group, key) != shard:
                        continue
                    if unit is not None and self.truth.unit(group, key) != unit:
                        continue
                    if unit is None and self.truth.unit(group, key) in self.truth.foreign.get(shard, ()):
                        continue
                    self.used.add((table, pkv))
                    return shard, r, names
        raise AssertionError(f"no row of {table} to plant with")

    def _holds(self, shard: str, table: str, pkv: Any) -> bool:
        with self.w.connect(shard) as c:
            return c.execute(f"SELECT count(*) FROM {table} WHERE {TABLES[table][2][0]} = %s",
                             (pkv,)).fetchone()[0] > 0

    def _insert(self, table: str, names: list[str]) -> str:
        return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"

    def _delete(self, table: str) -> str:
        return f"DELETE FROM {table} WHERE {TABLES[table][2][0]} = %s"

    def plant(self, kind: str, *, unit_row: tuple[str, int] | None = None) -> None:
        rnd, shards = self.rnd, self.w.shards
        table = rnd.choice(list(TABLES))
        group, keys, pk = TABLES[table]
        if kind in ("copy", "copy2", "move", "rekey", "delete"):
            if unit_row is not None:
                table, unit = unit_row
                group, keys, pk = TABLES[table]
            owner, row, names = self._row(table, unit=unit_row[1] if unit_row else None)
            pki = names.index(pk[0])
            others = [s for s in shards if s != owner and not self._holds(s, table, row[pki])]
            if kind in ("copy", "copy2", "move") and not others:
                kind = "delete"
            self.kinds[kind + ("_in_flight_unit" if unit_row else "")] += 1
            if kind in ("copy", "copy2"):
                for wrong in (others if kind == "copy2" else [rnd.choice(others)]):
                    self._exec(wrong, self._insert(table, names), row, self._delete(table), (row[pki],))
            elif kind == "move":
                wrong = rnd.choice(others)
                self._exec(owner, self._delete(table), (row[pki],), self._insert(table, names), row)
                self._exec(wrong, self._insert(table, names), row, self._delete(table), (row[pki],))
            elif kind == "delete":
                self._exec(owner, self._delete(table), (row[pki],), self._insert(table, names), row)
            else:   # rekey: the key changed in place to one another shard owns
                new = self._foreign_key(group, owner)
                sets = ", ".join(f"{k} = %s" for k in keys)
                old = tuple(row[names.index(k)] for k in keys)
                if keys[0] in pk:  # the key is the primary key
                    self._exec(owner, f"UPDATE {table} SET {sets} WHERE {pk[0]} = %s", (*new, row[pki]),
                               f"UPDATE {table} SET {sets} WHERE {pk[0]} = %s", (*old, new[0]))
                else:
                    self._exec(owner, f"UPDATE {table} SET {sets} WHERE {pk[0]} = %s", (*new, row[pki]),
                               f"UPDATE {table} SET {sets} WHERE {pk[0]} = %s", (*old, row[pki]))
        elif kind in ("null", "no_owner"):
            # Every table in turn (over the episodes), from a random start.
            eligible = list(TABLES) if kind == "null" else [
                "vf8_events", "vf8_event_notes", "vf8_regions", "vf8_region_orders", "vf8_pairs"]
            Planter.turns[kind] = Planter.turns.get(kind, rnd.randrange(len(eligible))) + 1
            table = eligible[Planter.turns[kind] % len(eligible)]
            group, keys, pk = TABLES[table]
            self.kinds[kind] += 1
            shard = rnd.choice(shards)
            self.next_id += 1
            with self.w.connect(shard) as c:
                names = [d.name for d in c.execute(f"SELECT * FROM {table} LIMIT 0").description]
            values: dict[str, Any] = {pk[0]: self.next_id}
            if kind == "null":
                if keys[0] in pk:  # the key is the primary key: NOT NULL
                    table, group, keys, pk = "vf8_entries", "accts", ("account_id",), ("id",)
                    names, values = ["id", "account_id", "amount"], {"id": self.next_id}
                if len(keys) == 2:   # one NULL part of a composite key
                    part = rnd.randrange(2)
                    values.update({keys[part]: None, keys[1 - part]: rnd.randrange(40)})
                else:
                    values[keys[0]] = None
            else:
                values.update({"vf8_events": {"k": 3000 + rnd.randrange(100)},
                               "vf8_event_notes": {"k": 3000 + rnd.randrange(100)},
                               "vf8_regions": {"region": "zz"}, "vf8_region_orders": {"region": "zz"},
                               "vf8_pairs": {"a": 20 + rnd.randrange(10), "b": rnd.randrange(5)}}[table])
            cols = list(values)
            self._exec(shard, self._insert(table, cols), tuple(values[c] for c in cols),
                       self._delete(table), (values[pk[0]],))
        elif kind == "table_missing":
            shard = rnd.choice(shards)
            if (table, shard) in self.renamed:
                return
            self.kinds[kind] += 1
            self.renamed.add((table, shard))
            self._exec(shard, f"ALTER TABLE {table} RENAME TO {table}_gone", (),
                       f"ALTER TABLE {table}_gone RENAME TO {table}", ())
        elif kind == "ref":
            self.kinds[kind] += 1
            shard = rnd.choice(shards)
            code = rnd.choice(["de", "fr", "jp"])
            with self.w.connect(shard) as c:
                name = c.execute("SELECT name FROM vf8_countries WHERE code = %s", (code,)).fetchone()
            if name is None:   # already deleted this episode
                return
            if rnd.random() < 0.5:
                self._exec(shard, "DELETE FROM vf8_countries WHERE code = %s", (code,),
                           "INSERT INTO vf8_countries VALUES (%s, %s)", (code, name[0]))
            else:
                self._exec(shard, "UPDATE vf8_countries SET name = 'changed' WHERE code = %s", (code,),
                           "UPDATE vf8_countries SET name = %s WHERE code = %s", (name[0], code))
        elif kind in ("own_missing", "own_extra"):
            self.kinds[kind] += 1
            units = [(b, s) for b, s in enumerate(self.truth.bucket_map)] + \
                [(sl.id, sl.shard) for sl in self.truth.slices]
            unit, owner = rnd.choice(units)
            if kind == "own_extra" and rnd.random() < 0.2:
                unit, owner = BUCKETS + rnd.randrange(3), None   # a number no map knows
            state = {s: self.ownership.setdefault(s, {"missing": set(), "extra": set()}) for s in shards}
            if kind == "own_missing":
                if unit in state[owner]["missing"]:
                    return
                state[owner]["missing"].add(unit)
                self._exec(owner, "DELETE FROM shardkit.owned_buckets WHERE bucket = %s", (unit,),
                           "INSERT INTO shardkit.owned_buckets VALUES (%s)", (unit,))
            else:
                wrong = rnd.choice([s for s in shards if s != owner])
                if unit in state[wrong]["extra"]:
                    return
                state[wrong]["extra"].add(unit)
                self._exec(wrong, "INSERT INTO shardkit.owned_buckets VALUES (%s)", (unit,),
                           "DELETE FROM shardkit.owned_buckets WHERE bucket = %s", (unit,))
        else:
            raise AssertionError(kind)

    def _foreign_key(self, group: str, owner: str) -> tuple:
        """A key of ``group`` that a shard other than ``owner`` owns (not in flight)."""
        for _ in range(1000):
            key = {"accts": lambda: self.rnd.randrange(600),
                   "handles": lambda: f"rekeyed-{self.rnd.randrange(10**9)}",
                   "devices": lambda: uuid.UUID(int=self.rnd.getrandbits(128)),
                   "ev": lambda: self.rnd.randrange(4000),
                   "reg": lambda: self.rnd.choice(REGIONS),
                   "pairs": lambda: (self.rnd.randrange(40), self.rnd.randrange(5))}[group]()
            o, u = self.truth.owner(group, key), self.truth.unit(group, key)
            if o not in (owner, NULL, NO_OWNER) and not any(u in f for f in self.truth.foreign.values()):
                return key if isinstance(key, tuple) else (key,)
        raise AssertionError(group)

    def expected_ownership(self) -> list[dict[str, Any]]:
        out = []
        named = {sl.id: sl.describe() for sl in self.truth.slices}
        for shard in self.w.shards:
            st = self.ownership.get(shard)
            if not st or not (st["missing"] or st["extra"]):
                continue
            both = st["missing"] | st["extra"]
            entry: dict[str, Any] = {"shard": shard, "missing": sorted(st["missing"]),
                                     "extra": sorted(st["extra"])}
            sl = {i: named[i] for i in sorted(both) if i >= SLICE_BASE}
            if sl:
                entry["slices"] = sl
            out.append(entry)
        return out

    def revert(self) -> None:
        for shard, sql, params in reversed(self.undo):
            with self.w.connect(shard, "mover") as c:
                c.execute(sql, params)
        self.undo.clear()
        self.ownership.clear()


# -- moves stopped part-way -----------------------------------------------------------------------


class _Stop(Exception):
    pass


class StopAfter(rebalance.Mover):
    def __init__(self, cluster, step):
        super().__init__(cluster, grace=0, progress=lambda line: None)
        self.stop_step = step

    def _record(self, move_id, batch, step, detail=None):
        super()._record(move_id, batch, step, detail)
        if step == self.stop_step:
            raise _Stop(step)


def _stopped_move(world: World, plan: Any, step: str) -> int:
    mover = StopAfter(world.cluster, step)
    move_id = mover.start(plan)
    with pytest.raises((_Stop, RebalanceError)):
        mover.run(move_id)
    assert rebalance.move_status(world.cluster, move_id)[0]["batches"][0]["step"] == step
    return move_id


def _in_flight_setup(world: World, rnd: random.Random, kind: str) -> tuple[Any, tuple[str, int]]:
    """Stop a real move part-way; return how to finish it, and a (table, unit) of its rows."""
    truth = Truth(world.cluster)
    if kind in ("hash_copied", "hash_verified"):
        bucket = rnd.randrange(BUCKETS)
        source = truth.bucket_map[bucket]
        target = rnd.choice([s for s in world.shards if s != source])
        new = list(truth.bucket_map)
        new[bucket] = target
        plan = plan_from_maps(truth.bucket_map, tuple(new), "verify fuzz")
        step = "copied" if kind == "hash_copied" else "verified"  # (switched: the source keeps leftovers)
        move_id = _stopped_move(world, plan, step)
        if step == "copied":
            def finish() -> None:
                rebalance.abort(world.cluster, move_id)
        else:
            def finish() -> None:
                rebalance.Mover(world.cluster, grace=0, progress=lambda line: None).run(move_id)
        return finish, (rnd.choice(["vf8_accounts", "vf8_entries"]), bucket)
    # a list value's slice, copied to another shard
    value = rnd.choice(["eu", "ap"])
    sl = truth.slice_of("reg", value)
    target = rnd.choice([s for s in world.shards if s != sl.shard])
    move_id = _stopped_move(world, plan_move_value(truth.slices, "reg", value, target), "copied")

    def finish() -> None:
        rebalance.abort(world.cluster, move_id)
    return finish, (rnd.choice(["vf8_regions", "vf8_region_orders"]), sl.id)


# -- the fuzzer ------------------------------------------------------------------------------------


def test_verify_reports_exactly_what_was_planted(world):
    rnd = random.Random(SEED)
    world.cluster.refresh_map()
    base = world.snapshot()
    check_verify(world, base, [], python_hash=False, label="the clean world")
    planted: Counter[str] = Counter()
    in_flight_kinds = {3: "hash_copied", 8: "list_copied", 13: "hash_verified", 21: "list_copied",
                       26: "hash_copied"}
    for episode in range(EPISODES):
        finish = unit_row = None
        if episode in in_flight_kinds:
            finish, unit_row = _in_flight_setup(world, rnd, in_flight_kinds[episode])
            planted["in_flight_move_" + in_flight_kinds[episode]] += 1
            world.cluster.refresh_map()
            moving = world.snapshot()
            check_verify(world, moving, [], python_hash=bool(episode % 2),
                         label=f"episode {episode}: a move stopped part-way, nothing planted")
        truth = Truth(world.cluster)
        p = Planter(world, rnd, truth)
        kinds = [rnd.choice(Planter.KINDS) for _ in range(rnd.randint(1, 7))]
        for kind in sorted(kinds, key=lambda k: k == "table_missing"):   # (renames last)
            if kind == "table_missing" and unit_row is not None:
                # Rows of the moving unit: a copy on the third shard (misplaced), one moved there.
                p.plant(rnd.choice(["copy", "copy2", "move", "delete"]), unit_row=unit_row)
                unit_row = None
            p.plant(kind)
        if unit_row is not None:
            p.plant(rnd.choice(["copy", "copy2", "move", "delete"]), unit_row=unit_row)
        planted.update(p.kinds)
        snap = world.snapshot()
        label = f"episode {episode}: planted {dict(p.kinds)}"
        want = check_verify(world, snap, p.expected_ownership(), python_hash=bool(episode % 2), label=label)
        dirty = set(p.kinds) - {"delete", "ref", "delete_in_flight_unit"}
        assert want["ok"] == (not dirty), (label, want["ok"])
        p.revert()
        if finish is not None:
            finish()
            world.cluster.refresh_map()
        after = world.snapshot()
        if finish is None:
            assert after == base, f"{label}: the undo did not restore the shards"
        base = after
        check_verify(world, after, [], python_hash=not episode % 2, label=f"{label}, undone")
    print(f"verify fuzz: {EPISODES} episodes, planted {dict(sorted(planted.items()))}")
    assert all(planted[k] for k in Planter.KINDS), planted


# -- regressions -----------------------------------------------------------------------------------


def test_a_misplaced_row_whose_owner_lacks_the_table_is_reported(world):
    """A row on a wrong shard whose owner lacks the table (dropped, renamed, a shard not
    migrated yet): verify reports the missing table and the misplaced row (exit 1)."""
    truth = Truth(world.cluster)
    key = next(k for k in range(600) if truth.owner("accts", k) == "s0")
    p = Planter(world, random.Random(1), truth)
    p._exec("s1", "INSERT INTO vf8_accounts VALUES (%s, 'stray')", (key,),
            "DELETE FROM vf8_accounts WHERE id = %s", (key,))
    p._exec("s0", "ALTER TABLE vf8_accounts RENAME TO vf8_accounts_gone", (),
            "ALTER TABLE vf8_accounts_gone RENAME TO vf8_accounts", ())
    try:
        want = check_verify(world, world.snapshot(), [], python_hash=False, label="owner lacks the table")
        assert not want["ok"] and want["missing_tables"] == ["vf8_accounts on s0"]
        stray = next(t for t in want["tables"] if (t["table"], t["shard"]) == ("vf8_accounts", "s1"))
        assert stray["misplaced"] == {"s0": 1} and stray["duplicates_checked"] == 0, stray
        lines = verify(world.cluster).render().splitlines()
        assert "missing: vf8_accounts on s0" in lines, lines
        line = next(ln for ln in lines if ln.startswith("s1") and " vf8_accounts " in ln)
        assert "1 misplaced (1 belongs on s0), not looked for on their owner" in line, line
    finally:
        p.revert()
    check_verify(world, world.snapshot(), [], python_hash=False, label="undone")
