"""A careless operator against the operations surface: pools and the per-node cap under
mixed load, pool timeouts, status with secrets and broken nodes, Prometheus counts,
verify on planted rows, route with odd keys, CLI mistakes, dispose() then reuse.

The tests run against this module's own local cluster (2 shards x 1 replica; pg_hba
edited so that two roles need a password), the catalog test on a cluster of its own."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid

import psycopg
import pytest
from own_tables import truncate_everywhere
from replica_env import replayed
from waiting import wait_replicas_usable
from psycopg import sql
import sqlalchemy
from sqlalchemy import BigInteger, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import cli
from shardkit.devcluster import to_toml

pytestmark = pytest.mark.integration

PW = "Hx-Secret-4vQ9w"        # pwuser's real password
BAD_PW = "Hx-Wrong-7pLk3"     # a wrong one: must not be printed either
APP = "skt-ops"
NASTY_PW = "Nx p@ss'w\"o:r/d%41?#&=\\end"   # every character a URL or conninfo cares about


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "things"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_cli(argv, capsys):
    """(exit code, stdout, stderr, traceback of an escaped exception or '')."""
    tb = ""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    except Exception:  # noqa: BLE001 - what a user would see as a traceback
        rc, tb = None, traceback.format_exc()
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, tb


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    nodes = [n for s in dev.shards for n in s.nodes]
    if not all(hasattr(n, "datadir") for n in nodes) or os.geteuid() != 0:
        pytest.skip("needs a local DevCluster whose pg_hba.conf this test can edit")
    for n in nodes:   # pwuser and pwnasty log in with a password; everyone else stays trusted
        hba = n.datadir / "pg_hba.conf"
        hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n"
                       "host all pwnasty 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    for s in dev.shards:
        with psycopg.connect(s.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD '{PW}'")
            c.execute(sql.SQL("CREATE ROLE pwnasty LOGIN SUPERUSER PASSWORD {}").format(sql.Literal(NASTY_PW)))
            c.execute("CREATE TABLE things (id bigint PRIMARY KEY, v varchar(20))")
            c.execute('CREATE TABLE "Accounts" (id bigint PRIMARY KEY)')
    for n in nodes:
        with psycopg.connect(n.dsn, autocommit=True) as c:
            c.execute("SELECT pg_reload_conf()")
    for s in dev.shards:
        for r in s.replicas:
            r.wait_caught_up()
    return dev, tmp_path_factory.mktemp("ops_surface")


def base_config(dev, **extra):
    data = dev.config_dict()
    data.pop("catalog", None)
    data["groups"] = {"things": {"tables": {"things": "id"}}}
    data.update(extra)
    return data


def with_password(data, how):
    """Every node URL as pwuser: `how` = "inline" (user:pw@), "query" (?password=) or "env"."""
    def u(url):
        if how == "query":
            return url.replace("://shardkit@", "://pwuser@") + f"?password={PW}"
        pw = "${SKT_OPS_PW}" if how == "env" else PW
        return url.replace("://shardkit@", f"://pwuser:{pw}@")
    for s in data["shards"]:
        s["primary"] = u(s["primary"])
        s["replicas"] = [u(r) for r in s["replicas"]]
    return data


def write(path, data):
    path.write_text(to_toml(data))
    return path


def app_counts(dev, app):
    """node name -> server connections with application_name `app`, on every node."""
    out = {}
    for s in dev.shards:
        for n in s.nodes:
            with n.connect() as c:
                out[n.name] = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                        (app,)).fetchone()[0]
    return out


def truncate(cluster):
    truncate_everywhere(cluster, "things")


# -- secrets ------------------------------------------------------------------------------------------


def test_status_with_the_password_as_a_url_query_parameter(env, capsys):
    """A `?password=` URL (which mask_url treats as supported) works for the engines, so
    the health monitor and `status` must see the nodes up too, not 'no password supplied'."""
    dev, tmp = env
    cfg = write(tmp / "query_pw.toml", with_password(base_config(dev), "query"))
    with shardkit.Cluster.from_config(cfg) as cluster:
        with cluster.primary("s0").connect() as c:     # the engine itself logs in fine
            assert c.execute(text("SELECT current_user")).scalar() == "pwuser"
    rc, out, err, tb = run_cli(["status", "--config", cfg, "--json"], capsys)
    assert not tb, tb
    assert PW not in out + err
    data = json.loads(out)
    down = {n["node"]: n["error"] for s in data["shards"] for n in s["nodes"] if not n["up"]}
    assert not down, down
    assert rc == 0 and data["ready"] is True


def test_engine_repr_never_shows_a_query_parameter_password(env):
    """repr() of every object an application may log (cluster, config, engines, pools,
    errors) hides the password, also when the URL carries it as `?password=`."""
    dev, _ = env
    data = with_password(base_config(dev), "query")
    data["shards"][1]["replicas"] = [f"postgresql+psycopg://pwuser@127.0.0.1:{free_port()}/shardkit"
                                     f"?password={PW}"]
    with shardkit.Cluster.from_config(data) as cluster:
        with pytest.raises(shardkit.ShardUnavailable) as ei:
            cluster.engine("s1", "replica", 0).connect()
        things = {
            "cluster": repr(cluster), "config": repr(cluster.config),
            "shard config": repr(cluster.config.shards[0]),
            "error": f"{ei.value!s} {ei.value!r}",
            "primary engine": repr(cluster.primary("s0")),
            "replica engine": repr(cluster.engine("s0", "replica", 0)),
            "pool stats": repr(cluster.pool_stats()),
        }
        leaks = [k for k, v in things.items() if PW in v]
        assert not leaks, {k: things[k] for k in leaks}


def test_status_with_env_secret_wrong_password_stopped_replica_and_unreachable_host(env, capsys, caplog,
                                                                                     monkeypatch):
    """`${ENV}` password; s0's replica stopped; s1's replica on a port nothing listens on:
    exit 0 (primaries up), the broken nodes down with a reason; with a wrong password in
    the variable every node is down and exit 1. No password anywhere, at -v."""
    dev, tmp = env
    caplog.set_level(logging.DEBUG)
    data = with_password(base_config(dev, replicas={"poll_interval": 0.1}), "env")
    data["shards"][1]["replicas"] = [f"postgresql+psycopg://pwuser:${{SKT_OPS_PW}}@127.0.0.1:"
                                     f"{free_port()}/shardkit"]
    cfg = write(tmp / "env_pw.toml", data)
    assert PW not in cfg.read_text()
    monkeypatch.setenv("SKT_OPS_PW", PW)
    replica = dev.shards[0].replicas[0]
    replica.stop()
    try:
        rc, out, err, tb = run_cli(["-v", "status", "--config", cfg, "--json"], capsys)
        rc_t, out_t, err_t, tb_t = run_cli(["status", "--config", cfg], capsys)
    finally:
        replica.start()
    assert not tb and not tb_t, tb + tb_t
    nodes = {n["node"]: n for s in json.loads(out)["shards"] for n in s["nodes"]}
    assert rc == 0 and rc_t == 0, (rc, rc_t, err)
    assert {k: v["up"] for k, v in nodes.items()} == \
        {"s0/primary": True, "s0/r0": False, "s1/primary": True, "s1/r0": False}
    assert nodes["s0/r0"]["error"] and nodes["s1/r0"]["error"]
    assert "s0/r0" in out_t and "s1/r0" in out_t

    monkeypatch.setenv("SKT_OPS_PW", BAD_PW)
    rc2, out2, err2, tb2 = run_cli(["-v", "status", "--config", cfg, "--json"], capsys)
    assert not tb2, tb2
    data2 = json.loads(out2)
    assert rc2 == 1 and data2["ready"] is False
    errors = [n["error"] for s in data2["shards"] for n in s["nodes"]]
    assert all(errors), errors
    assert any("password authentication failed" in e for e in errors), errors
    blob = "\n".join([out, err, out_t, err_t, out2, err2, caplog.text,
                      *(str(r.args) for r in caplog.records)])
    for secret in (PW, BAD_PW):
        assert secret not in blob


# -- pools ---------------------------------------------------------------------------------------------


def test_node_cap_holds_for_every_node_under_50_threads_of_mixed_work(env):
    """50 threads, each with several sessions: keyed writes, replica reads, cross-shard
    counts (one connection per shard at once). With `max_connections = 3` no node ever
    has more than 3 of this process's pool connections, nothing fails, the data is right."""
    dev, _ = env
    app = APP + "-mixed"
    # size = cap: the cap takes max_overflow to 0, and no connection is closed on checkin
    # (a closed backend lingers in pg_stat_activity for a moment, which would look like a 4th)
    data = base_config(dev, pool={"size": 3, "max_overflow": 10, "max_connections": 3, "timeout": 20},
                       replicas={"consistency": "eventual", "max_lag_seconds": 60,
                                 "max_lag_bytes": 1 << 40, "poll_interval": 0.05})
    cluster = shardkit.Cluster.from_config(data, engine_options={"connect_args": {"application_name": app}})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    truncate(cluster)
    peak: dict[str, int] = {}
    errors: list[BaseException] = []
    replica_reads = [0]
    stop = threading.Event()

    def count_replica(*a):
        replica_reads[0] += 1

    for s in cluster.shard_names:
        sqlalchemy.event.listen(cluster.engine(s, "replica", 0), "before_cursor_execute", count_replica)

    def watch():
        while not stop.is_set():
            for k, n in app_counts(dev, app).items():
                peak[k] = max(peak.get(k, 0), n)
            time.sleep(0.01)

    def work(k):
        try:
            for i in range(6):
                key = k * 100 + i
                with Session() as w:                    # session 1: a write
                    w.add(Thing(id=key, v="x"))
                    w.commit()
                with Session() as r:                    # session 2: reads, all shards then one
                    # (all shards first: a session holding one shard's connection while
                    # asking for another's is the lock-order deadlock the README warns of)
                    # (eventual consistency: a replica may not have the new row yet)
                    r.execute(select(func.count()).select_from(Thing)).scalar()
                    r.execute(select(Thing).where(Thing.id == key)).scalars().all()
                    r.commit()                          # its connections go back to the pools
                    with Session() as r2:               # session 3, opened inside session 2
                        r2.execute(select(func.max(Thing.id))).scalar()
                        r2.execute(select(Thing).where(Thing.id == key - 1)).all()
                    r.execute(select(Thing.v).where(Thing.id == key)).scalar()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    w = threading.Thread(target=watch)
    w.start()
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        w.join()
    try:
        assert not errors, [repr(e) for e in errors[:3]]
        assert set(peak) == {"s0/primary", "s0/r0", "s1/primary", "s1/r0"}
        assert all(0 < n <= 3 for n in peak.values()), peak
        assert replica_reads[0] > 0
        total = 0
        for s in cluster.shard_names:
            with cluster.primary(s).connect() as c:
                total += c.execute(text("SELECT count(*) FROM things")).scalar()
        assert total == 50 * 6
    finally:
        cluster.dispose()


