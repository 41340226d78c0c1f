"""Operator-facing checks: migrate, pools, status, metrics and config errors.

One 3-shard x 1-replica cluster for the module.  Every URL carries a password
(the dev servers trust local connections, so it is ignored by the server) and
no output may ever show it.  Migration state is shared between tests, so each
test first brings the shards to the revision it needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import inproc_cli
import pytest
import sqlalchemy.exc
from sqlalchemy import text

import shardkit
from shardkit import cli, migrate
from shardkit.devcluster import to_toml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PW = "Pw-edge-7q9Zk"          # must never appear in any output

# -- migration scripts -------------------------------------------------------------------

A1 = '''"""a1: items (sharded), plans (reference table), shardkit SQL."""
import fcntl
import json
import os
import time

from alembic import op
import sqlalchemy as sa

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def _bump(path, delta):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        state = json.loads(f.read() or '{"now": 0, "max": 0, "runs": 0}')
        state["now"] += delta
        state["max"] = max(state["max"], state["now"])
        state["runs"] += delta > 0
        f.seek(0)
        f.truncate()
        f.write(json.dumps(state))


def upgrade():
    probe = os.environ.get("SKT_EDGE_PROBE")
    if probe:   # how many shards are inside a migration at once
        _bump(probe, 1)
        time.sleep(1.0)
        _bump(probe, -1)
    op.create_table("items", sa.Column("id", sa.BigInteger, primary_key=True),
                    sa.Column("name", sa.String(50)))
    plans = op.create_table("plans", sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("name", sa.Text))
    op.bulk_insert(plans, [{"id": 1, "name": "free"}, {"id": 2, "name": "pro"}])
    op.install_shardkit_sql()


def downgrade():
    op.uninstall_shardkit_sql()
    op.drop_table("plans")
    op.drop_table("items")
'''

A2 = '''"""a2: a column, and a row in the reference table."""
from alembic import op
import sqlalchemy as sa

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("items", sa.Column("color", sa.String(20)))
    op.execute("INSERT INTO plans (id, name) VALUES (3, 'team')")


def downgrade():
    op.execute("DELETE FROM plans WHERE id = 3")
    op.drop_column("items", "color")
'''

A3 = '''"""a3: another table (refused on a shard holding the tripwire table)."""
from alembic import op
import sqlalchemy as sa

revision = "a3"
down_revision = "a2"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("DO $$ BEGIN IF to_regclass('public.a3_tripwire') IS NOT NULL THEN "
               "RAISE EXCEPTION 'a3 tripwire on this shard'; END IF; END $$")
    op.create_table("gizmos", sa.Column("id", sa.BigInteger, primary_key=True))


def downgrade():
    op.drop_table("gizmos")
'''


def secret(url: str) -> str:
    """The dev node's URL with a password (ignored by the trusting server)."""
    return url.replace("://shardkit@", f"://shardkit:{PW}@", 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_data(dev, **extra):
    data = {
        "name": "edges",
        "bucket_count": dev.bucket_count,
        "shards": [{"name": s.name, "primary": secret(s.primary.url),
                    "replicas": [secret(r.url) for r in s.replicas]} for s in dev.shards],
        "groups": {"items": {"tables": {"items": "id"}}},
        "reference_tables": ["plans"],
    }
    data.update(extra)
    return data


def write_config(path: Path, data) -> Path:
    path.write_text(to_toml(data), encoding="utf-8")
    return path


class Env:
    def __init__(self, dev, work: Path, cfg: Path, ini: Path, cluster: shardkit.Cluster):
        self.dev, self.work, self.cfg, self.ini, self.cluster = dev, work, cfg, ini, cluster

    def cli(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The command in this process (``inproc_cli``); with ``env``, as ``python -m shardkit.cli``
        with those variables set."""
        return inproc_cli.shardkit(args, env=env, timeout=timeout)

    def migrate(self, *args: str, config: Path | None = None, env: dict | None = None):
        return self.cli("migrate", *args, "--config", str(config or self.cfg),
                        "--alembic-ini", str(self.ini), env=env)

    def current(self) -> dict:
        return migrate.current(self.cluster)

    def ensure(self, rev: str | None) -> None:
        """Bring every shard to ``rev`` (None: base)."""
        order = [None, "a1", "a2", "a3"]
        now = self.current()
        up = [s for s, v in now.items() if order.index(v) < order.index(rev)]
        down = [s for s, v in now.items() if order.index(v) > order.index(rev)]
        if up:
            migrate.run_command(self.cluster, str(self.cfg), "upgrade", rev, alembic_ini=self.ini, shards=up)
        if down:
            migrate.run_command(self.cluster, str(self.cfg), "downgrade", rev or "base",
                                alembic_ini=self.ini, shards=down)
        assert all(v == rev for v in self.current().values()), self.current()

    def sql(self, shard: str, statement: str):
        with self.cluster.primary(shard).begin() as c:
            return c.execute(text(statement))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=1)
    work = tmp_path_factory.mktemp("edges")
    mig = work / "migrations"
    mig.mkdir()
    (mig / "versions").mkdir()
    for name in ("alembic.ini", "env.py", "script.py.mako"):
        (mig / name).write_bytes((ROOT / "migrations" / name).read_bytes())
    for rev, body in (("a1", A1), ("a2", A2), ("a3", A3)):
        (mig / "versions" / f"{rev}.py").write_text(body)
    cfg = write_config(work / "shardkit.toml", config_data(dev))
    cluster = shardkit.Cluster.from_config(cfg)
    e = Env(dev, work, cfg, mig / "alembic.ini", cluster)
    yield e
    cluster.dispose()


def no_secret(*outputs: str) -> None:
    for out in outputs:
        assert PW not in out, out


# -- migrate ------------------------------------------------------------------------------


def test_parallel_bound_holds_and_reference_table_migrations_run_on_every_shard(env, tmp_path, monkeypatch):
    """`--parallel 2` never has more than two shards inside a migration at once; a
    migration writing a reference table's rows runs on every shard."""
    env.ensure(None)
    probe = tmp_path / "probe.json"
    monkeypatch.setenv("SKT_EDGE_PROBE", str(probe))   # (for the shards' Alembic processes)
    r = env.migrate("upgrade", "a2", "--parallel", "2", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    state = json.loads(probe.read_text())
    assert state["runs"] == 3 and state["now"] == 0, state
    assert state["max"] <= 2, f"{state['max']} shards migrated at once with --parallel 2"
    out = json.loads(r.stdout)
    assert {(s["shard"], s["revision_before"], s["revision_after"]) for s in out["shards"]} == \
        {("s0", None, "a2"), ("s1", None, "a2"), ("s2", None, "a2")}
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            assert c.execute(text("SELECT array_agg(name ORDER BY id) FROM plans")).scalar() == \
                ["free", "pro", "team"], s
    no_secret(r.stdout, r.stderr)


def test_bad_revision_and_unknown_canary_give_clear_errors(env):
    """An unknown revision fails with a message naming it (no traceback) and moves no
    shard; an unknown --canary shard is refused up front, listing the shards."""
    env.ensure("a2")   # (where the test above leaves every shard, as the stopped-primary tests want)
    r = env.migrate("upgrade", "nosuchrev")
    assert r.returncode in (1, 2), r.stdout + r.stderr
    assert "nosuchrev" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert env.current() == {"s0": "a2", "s1": "a2", "s2": "a2"}
    r = env.migrate("upgrade", "head", "--canary", "s9")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and "'s9'" in r.stderr and "s0, s1, s2" in r.stderr
    assert env.current() == {"s0": "a2", "s1": "a2", "s2": "a2"}
    no_secret(r.stdout, r.stderr)


# -- a stopped primary: status and migrate ---------------------------------------------------


@pytest.fixture(scope="module")
def primary_down(env):
    """Run the operator commands once while s2's primary is stopped; restart it."""
    env.ensure("a2")
    node = env.dev.shards[2].primary
    node.stop()
    try:
        cmds = {
            "status_json": ["status", "--config", str(env.cfg), "--json"],
            "status_text": ["-v", "status", "--config", str(env.cfg)],
            "current": ["migrate", "current", "--config", str(env.cfg)],
            "check": ["migrate", "check", "--config", str(env.cfg), "--alembic-ini", str(env.ini)],
            "upgrade": ["migrate", "upgrade", "head", "--config", str(env.cfg),
                        "--alembic-ini", str(env.ini)],
        }
        # In this process (inproc_cli), but at -v as a process of its own: the test
        # process's other threads log too, which the command's process would not print.
        out = {}
        for k, v in cmds.items():
            r = inproc_cli.shardkit(v, proc="-v" in v, timeout=120)
            out[k] = (r.returncode, r.stdout, r.stderr)
    finally:
        node.start()
        env.cluster.dispose()   # its pooled connections to s2 died with the server
    return out


def test_status_with_a_stopped_primary(primary_down):
    """`status` exits 1 when a primary is down, shows it down with its error (and its
    replica up), and never prints a password, even at -v."""
    code, o, e = primary_down["status_json"]
    assert code == 1, o + e
    data = json.loads(o)
    assert data["ready"] is False
    nodes = {n["node"]: n for s in data["shards"] for n in s["nodes"]}
    assert nodes["s2/primary"]["up"] is False and nodes["s2/primary"]["error"]
    assert nodes["s2/r0"]["up"] is True and nodes["s0/primary"]["up"] is True
    assert {s["shard"]: s["rows_estimate"] for s in data["shards"]}["s2"] is None
    code_t, ot, et = primary_down["status_text"]
    assert code_t == 1 and "ready: NO" in ot
    assert re.search(r"s2/primary\s+primary\s+NO\b", ot), ot
    no_secret(o, e, ot, et)


@pytest.mark.parametrize("verb", ["current", "check", "upgrade"])
def test_migrate_with_a_stopped_primary_is_one_clear_error(primary_down, verb):
    """`migrate current|check|upgrade` with a shard's primary down print one line
    naming the unreachable shard (no traceback, no password) and exit non-zero (2 for
    an error, or 1 for a migration failure)."""
    code, o, e = primary_down[verb]
    assert code in (1, 2), (code, o, e)
    assert "Traceback" not in e, e[-1500:]
    assert "s2" in e and e.strip().startswith("error:"), e[-1500:]
    no_secret(o, e)


def test_upgrade_with_a_catalog_leaves_the_catalog_alone_and_twice_is_a_noop(env, tmp_path):
    """With `[catalog]` configured (reachable, or not), `migrate upgrade` migrates the
    shards only; a second `upgrade head` changes nothing and reports every shard at head
    before and after."""
    env.ensure("a2")
    cat_url = env.dev.create_catalog("edges_catalog")
    cfg = write_config(tmp_path / "with-catalog.toml",
                       config_data(env.dev, catalog={"url": secret(cat_url)}))
    r = env.migrate("upgrade", "head", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert env.current() == {"s0": "a3", "s1": "a3", "s2": "a3"}
    with shardkit.Cluster.from_config({"shards": [{"name": "c", "primary": cat_url}]}) as cat:
        with cat.primary("c").connect() as c:
            assert c.execute(text("SELECT to_regclass('alembic_version') IS NULL AND "
                                  "to_regclass('gizmos') IS NULL AND to_regclass('items') IS NULL")).scalar()
    before = {s: None for s in env.cluster.shard_names}
    for s in before:
        with env.cluster.primary(s).connect() as c:
            before[s] = migrate.schema_fingerprint(c)
    # Again, now with the catalog unreachable.
    cfg2 = write_config(tmp_path / "catalog-down.toml", config_data(
        env.dev, catalog={"url": f"postgresql+psycopg://shardkit:{PW}@127.0.0.1:{free_port()}/cat"}))
    r2 = env.migrate("upgrade", "head", "--json", config=cfg2)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    out = json.loads(r2.stdout)
    assert all(s["ok"] and s["revision_before"] == s["revision_after"] == "a3" for s in out["shards"]), out
    for s in before:
        with env.cluster.primary(s).connect() as c:
            assert migrate.schema_fingerprint(c) == before[s]
            assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    no_secret(r.stdout, r.stderr, r2.stdout, r2.stderr)


@pytest.mark.parametrize("case", ["extra_index", "expression_index", "partial_index"])
def test_check_detects_index_made_by_hand_on_one_shard(env, case):
    """`migrate check` reports drift when one shard's indexes differ from the others':
    an index only on s1, an expression index over another expression, a partial index
    with another predicate."""
    env.ensure("a3")
    ddl = {
        "extra_index": (None, "CREATE INDEX ix_drift ON items (name)"),
        "expression_index": ("CREATE INDEX ix_drift ON items (lower(name))",
                             "CREATE INDEX ix_drift ON items (upper(name))"),
        "partial_index": ("CREATE INDEX ix_drift ON items (id) WHERE id > 0",
                          "CREATE INDEX ix_drift ON items (id) WHERE id > 1000"),
    }[case]
    try:
        for s in env.cluster.shard_names:
            sql = ddl[1] if s == "s1" else ddl[0]
            if sql:
                env.sql(s, sql)
        report = migrate.check(env.cluster, alembic_ini=env.ini)
        assert not report.ok and any(d.startswith("s1:") for d in report.schema_differences), \
            report.as_dict()
    finally:
        for s in env.cluster.shard_names:
            env.sql(s, "DROP INDEX IF EXISTS ix_drift")


def test_downgrade_to_base_then_current_and_check(env):
    """`downgrade base` empties every shard (tables and shardkit's SQL functions);
    `current` then says every shard is at base and `check` finds no drift."""
    env.ensure("a3")
    r = env.migrate("downgrade", "base", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {s["shard"]: s["revision_after"] for s in json.loads(r.stdout)["shards"]} == \
        {"s0": None, "s1": None, "s2": None}
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            assert c.execute(text(
                "SELECT to_regclass('items') IS NULL AND to_regclass('plans') IS NULL "
                "AND to_regclass('gizmos') IS NULL AND "
                "NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'shardkit')")).scalar(), s
    cur = env.migrate("current")
    assert cur.returncode == 0, cur.stderr
    assert cur.stdout.count("(base: no migration applied)") == 3, cur.stdout
    chk = env.migrate("check", "--json")
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert json.loads(chk.stdout)["ok"] is True


def test_failure_mid_chain_reports_each_shards_real_revision(env):
    """A multi-step upgrade that fails on one shard exits 1; the JSON report names the
    failing shard and its error, and each shard's reported revision is the one it is at."""
    env.ensure(None)
    env.sql("s1", "CREATE TABLE public.a3_tripwire (x int)")     # a3 fails on s1 only
    try:
        r = env.migrate("upgrade", "head", "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        out = json.loads(r.stdout)
        by = {s["shard"]: s for s in out["shards"]}
        actual = env.current()
        assert {k: v["revision_after"] for k, v in by.items()} == actual
        assert actual["s0"] == actual["s2"] == "a3"
        assert not by["s1"]["ok"] and "a3 tripwire on this shard" in by["s1"]["error"]
        assert by["s0"]["ok"] and by["s2"]["ok"]
        assert "failed on s1:" in out["error"], out["error"]
        no_secret(r.stdout, r.stderr)
    finally:
        env.sql("s1", "DROP TABLE IF EXISTS public.a3_tripwire")
        env.ensure("a3")


def test_tables_created_after_install_shardkit_sql_stay_in_the_application_schema(env):
    """On a `shardkit dev` cluster, a table a migration creates after
    `op.install_shardkit_sql()` (a3's `gizmos`) lands in the same schema as the tables
    created before it (`public`), not in shardkit's own `shardkit` schema."""
    env.ensure("a3")
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            where = dict(c.execute(text(
                "SELECT c.relname, n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname IN ('items', 'gizmos') AND c.relkind = 'r'")).all())
        assert where == {"items": "public", "gizmos": "public"}, (s, where)


# -- status --------------------------------------------------------------------------------


def test_status_rows_buckets_and_config_version(env, tmp_path, capsys):
    """`status --json` shows each shard's configured bucket count, row estimates after
    ANALYZE, and the config file's fingerprint, which changes with the file."""
    dev = env.dev
    data = config_data(dev, groups={"st": {"tables": {"st_rows": "id"}}}, reference_tables=["st_ref"])
    for s, b in zip(data["shards"], (["0-99"], ["100-599"], ["600-1023"])):
        s["buckets"] = b
    cfg = write_config(tmp_path / "status.toml", data)
    counts = {"s0": 3, "s1": 7, "s2": 1}
    try:
        for s, n in counts.items():
            env.sql(s, "DROP TABLE IF EXISTS st_rows, st_ref")
            env.sql(s, "CREATE TABLE st_rows (id bigint PRIMARY KEY); CREATE TABLE st_ref (id int)")
            env.sql(s, f"INSERT INTO st_rows SELECT g FROM generate_series(1, {n}) g; "
                       "INSERT INTO st_ref VALUES (1), (2)")
            env.sql(s, "ANALYZE st_rows; ANALYZE st_ref")
        assert cli.main(["status", "--config", str(cfg), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        by = {s["shard"]: s for s in out["shards"]}
        assert {k: v["buckets"] for k, v in by.items()} == {"s0": 100, "s1": 500, "s2": 424}
        assert {k: v["rows_estimate"] for k, v in by.items()} == \
            {k: {"st_rows": n, "st_ref": 2} for k, n in counts.items()}
        # (The file's passwords left out: a hash of them would confirm a guess of one.)
        assert out["config_version"] == hashlib.sha256(cfg.read_bytes().replace(PW.encode(), b"***")).hexdigest()[:12]
        assert out["cluster"] == "edges" and out["bucket_count"] == 1024
        assert cli.main(["status", "--config", str(cfg)]) == 0
        txt = capsys.readouterr().out
        assert re.search(r"^s1\s+s1/primary\s+primary\s+yes\s+-\s+\d+\s+500\s+9$", txt, re.M), txt
        cfg.write_text(cfg.read_text() + "# edited\n")
        assert cli.main(["status", "--config", str(cfg), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config_version"] != out["config_version"]
    finally:
        for s in counts:
            env.sql(s, "DROP TABLE IF EXISTS st_rows, st_ref")


# -- pools -----------------------------------------------------------------------------------


def test_pool_settings_reach_each_nodes_engine(env):
    """Global `[pool]` < `shards[].pool` < `primary_pool` / a replica's `pool`: the
    resulting values are the engines' pool settings."""
    data = config_data(env.dev, pool={"size": 3, "max_overflow": 4, "timeout": 7, "recycle": 60,
                                      "pre_ping": True})
    s1 = data["shards"][1]
    s1["pool"] = {"size": 6, "recycle": 120}
    s1["primary_pool"] = {"timeout": 2, "pre_ping": False}
    s1["replicas"] = [{"url": s1["replicas"][0], "pool": {"max_overflow": 1, "size": 2}}]
    with shardkit.Cluster.from_config(data) as cluster:
        def got(shard, role):
            p = cluster.engine(shard, role, 0).pool
            return (p.size(), p._max_overflow, p._timeout, p._recycle, p._pre_ping)
        assert got("s0", "primary") == (3, 4, 7, 60, True)
        assert got("s0", "replica") == (3, 4, 7, 60, True)
        assert got("s1", "primary") == (6, 4, 2, 120, False)
        assert got("s1", "replica") == (2, 1, 7, 120, True)


def test_max_connections_never_raises_the_configured_pool_limit(env):
    """`max_connections` is a cap: with size 2 and max_overflow 0 the pool holds at most
    2 connections, and a third checkout times out, even with max_connections = 10."""
    data = config_data(env.dev, pool={"size": 2, "max_overflow": 0, "max_connections": 10, "timeout": 0.5})
    with shardkit.Cluster.from_config(data) as cluster:
        eng = cluster.primary("s0")
        held = [eng.connect(), eng.connect()]
        try:
            t = time.monotonic()
            with pytest.raises(sqlalchemy.exc.TimeoutError) as ei:
                third = eng.connect()
                held.append(third)
            assert time.monotonic() - t < 5
            # The error says whose pool ran out.
            assert str(ei.value).startswith("node s0/primary: QueuePool limit of size 2 overflow 0")
            assert ei.value.shardkit_node == "s0/primary"
        finally:
            for c in held:
                c.close()


def test_node_cap_under_50_threads_times_out_instead_of_hanging(env):
    """50 threads on a node capped at 2 connections: at most 2 server connections,
    the others fail with a pool timeout error after `timeout`, nothing hangs, and
    `pool_stats()` / `health()` show the pool as it is."""
    app = "skt-edge-cap"
    data = config_data(env.dev, pool={"size": 1, "max_overflow": 5, "max_connections": 2, "timeout": 0.5})
    with shardkit.Cluster.from_config(
            data, engine_options={"connect_args": {"application_name": app}}) as cluster:
        eng = cluster.primary("s0")
        ok, failures, peak = [], [], [0]
        stop = threading.Event()

        def work():
            t = time.monotonic()
            try:
                with eng.connect() as c:
                    c.execute(text("SELECT pg_sleep(1.5)"))
                ok.append(time.monotonic() - t)
            except Exception as e:  # noqa: BLE001
                failures.append((e, time.monotonic() - t))

        def watch():
            with env.dev.shards[0].primary.connect() as c:
                while not stop.is_set():
                    n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                  (app,)).fetchone()[0]
                    peak[0] = max(peak[0], n)
                    time.sleep(0.02)

        w = threading.Thread(target=watch)
        w.start()
        start = time.monotonic()
        threads = [threading.Thread(target=work) for _ in range(50)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        stats = cluster.pool_stats()["s0/primary"]
        health_pool = {n["node"]: n["pool"] for n in cluster.health().nodes}["s0/primary"]
        for t in threads:
            t.join(timeout=30)
        elapsed = time.monotonic() - start
        stop.set()
        w.join()
        assert not any(t.is_alive() for t in threads), "threads still waiting on the pool"
        assert elapsed < 10, elapsed
        assert len(ok) + len(failures) == 50
        assert 2 <= len(ok) and len(failures) >= 40, (len(ok), [str(f[0]) for f in failures[:3]])
        assert all(isinstance(e, (sqlalchemy.exc.TimeoutError, shardkit.ShardkitError)) for e, _ in failures), \
            {type(e).__name__ for e, _ in failures}
        assert all("time" in str(e).lower() for e, _ in failures)
        assert all(dt < 4 for _, dt in failures), max(dt for _, dt in failures)
        assert 0 < peak[0] <= 2, peak
        assert (stats["size"], stats["checkedout"], stats["overflow"]) == (1, 2, 1), stats
        assert health_pool["checkedout"] == 2 and health_pool["size"] == 1, health_pool


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_count_errors_of_unreachable_nodes_and_dropped_connections(env):
    """`shardkit_query_errors_total` counts, per node, a connection refused by a node that
    is down and a statement whose connection dropped, as well as ordinary errors."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from shardkit import metrics

    dev = env.dev
    data = {"shards": [{"name": "s0", "primary": secret(dev.shards[0].primary.url),
                        "replicas": [f"postgresql+psycopg://shardkit:{PW}@127.0.0.1:{free_port()}/shardkit"]}]}
    registry = prometheus_client.CollectorRegistry()
    with shardkit.Cluster.from_config(data) as cluster:
        metrics.instrument(cluster, registry)
        with cluster.primary("s0").connect() as c:
            c.execute(text("SELECT 1"))
            c.execute(text("SELECT 2"))
            held = registry.get_sample_value("shardkit_pool_checked_out",
                                             {"shard": "s0", "node": "s0/primary", "role": "primary"})
        with pytest.raises(shardkit.ShardUnavailable) as ei:
            cluster.engine("s0", "replica", 0).connect()
        assert PW not in str(ei.value)
        with pytest.raises(sqlalchemy.exc.SQLAlchemyError):
            with cluster.primary("s0").connect() as c:
                c.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

        def value(name, node, role):
            return registry.get_sample_value(name, {"shard": "s0", "node": node, "role": role})

        assert held == 1.0
        assert value("shardkit_queries_total", "s0/primary", "primary") == 2.0
        assert (value("shardkit_query_errors_total", "s0/r0", "replica"),
                value("shardkit_query_errors_total", "s0/primary", "primary")) == (1.0, 1.0)


# -- configuration errors -------------------------------------------------------------------------


PRIMARY = 'primary = "postgresql+psycopg://app:' + PW + '@db0/shop"\n'
CONFIG_CASES = {
    "bad_port": ('[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app:' + PW + '@db0:notaport/shop"\n',
                 "shards[0].primary"),
    "missing_env": ('[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app:${SKT_EDGE_UNSET}@db0/shop"\n',
                    "shards[0].primary"),
    "missing_env_replica_table": (
        '[[shards]]\nname = "s0"\n' + PRIMARY
        + 'replicas = [{ url = "postgresql+psycopg://app:${SKT_EDGE_UNSET}@db0r/shop", pool = { size = 2 } }]\n',
        "shards[0].replicas[0].url"),
    "missing_env_catalog": ('[[shards]]\nname = "s0"\n' + PRIMARY
                            + '[catalog]\nurl = "postgresql+psycopg://app:${SKT_EDGE_UNSET}@cat/c"\n',
                            "catalog.url"),
    "pool_timeout_string": ('[pool]\ntimeout = "30"\n[[shards]]\nname = "s0"\n' + PRIMARY, "pool.timeout"),
    "replica_pool_overflow": (
        '[[shards]]\nname = "s0"\n' + PRIMARY
        + 'replicas = [{ url = "postgresql+psycopg://app:' + PW + '@r/shop", pool = { max_overflow = -2 } }]\n',
        "shards[0].replicas[0].pool.max_overflow"),
    "primary_pool_pre_ping": ('[[shards]]\nname = "s0"\n' + PRIMARY + 'primary_pool = { pre_ping = "yes" }\n',
                              "shards[0].primary_pool.pre_ping"),
    "config_is_a_directory": (None, None),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_mistakes_are_one_line_naming_the_field(case, tmp_path, capsys, monkeypatch):
    """A config mistake makes the command print one line, `error: FIELD: problem (fix)`,
    exit 2, and never show the password."""
    monkeypatch.delenv("SKT_EDGE_UNSET", raising=False)
    body, field = CONFIG_CASES[case]
    if body is None:
        path, field = tmp_path, str(tmp_path)
    else:
        path = tmp_path / "shardkit.toml"
        path.write_text(body)
    try:
        rc = cli.main(["status", "--config", str(path)])
    except SystemExit as e:
        rc = e.code
    except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
        pytest.fail(f"{type(e).__name__} escaped instead of `error: ...` and exit 2: {e}")
    captured = capsys.readouterr()
    assert rc == 2, (rc, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), captured.err
    no_secret(captured.out, captured.err)
    if case.startswith("missing_env"):
        assert "SKT_EDGE_UNSET" in lines[0] and "export SKT_EDGE_UNSET=" in lines[0]


@pytest.mark.parametrize("case", ["at_sign_in_env_password", "password_query_parameter"])
def test_passwords_with_url_characters_never_printed(case, tmp_path, capsys, monkeypatch):
    """A password never appears, whole or in part, in `route` or `status` output: not
    when `${VAR}` holds a password with an `@`, not when the URL passes it as a
    `password=` query parameter."""
    secret_pw = "Pw@edge-7q9Zk" if case.startswith("at_sign") else PW
    monkeypatch.setenv("SKT_EDGE_PW", secret_pw)
    port = free_port()
    url = (f"postgresql+psycopg://shardkit:${{SKT_EDGE_PW}}@127.0.0.1:{port}/shardkit"
           if case.startswith("at_sign") else
           f"postgresql+psycopg://shardkit@127.0.0.1:{port}/shardkit?password={PW}")
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text(f'[[shards]]\nname = "s0"\nprimary = "{url}"\n[groups.users]\ntables = {{ users = "id" }}\n')
    outputs = []
    for argv in (["route", "users", "42", "--config", str(cfg)],
                 ["status", "--config", str(cfg), "--json"],
                 ["status", "--config", str(cfg)]):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
        captured = capsys.readouterr()
        outputs.append((argv[0], rc, captured.out + captured.err))
    fragments = list(dict.fromkeys([secret_pw] + [p for p in re.split(r"[@:/?#]", secret_pw) if len(p) >= 4]))
    leaks = [(cmd, f) for cmd, _, out in outputs for f in fragments if f in out]
    assert not leaks, (leaks, outputs)


# -- docker compose ----------------------------------------------------------------------------------


def test_compose_toml_users_databases_and_password_match_the_compose_file():
    """Every node URL in shardkit.compose.toml uses the user, database and password the
    compose services are created with (replicas are copies of their primary)."""
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    cfg = shardkit.load_config(ROOT / "shardkit.compose.toml", env={"SHARDKIT_PASSWORD": "x-" + PW})
    for shard in cfg.shards:
        penv = services[f"{shard.name}-primary"]["environment"]
        for url in (shard.primary, *shard.replicas):
            assert url.username == penv["POSTGRES_USER"], (shard.name, url.username)
            assert url.database == penv["POSTGRES_DB"], (shard.name, url.database)
            assert url.password == "x-" + PW and "SHARDKIT_PASSWORD" in penv["POSTGRES_PASSWORD"]
        renv = services[f"{shard.name}-replica"]["environment"]
        assert renv["PGPASSWORD"] == penv["POSTGRES_PASSWORD"]
        script = services[f"{shard.name}-replica"]["entrypoint"][-1]
        assert f"-U {penv['POSTGRES_USER']} " in script
    cat = services["catalog"]["environment"]
    assert cfg.catalog_url.username == cat["POSTGRES_USER"]
    assert cfg.catalog_url.password == "x-" + PW and "SHARDKIT_PASSWORD" in cat["POSTGRES_PASSWORD"]