def test_node_cap_holds_for_the_pool_and_the_monitor_adds_one(env):
    """`max_connections` caps the node's pool in this process: with a cap of 1 on the
    replica, the process has at most 1 pool connection to it while it serves a read,
    plus the health monitor's own (as the README says)."""
    dev, _ = env
    app = APP + "-cap1"
    data = base_config(dev, replicas={"consistency": "eventual", "max_lag_seconds": 60,
                                      "max_lag_bytes": 1 << 40})
    data["shards"][0]["replicas"] = [{"url": data["shards"][0]["replicas"][0],
                                      "pool": {"max_connections": 1}}]
    with shardkit.Cluster.from_config(data, engine_options={"connect_args": {"application_name": app}}) as cl:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cl)
        cl.start_monitor()
        wait_replicas_usable(cl, ("s0",))
        key = next(k for k in range(100) if cl.shard_for(Thing, k) == "s0")
        with Session() as s:
            s.execute(select(Thing).where(Thing.id == key)).all()
            with dev.shards[0].replicas[0].connect() as c:
                mine = c.execute(
                    "SELECT application_name FROM pg_stat_activity WHERE application_name IN (%s, %s)",
                    (app, "shardkit-monitor")).fetchall()
        assert cl.pool_stats()["s0/r0"]["checkedout"] + cl.pool_stats()["s0/r0"]["checkedin"] >= 1
        assert [r[0] for r in mine].count(app) <= 1, mine
        assert [r[0] for r in mine].count("shardkit-monitor") <= 1, mine


def test_pool_timeouts_of_replica_reads_and_scatters_name_the_node(env):
    """A replica read whose pool is exhausted fails with the replica's name (not a
    generic error, not a ban); a cross-shard read whose s1 pool is exhausted names s1."""
    dev, _ = env
    data = base_config(dev, pool={"size": 1, "max_overflow": 0, "timeout": 0.3},
                       replicas={"consistency": "eventual", "max_lag_seconds": 60,
                                 "max_lag_bytes": 1 << 40})
    with shardkit.Cluster.from_config(data) as cluster:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        cluster.start_monitor()
        wait_replicas_usable(cluster, ("s0",))
        key = next(k for k in range(100) if cluster.shard_for(Thing, k) == "s0")
        held = cluster.engine("s0", "replica", 0).connect()
        try:
            with Session() as s, pytest.raises(sqlalchemy.exc.TimeoutError) as ei:
                s.execute(select(Thing).where(Thing.id == key)).all()
            assert str(ei.value).startswith("node s0/r0: "), str(ei.value)
            assert ei.value.shardkit_node == "s0/r0"
        finally:
            held.close()
        held = cluster.primary("s1").connect()
        try:
            with Session(consistency="strong") as s, \
                    pytest.raises((sqlalchemy.exc.TimeoutError, shardkit.ShardkitError)) as ei2:
                s.execute(select(func.count()).select_from(Thing)).scalar()
            assert "s1/primary" in str(ei2.value), str(ei2.value)
        finally:
            held.close()
        with Session(consistency="strong") as s:   # and the pools recover
            assert s.execute(select(func.count()).select_from(Thing)).scalar() >= 0


def test_dispose_then_reuse(env):
    """After dispose() every pooled server connection is closed and the monitor stops;
    the same Cluster then works again: writes, replica reads, scatters, health."""
    dev, _ = env
    app = APP + "-dispose"
    data = base_config(dev, replicas={"consistency": "eventual", "max_lag_seconds": 60,
                                      "max_lag_bytes": 1 << 40, "poll_interval": 0.05})
    cluster = shardkit.Cluster.from_config(data, engine_options={"connect_args": {"application_name": app}})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    truncate(cluster)
    try:
        for round_ in range(2):
            with Session() as s:
                s.add_all(Thing(id=round_ * 1000 + k, v="r") for k in range(20))
                s.commit()
            replayed(dev)  # (the count below reads the replicas: "eventual")
            with Session() as s:
                assert s.execute(select(func.count()).select_from(Thing)).scalar() == 20 * (round_ + 1)
                key = round_ * 1000 + 3
                wait_for(lambda: s.execute(select(Thing.v).where(Thing.id == key)).scalar() == "r",
                         "the row on the replica")
            assert cluster.health().ready
            counts = app_counts(dev, app)
            assert counts["s0/primary"] >= 1 and counts["s0/r0"] + counts["s1/r0"] >= 1, counts
            # This cluster's monitor threads (other modules' clusters may poll in this process).
            threads = list(cluster._monitor._threads)
            assert threads and all(t.name.startswith("shardkit-monitor") for t in threads)
            cluster.dispose()
            assert cluster.pool_stats() == {} and cluster._monitor is None
            wait_for(lambda: sum(app_counts(dev, app).values()) == 0, "pooled connections to close")
            wait_for(lambda: not [t for t in threads if t.is_alive()], "monitor threads to stop", timeout=10)
    finally:
        cluster.dispose()


# -- metrics -------------------------------------------------------------------------------------------


def test_metrics_match_the_statements_each_node_ran_and_survive_dispose(env):
    """Per node, `shardkit_queries_total` equals the statements that node ran (as counted
    by an independent listener), errors count per node and not as queries, the histogram
    counts every success, labels stay the same series after dispose() and reuse, and a
    stopped replica's `shardkit_node_up` drops to 0."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from shardkit import metrics

    dev, _ = env
    registry = prometheus_client.CollectorRegistry()
    data = base_config(dev, replicas={"consistency": "eventual", "max_lag_seconds": 60,
                                      "max_lag_bytes": 1 << 40, "poll_interval": 0.05})
    seen: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def hook(eng):
        info = eng.info
        labels = (info["node"], info["role"])

        def count(*a):
            with lock:
                seen[labels] = seen.get(labels, 0) + 1

        sqlalchemy.event.listen(eng, "after_cursor_execute", count)

    cluster = shardkit.Cluster.from_config(data)
    metrics.instrument(cluster, registry)
    cluster._engine_hooks.append(hook)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    truncate(cluster)

    def sample(name, node, role):
        return registry.get_sample_value(name, {"shard": node.split("/")[0], "node": node, "role": role}) or 0.0

    try:
        for round_ in range(2):
            with Session() as s:
                s.add_all(Thing(id=round_ * 1000 + k, v="m") for k in range(30))
                s.commit()
            with Session() as s:
                for k in range(30):
                    s.execute(select(Thing).where(Thing.id == round_ * 1000 + k)).all()
                s.execute(select(func.count()).select_from(Thing)).scalar()
            for node, role in (("s0/primary", "primary"), ("s1/primary", "primary")):
                with pytest.raises(sqlalchemy.exc.ProgrammingError):
                    with cluster.engine(node[:2], role).connect() as c:
                        c.execute(text("SELECT * FROM no_such_table_ops"))
            nodes = [("s0/primary", "primary"), ("s0/r0", "replica"), ("s1/primary", "primary"),
                     ("s1/r0", "replica")]
            got = {n: sample("shardkit_queries_total", *n) for n in nodes}
            want = {n: float(seen.get(n, 0)) for n in nodes}
            assert got == want, (round_, got, want)
            assert got[("s0/r0", "replica")] > 0 and got[("s1/r0", "replica")] > 0
            hist = {n: sample("shardkit_query_duration_seconds_count", *n) for n in nodes}
            assert hist == got, (hist, got)
            errs = {n: sample("shardkit_query_errors_total", *n) for n in nodes}
            assert errs == {("s0/primary", "primary"): round_ + 1.0, ("s0/r0", "replica"): 0.0,
                            ("s1/primary", "primary"): round_ + 1.0, ("s1/r0", "replica"): 0.0}, errs
            cluster.dispose()
        # One series per node and metric, whatever dispose() did.
        families = {m.name: m for m in registry.collect()}
        per_node = [s.labels["node"] for s in families["shardkit_queries"].samples
                    if s.name == "shardkit_queries_total"]
        assert sorted(per_node) == ["s0/primary", "s0/r0", "s1/primary", "s1/r0"], per_node

        cluster.start_monitor()
        with cluster.primary("s0").connect() as c:
            c.execute(text("SELECT 1"))
        out = prometheus_client.generate_latest(registry).decode()
        assert 'shardkit_pool_size{node="s0/primary",role="primary",shard="s0"} 5.0' in out
        assert 'shardkit_replica_lag_bytes{node="s1/r0",role="replica",shard="s1"}' in out
        replica = dev.shards[1].replicas[0]
        replica.stop()
        try:
            wait_for(lambda: registry.get_sample_value(
                "shardkit_node_up", {"shard": "s1", "node": "s1/r0", "role": "replica"}) == 0.0,
                "s1/r0 reported down")
            assert registry.get_sample_value(
                "shardkit_node_up", {"shard": "s1", "node": "s1/primary", "role": "primary"}) == 1.0
        finally:
            replica.start()
    finally:
        cluster.dispose()


def test_metrics_without_prometheus_client_is_a_clear_import_error():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'prometheus_client':\n"
        "            raise ImportError('No module named prometheus_client')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import shardkit\n"
        "try:\n"
        "    import shardkit.metrics\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "pip install 'shardkit[metrics]'" in r.stdout, r.stdout


# -- verify and status on real rows ----------------------------------------------------------------


def test_verify_and_status_see_a_mixed_case_table(env, capsys, tmp_path):
    """A table named `Accounts` (SQLAlchemy quotes it; it exists on every shard) is
    checked by verify (not reported missing) and has a row estimate in status."""
    dev, _ = env
    data = base_config(dev)
    data["groups"] = {"acc": {"tables": {"Accounts": "id"}}}
    cfg = write(tmp_path / "mixed.toml", data)
    with shardkit.Cluster.from_config(cfg) as cluster:
        for k in range(40):
            with cluster.primary(cluster.shard_for("Accounts", k)).begin() as c:
                c.execute(text('INSERT INTO "Accounts" VALUES (:k) ON CONFLICT DO NOTHING'), {"k": k})
        for s in cluster.shard_names:
            with cluster.primary(s).begin() as c:
                c.execute(text('ANALYZE "Accounts"'))
    rc, out, err, tb = run_cli(["verify", "--config", cfg, "--json"], capsys)
    assert not tb, tb
    rep = json.loads(out)
    assert rep["missing_tables"] == [] and rc == 0, rep
    assert sum(t["rows"] for t in rep["tables"]) == 40
    rc, out, err, tb = run_cli(["status", "--config", cfg, "--json"], capsys)
    est = {s["shard"]: s["rows_estimate"] for s in json.loads(out)["shards"]}
    assert all(v["Accounts"] is not None for v in est.values()), est
    assert sum(v["Accounts"] for v in est.values()) == 40


def test_verify_planted_rows_on_a_shard_that_owns_no_buckets(env, capsys, tmp_path):
    """s1 owns no bucket at all (an empty owned list in the SQL check): every row on it
    is misplaced; a copy of an s0 row counts as a duplicate; a NULL key is reported as
    such; a composite-key group is checked by streaming. Exit 1, then 0 once cleaned."""
    dev, _ = env
    data = base_config(dev)
    data["shards"][0]["buckets"] = ["0-1023"]
    data["shards"][1]["buckets"] = []
    data["groups"] = {"things": {"tables": {"things": "id", "hkids": "id"}},
                      "pairs": {"tables": {"hpairs": ["a", "b"]}}}
    cfg = write(tmp_path / "lopsided.toml", data)
    with shardkit.Cluster.from_config(cfg) as cluster:
        for s in cluster.shard_names:
            with cluster.primary(s).begin() as c:
                c.execute(text("TRUNCATE things; DROP TABLE IF EXISTS hkids, hpairs; "
                               "CREATE TABLE hkids (id bigint, n int); "
                               "CREATE TABLE hpairs (a bigint, b text, PRIMARY KEY (a, b))"))
                shardkit.install_sql(c)
        with cluster.primary("s0").begin() as c:
            c.execute(text("INSERT INTO things SELECT g, 'ok' FROM generate_series(1, 50) g"))
        rc, out, err, tb = run_cli(["verify", "--config", cfg, "--json"], capsys)
        assert (rc, json.loads(out)["ok"]) == (0, True), out + err + tb
        with cluster.primary("s1").begin() as c:
            c.execute(text("INSERT INTO things VALUES (7, 'dup'), (1000, 'stray')"))
            c.execute(text("INSERT INTO hkids VALUES (NULL, 1), (3, 1)"))
            c.execute(text("INSERT INTO hpairs VALUES (1, 'ü日本')"))
        rc, out, err, tb = run_cli(["verify", "--config", cfg, "--json"], capsys)
        assert not tb, tb
        rep = json.loads(out)
        by = {(t["table"], t["shard"]): t for t in rep["tables"]}
        assert rc == 1 and rep["ok"] is False
        assert by[("things", "s1")]["misplaced"] == {"s0": 2} and by[("things", "s1")]["duplicates"] == 1
        assert by[("things", "s1")]["method"] == "sql"
        assert by[("hkids", "s1")]["misplaced"] == {"s0": 1, "(null key)": 1}
        assert by[("hpairs", "s1")]["misplaced"] == {"s0": 1} and by[("hpairs", "s1")]["method"] == "python"
        assert all(not t["misplaced"] for t in rep["tables"] if t["shard"] == "s0")
        with cluster.primary("s1").begin() as c:
            c.execute(text("TRUNCATE things, hkids, hpairs"))
        rc, out, err, tb = run_cli(["verify", "--config", cfg], capsys)
        assert rc == 0 and "verify: clean" in out, out + err + tb
        for s in cluster.shard_names:
            with cluster.primary(s).begin() as c:
                c.execute(text("TRUNCATE things; DROP TABLE hkids, hpairs"))


# -- route ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def route_cfg(tmp_path_factory):
    data = {
        "reference_tables": ["countries"],
        "shards": [{"name": "s0", "primary": f"postgresql+psycopg://app:{PW}@127.0.0.1:1/db"},
                   {"name": "s1", "primary": f"postgresql+psycopg://app:{PW}@127.0.0.1:2/db"}],
        "groups": {"users": {"tables": {"users": "id"}},
                   "pairs": {"tables": {"pairs": ["a", "b"]}},
                   "events": {"strategy": "range", "tables": {"events": "id"},
                              "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]},
                   "tenants": {"strategy": "list", "tables": {"tenants": "region"},
                               "values": {"s0": ["eu"], "s1": ["us"]}}},
    }
    return write(tmp_path_factory.mktemp("route") / "route.toml", data)


ROUTED = [
    (["users", "-5"], -5),
    (["users", "9223372036854775807"], 2**63 - 1),
    (["users", "550e8400-e29b-41d4-a716-446655440000"], uuid.UUID("550e8400-e29b-41d4-a716-446655440000")),
    (["users", "ü日本"], "ü日本"),
    (["users", "--type", "str", "42"], "42"),
    (["pairs", "1", "x"], (1, "x")),
    (["users", "²"], "²"),       # not an int ('²'.isdigit() is True, int('²') fails): text
]


@pytest.mark.parametrize("argv,key", ROUTED, ids=[" ".join(a) for a, _ in ROUTED])
def test_route_odd_keys_agree_with_the_library(route_cfg, capsys, argv, key):
    """`route` with --type auto reads a key as int if it looks like one, then uuid, else
    text; whatever it prints is the library's own answer, and no password."""
    rc, out, err, tb = run_cli(["route", *argv, "--config", route_cfg, "--json"], capsys)
    assert not tb, tb
    assert rc == 0, err
    got = json.loads(out)
    cfg = shardkit.load_config(route_cfg)
    cluster = shardkit.Cluster(cfg)
    assert (got["shard"], got["bucket"]) == (cluster.shard_for(argv[0], key), cluster.bucket_for(argv[0], key))
    assert PW not in out + err


REFUSED = [
    (["users", "99999999999999999999"], "64-bit"),
    (["users", "-9223372036854775809"], "64-bit"),
    (["users", "--type", "int", "abc"], "not an integer"),
    (["users", "--type", "uuid", "12"], "not a UUID"),
    (["events", "abc"], "not an integer"),  # (a range group of integer bounds)
    (["tenants", "xx"], "not mapped"),
    (["countries", "1"], "reference table"),
    (["nosuch", "1"], "nosuch"),
    (["pairs", "1"], "composite"),
    (["pairs", "1", "2", "3"], "composite"),
]


@pytest.mark.parametrize("argv,needle", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_route_bad_keys_are_one_clear_line(route_cfg, capsys, argv, needle):
    rc, out, err, tb = run_cli(["route", *argv, "--config", route_cfg], capsys)
    assert not tb, tb
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert PW not in out + err


# -- CLI mistakes --------------------------------------------------------------------------------------


def test_cli_config_file_mistakes_and_unknown_options(tmp_path, capsys):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[shards]]\nname = "s0"\nprimary = "postgresql://u:' + PW + '@h/db\n')
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    missing = tmp_path / "nope.toml"
    for verb in (["status"], ["verify"], ["route", "users", "1"]):
        for path, needle in ((missing, "not found"), (bad_toml, "invalid TOML"), (binary, "cannot read")):
            rc, out, err, tb = run_cli([*verb, "--config", path], capsys)
            assert not tb, tb
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and needle in lines[0] and str(path) in lines[0], (verb, err)
            assert PW not in out + err
        rc, out, err, tb = run_cli([*verb, "--config", missing, "--no-such-option"], capsys)
        assert rc == 2 and not tb and "unrecognized arguments: --no-such-option" in err, (verb, err)
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "shardkit"), "status", "--config",
                        str(missing)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


# -- pool behaviour on real connections -------------------------------------------------------------


def test_recycle_and_pre_ping_follow_the_per_node_override(env):
    """`primary_pool.recycle` beats `[pool].recycle` on real connections: s0's primary
    gets a new server process once its connection is older than 0.3 s, s1's keeps its
    own; `pre_ping` set for s1's replica only (global off) survives a killed backend."""
    dev, _ = env
    data = base_config(dev, pool={"size": 1, "max_overflow": 0, "recycle": 3600, "pre_ping": False})
    data["shards"][0]["primary_pool"] = {"recycle": 0.3}
    data["shards"][1]["replicas"] = [{"url": data["shards"][1]["replicas"][0], "pool": {"pre_ping": True}}]
    with shardkit.Cluster.from_config(data) as cluster:
        def pid(shard, role="primary"):
            with cluster.engine(shard, role, 0).connect() as c:
                return c.execute(text("SELECT pg_backend_pid()")).scalar()

        first = {s: pid(s) for s in ("s0", "s1")}
        time.sleep(0.5)   # older than s0's recycle, far younger than the global one
        assert pid("s0") != first["s0"]
        assert pid("s1") == first["s1"]
        rpid = pid("s1", "replica")
        with dev.shards[1].replicas[0].connect() as c:
            c.execute("SELECT pg_terminate_backend(%s)", (rpid,))
        wait_for(lambda: pid("s1", "replica") != rpid, "a new replica connection")   # no error raised


def test_pre_ping_reconnect_after_a_restart_is_not_a_query_error(env):
    """With `pre_ping`, a primary restart is invisible to the application: the pool
    replaces the dead connection and the query succeeds. Nothing raised, so
    `shardkit_query_errors_total` ("statements that raised") stays 0, as it does for
    `shardkit_queries_total`, which never counts the ping either."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from shardkit import metrics

    dev, _ = env
    registry = prometheus_client.CollectorRegistry()
    data = base_config(dev, pool={"pre_ping": True})
    labels = {"shard": "s1", "node": "s1/primary", "role": "primary"}
    with shardkit.Cluster.from_config(data) as cluster:
        metrics.instrument(cluster, registry)
        with cluster.primary("s1").connect() as c:
            before = c.execute(text("SELECT pg_backend_pid()")).scalar()
        node = dev.shards[1].primary
        node.stop()
        node.start()
        with cluster.primary("s1").connect() as c:      # no error: pre-ping reconnected
            assert c.execute(text("SELECT pg_backend_pid()")).scalar() != before
        assert registry.get_sample_value("shardkit_queries_total", labels) == 2.0
        assert (registry.get_sample_value("shardkit_query_errors_total", labels) or 0.0) == 0.0


def test_pool_stats_overflow_is_never_negative(env):
    """`pool_stats()` gives each node's overflow count: connections beyond `size`.  An
    idle pool, or one using fewer than `size`, has none (0, not minus the idle slots)."""
    dev, _ = env
    data = base_config(dev, pool={"size": 4, "max_overflow": 2})
    with shardkit.Cluster.from_config(data) as cluster:
        eng = cluster.primary("s0")
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
            busy = cluster.pool_stats()["s0/primary"]
        idle = cluster.pool_stats()["s0/primary"]
        held = [eng.connect() for _ in range(5)]
        try:
            full = cluster.pool_stats()["s0/primary"]
        finally:
            for c in held:
                c.close()
        assert (busy["size"], busy["checkedout"]) == (4, 1) and idle["checkedout"] == 0
        assert full["checkedout"] == 5 and full["overflow"] == 1, full
        assert busy["overflow"] == 0 and idle["overflow"] == 0, (busy, idle)


def test_verify_with_a_stopped_primary_is_one_clear_line(env, capsys, tmp_path):
    dev, _ = env
    data = with_password(base_config(dev), "inline")
    cfg = write(tmp_path / "verify_down.toml", data)
    node = dev.shards[1].primary
    node.stop()
    try:
        rc, out, err, tb = run_cli(["verify", "--config", cfg, "--json"], capsys)
    finally:
        node.start()
    assert not tb, tb
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "s1" in lines[0], err
    assert PW not in out + err


def test_status_is_not_ready_when_a_primary_url_points_at_a_standby(env, capsys, tmp_path):
    """s0's primary and replica URLs swapped (a stale config after a failover): every
    write to s0 fails, so `status` must not say `ready: yes` and exit 0 (its `.ready`
    is the readiness check of a web app)."""
    dev, _ = env
    data = base_config(dev)
    s0 = data["shards"][0]
    s0["primary"], s0["replicas"] = s0["replicas"][0], [s0["primary"]]
    cfg = write(tmp_path / "swapped.toml", data)
    with shardkit.Cluster.from_config(cfg) as cluster:
        key = next(k for k in range(100) if cluster.shard_for(Thing, k) == "s0")
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s, pytest.raises(sqlalchemy.exc.DBAPIError, match="read-only"):
            s.add(Thing(id=key, v="w"))
            s.commit()
    rc, out, err, tb = run_cli(["status", "--config", cfg, "--json"], capsys)
    assert not tb, tb
    data = json.loads(out)
    primary = {n["node"]: n for s in data["shards"] for n in s["nodes"]}["s0/primary"]
    assert primary["in_recovery"] is True
    assert (rc, data["ready"]) == (1, False), (rc, data["ready"], primary)


def test_a_busy_replica_pool_does_not_get_the_replica_banned(env):
    """Read-your-writes asks the replica whether it has replayed the session's token; when
    this process's own pool for that replica is momentarily exhausted, the replica is not
    at fault: the read may go to the primary, but the replica must not be banned (a ban
    takes it away from every session of the process for `ban_seconds`)."""
    dev, _ = env
    data = base_config(dev, replicas={"poll_interval": 5.0, "ban_seconds": 30.0})
    data["shards"][0]["replicas"] = [{"url": data["shards"][0]["replicas"][0],
                                      "pool": {"size": 1, "max_overflow": 0, "timeout": 0.2}}]
    with shardkit.Cluster.from_config(data) as cluster:
        truncate(cluster)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        key = next(k for k in range(100) if cluster.shard_for(Thing, k) == "s0")
        cluster.start_monitor()          # polled now; the next poll is 5 s away
        with Session() as a:
            a.add(Thing(id=key, v="tok"))
            a.commit()
            token = a.consistency_token()
        held = cluster.engine("s0", "replica", 0).connect()    # the replica's only connection
        try:
            with Session(consistency_token=token) as b:
                assert b.execute(select(Thing.v).where(Thing.id == key)).scalar() == "tok"
        finally:
            held.close()
        r0 = {n["node"]: n for n in cluster.health().nodes}["s0/r0"]
        assert r0["up"] is True
        assert r0["ban_reason"] is None, r0
        truncate(cluster)


def test_verify_reports_thousands_of_misplaced_rows_of_a_wide_primary_key(env, capsys, tmp_path):
    """10,000 rows planted on a shard that owns no bucket, in a table whose primary key
    has 7 columns: verify still reports them (exit 1, 10,000 misplaced) rather than
    failing to build its duplicate check."""
    dev, _ = env
    data = base_config(dev)
    data["shards"][0]["buckets"] = ["0-1023"]
    data["shards"][1]["buckets"] = []
    data["groups"] = {"w": {"tables": {"wide": "id"}}}
    cfg = write(tmp_path / "wide.toml", data)
    with shardkit.Cluster.from_config(cfg) as cluster:
        for s in cluster.shard_names:
            with cluster.primary(s).begin() as c:
                c.execute(text("DROP TABLE IF EXISTS wide; CREATE TABLE wide (id bigint, c1 int, c2 int, "
                               "c3 int, c4 int, c5 int, c6 int, PRIMARY KEY (id, c1, c2, c3, c4, c5, c6))"))
        with cluster.primary("s1").begin() as c:
            c.execute(text("INSERT INTO wide SELECT g, 0, 0, 0, 0, 0, 0 FROM generate_series(1, 10000) g"))
        try:
            rc, out, err, tb = run_cli(["verify", "--config", cfg, "--json"], capsys)
            assert not tb, tb
            assert rc == 1, err
            rep = json.loads(out)
            by = {(t["table"], t["shard"]): t for t in rep["tables"]}
            assert by[("wide", "s1")]["misplaced"] == {"s0": 10000} and by[("wide", "s1")]["duplicates"] == 0
        finally:
            for s in cluster.shard_names:
                with cluster.primary(s).begin() as c:
                    c.execute(text("DROP TABLE wide"))


def test_a_percent_encoded_env_password_full_of_url_characters(env, capsys, caplog, monkeypatch):
    """A `${ENV}` password with spaces, quotes, @ : / % ? # & = and a backslash,
    percent-encoded in the variable as the README says: the engines and the health
    monitor both log in (`status` all up, exit 0), and neither the password nor its
    encoded form is printed, logged or in a repr."""
    from urllib.parse import quote

    dev, tmp = env
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SKT_NASTY_PW", quote(NASTY_PW, safe=""))
    data = base_config(dev)
    for s in data["shards"]:
        s["primary"] = s["primary"].replace("://shardkit@", "://pwnasty:${SKT_NASTY_PW}@")
        s["replicas"] = [r.replace("://shardkit@", "://pwnasty:${SKT_NASTY_PW}@") for r in s["replicas"]]
    cfg = write(tmp / "nasty.toml", data)
    with shardkit.Cluster.from_config(cfg) as cluster:
        with cluster.engine("s1", "replica", 0).connect() as c:
            assert c.execute(text("SELECT current_user")).scalar() == "pwnasty"
        reprs = [repr(cluster), repr(cluster.config), repr(cluster.engine("s1", "replica", 0))]
    rc, out, err, tb = run_cli(["-v", "status", "--config", cfg, "--json"], capsys)
    assert not tb, tb
    data = json.loads(out)
    assert rc == 0 and all(n["up"] for s in data["shards"] for n in s["nodes"]), out
    blob = "\n".join([out, err, caplog.text, *reprs, *(str(r.args) for r in caplog.records)])
    for form in (NASTY_PW, quote(NASTY_PW, safe=""), "p@ss'w"):
        assert form not in blob


def test_max_connections_precedence_node_over_shard_over_global(env):
    """`max_connections` follows the same precedence as the other pool settings: a
    node's own cap beats its shard's, which beats the global one; the cap lowers
    size + overflow, also an unlimited overflow (-1)."""
    dev, _ = env
    data = base_config(dev, pool={"size": 8, "max_overflow": -1, "max_connections": 10})
    s1 = data["shards"][1]
    s1["pool"] = {"max_connections": 2}
    s1["primary_pool"] = {"max_connections": 6, "size": 4}
    with shardkit.Cluster.from_config(data) as cluster:
        def limits(shard, role):
            p = cluster.engine(shard, role, 0).pool
            return p.size(), p._max_overflow

        assert limits("s0", "primary") == (8, 2)     # global: 8 + 2 = 10
        assert limits("s0", "replica") == (8, 2)
        assert limits("s1", "primary") == (4, 2)     # node: 4 + 2 = 6
        assert limits("s1", "replica") == (2, 0)     # shard: 2
        eng = cluster.engine("s1", "replica", 0)
        held = [eng.connect(), eng.connect()]
        try:
            with pytest.raises(sqlalchemy.exc.TimeoutError, match="^node s1/r0: "):
                eng.pool._timeout = 0.2
                eng.connect()
        finally:
            for c in held:
                c.close()


def test_verify_with_a_catalog_finds_rows_planted_past_the_guard(shardkit_module_cluster_factory, capsys, tmp_path):
    """With a catalog (`rebalance init`: the guard on every shard), rows planted on the
    wrong shard by a session that bypasses the guard (`SET shardkit.mover = on`) and a
    NULL key are reported against the catalog's map: exit 1, the map version shown;
    clean again (exit 0) once they are deleted."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    data = base_config(dev, catalog={"url": dev.create_catalog()})
    data["groups"] = {"c": {"tables": {"cat_things": "id"}}}
    cfg = write(tmp_path / "catalog.toml", data)
    for s in dev.shards:
        with psycopg.connect(s.primary.dsn, autocommit=True) as c:
            c.execute("CREATE TABLE cat_things (uid bigint PRIMARY KEY, id bigint, v text)")
    rc, out, err, tb = run_cli(["rebalance", "init", "--config", cfg], capsys)
    assert rc == 0, err + tb
    with shardkit.Cluster.from_config(cfg, follow_map=False) as cluster:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        with Session() as s:
            s.execute(sqlalchemy.insert(sqlalchemy.table("cat_things", sqlalchemy.column("uid"),
                                                         sqlalchemy.column("id"), sqlalchemy.column("v"))),
                      [{"uid": k, "id": k, "v": "ok"} for k in range(40)])
            s.commit()
        stray = next(k for k in range(1000, 2000) if cluster.shard_for("cat_things", k) == "s0")
        with cluster.primary("s1").begin() as c:
            with pytest.raises(shardkit.NotOwned):        # the guard refuses it ...
                with c.begin_nested():
                    c.execute(text("INSERT INTO cat_things VALUES (-1, :k, 'x')"), {"k": stray})
            c.execute(text("SET LOCAL shardkit.mover = on"))   # ... unless bypassed
            c.execute(text("INSERT INTO cat_things VALUES (-1, :k, 'stray'), (-2, NULL, 'null')"), {"k": stray})
        rc, out, err, tb = run_cli(["verify", "--config", cfg, "--json"], capsys)
        assert not tb, tb
        rep = json.loads(out)
        by = {(t["table"], t["shard"]): t for t in rep["tables"]}
        assert rc == 1 and rep["ok"] is False and rep["map_version"] == 1, rep
        assert by[("cat_things", "s1")]["misplaced"] == {"s0": 1, "(null key)": 1}, rep
        assert sum(t["rows"] for t in rep["tables"]) == 42 and rep["ownership"] == []
        with cluster.primary("s1").begin() as c:
            c.execute(text("SET LOCAL shardkit.mover = on"))
            c.execute(text("DELETE FROM cat_things WHERE v IN ('stray', 'null')"))
        rc, out, err, tb = run_cli(["verify", "--config", cfg], capsys)
        assert rc == 0 and "verify: clean" in out, out + err + tb
