"""Real credentials in shardkit.toml: a password with URL-special and non-ASCII
characters from ${ENV}, Unix-socket and multi-host URLs (as SQLAlchemy writes them:
``?host=/dir``, ``?host=h1:p1&host=h2:p2``), a catalog on a socket; the cluster
connects with exactly those settings, and the password shows nowhere."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy import create_engine, text

import shardkit
from shardkit import ConfigurationError, cli, load_config
from shardkit._config import conninfo

PW = "Zq9@Kx:/?#%+ é&y=1"   # every URL-special character, a space and a non-ASCII one
FRAGMENTS = ("Zq9", "Kx:", "Kx%3A", "é&y")


def _leaks(s: str) -> list[str]:
    return [f for f in FRAGMENTS if f in s]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secured(shardkit_module_cluster_factory):
    """A 2-shard cluster whose role has password PW (scram-sha-256 over TCP and the
    socket), s0's server also listening on a Unix socket; a users table with rows; a
    catalog database on s0's server."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=16)
    groups = {"groups": {"users": {"tables": {"users": "id"}}}}
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        with eng.begin() as c:
            c.execute(text("CREATE TABLE users (id bigint PRIMARY KEY, name text)"))
        eng.dispose()
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **groups})
    for i in range(40):
        with cluster.primary(cluster.shard_for("users", i)).begin() as c:
            c.execute(text("INSERT INTO users VALUES (:i, 'u')"), {"i": i})
    cluster.dispose()
    dev.create_catalog()
    sock = tempfile.mkdtemp(prefix="sksock", dir="/tmp")   # short: socket paths are limited
    owner = os.stat(dev.shards[0].primary.datadir).st_uid
    if os.geteuid() == 0:
        os.chown(sock, owner, -1)
    for shard in dev.shards:
        node = shard.primary
        with psycopg.connect(node.dsn, autocommit=True) as c:
            c.execute("SET password_encryption = 'scram-sha-256'")
            c.execute(psycopg.sql.SQL("ALTER ROLE shardkit PASSWORD {}").format(psycopg.sql.Literal(PW)))
            if shard is dev.shards[0]:
                c.execute(psycopg.sql.SQL("ALTER SYSTEM SET unix_socket_directories = {}").format(
                    psycopg.sql.Literal(sock)))
        (node.datadir / "pg_hba.conf").write_text(
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication all 127.0.0.1/32 trust\n")
        node.stop()
        node.start()
    try:
        yield dev, sock
    finally:
        shutil.rmtree(sock, ignore_errors=True)


def test_socket_and_multihost_urls_connect_with_a_special_password_that_shows_nowhere(
        secured, tmp_path, monkeypatch, capsys, caplog):
    """s0 and the catalog on a Unix socket (``@/db?host=/dir&port=N``), s1 by two hosts, the
    first one down (``?host=h:dead&host=h:port``): SQLAlchemy's URL forms for both, which
    libpq takes.  status, rebalance init and a move (the mover and the map follower
    connect with psycopg directly) all reach those servers; no output, log record (SQLAlchemy's
    echo included) or journal row holds the password."""
    dev, sock = secured
    p0, p1 = dev.shards[0].primary.port, dev.shards[1].primary.port
    path = tmp_path / "shardkit.toml"
    path.write_text(
        "bucket_count = 16\n"
        "[[shards]]\n"
        'name = "s0"\n'
        f'primary = "postgresql+psycopg://shardkit:${{SK_PW}}@/shardkit?host={sock}&port={p0}"\n'
        "[[shards]]\n"
        'name = "s1"\n'
        f'primary = "postgresql+psycopg://shardkit:${{SK_PW}}@/shardkit?host=127.0.0.1:{_free_port()}'
        f'&host=127.0.0.1:{p1}"\n'
        "[catalog]\n"
        f'url = "postgresql+psycopg://shardkit:${{SK_PW}}@/shardkit_catalog?host={sock}&port={p0}"\n'
        "[groups.users]\n"
        'tables = { users = "id" }\n')
    monkeypatch.setenv("SK_PW", quote(PW, safe=""))
    caplog.set_level(logging.DEBUG)
    printed = ""
    for argv in (["status", "--json"], ["rebalance", "init"],
                 ["rebalance", "apply", "--drain", "s1", "--grace", "0"], ["rebalance", "status"]):
        rc = cli.main([*argv, "--config", str(path)])
        out = capsys.readouterr()
        printed += out.out + out.err
        assert rc == 0, (argv, out.out[-2000:], out.err[-2000:])
        if argv == ["status", "--json"]:
            nodes = [n for s in json.loads(out.out)["shards"] for n in s["nodes"]]
            assert nodes and all(n["up"] for n in nodes), nodes
    cluster = shardkit.Cluster.from_config(path)
    try:
        assert cluster.map_version is not None and set(cluster.config.bucket_map) == {"s0"}
        with cluster.primary("s0").connect() as c:
            assert c.execute(text("SELECT count(*) FROM users")).scalar_one() == 40
            # s0's engine came through the socket: the server sees no client address.
            assert c.execute(text("SELECT inet_client_addr()")).scalar_one() is None
        with cluster.catalog.engine.connect() as c:
            journal = "\n".join(c.execute(text(
                "SELECT row_to_json(j)::text FROM shardkit_catalog.journal j "
                "UNION ALL SELECT row_to_json(m)::text FROM shardkit_catalog.moves m")).scalars())
        shown = [repr(cluster), repr(cluster.config), str(cluster.health()), str(cluster.pool_stats())]
    finally:
        cluster.dispose()
    assert "drain" in journal
    assert not _leaks(printed), printed[-3000:]
    assert not _leaks(caplog.text), [r.getMessage() for r in caplog.records if _leaks(r.getMessage())][:3]
    assert not _leaks(journal) and not _leaks("\n".join(shown))


def test_conninfo_is_what_the_engine_connects_with():
    """The mover and the map follower connect with ``conninfo(url)``, the engines with
    SQLAlchemy's connect arguments: the same server, user and password for every URL
    form SQLAlchemy reads (multi-host, socket, an empty password left to libpq)."""
    for raw in ("postgresql+psycopg://app:pw@/shop?host=/run/pg&port=5433",
                "postgresql+psycopg://app:pw@/shop?host=h1:6432&host=h2:6433&target_session_attrs=read-write",
                "postgresql+psycopg://app:pw@/shop?host=h1,h2&port=6432,6433",
                "postgresql+psycopg://app:@db0:5432/shop",
                "postgresql+psycopg://app:p%40ss%20w@[::1]:5432/shop?sslmode=verify-full&sslrootcert=/ca.pem"):
        url = load_config({"shards": [{"name": "s0", "primary": raw}], "bucket_count": 4}).shards[0].primary
        _, engine_args = url.get_dialect()().create_connect_args(url)
        engine_args.pop("context", None)
        got = psycopg.conninfo.conninfo_to_dict(conninfo(url))
        assert got == {k: str(v) for k, v in engine_args.items()}, (raw, got, engine_args)


@pytest.mark.parametrize("password", ["Qm7&Tk4w=Zr8", "Qm7&Tk4w"])
def test_a_query_string_password_with_an_unencoded_ampersand_is_refused_without_its_tail(password):
    """``?password=${PW}`` with a generated password holding '&': the query string splits
    there, and the refusal of the tail as an unknown libpq parameter named it."""
    raw = "postgresql+psycopg://app@db0.example/shop?sslmode=require&password=${PW}"
    with pytest.raises(ConfigurationError) as ei:
        load_config({"shards": [{"name": "s0", "primary": raw}]}, env={"PW": password})
    assert "Tk4w" not in str(ei.value) and "Zr8" not in str(ei.value), str(ei.value)
    assert "&" in str(ei.value) and "percent-encode" in str(ei.value), str(ei.value)
    # Encoded, it loads, whole.
    url = load_config({"shards": [{"name": "s0", "primary": raw}]},
                      env={"PW": quote(password, safe="")}).shards[0].primary
    assert url.password == password and dict(url.query) == {"sslmode": "require"}


def test_an_empty_variable_in_a_url_is_refused_naming_it():
    """``app:${DB_PASSWORD}@db0/shop`` with DB_PASSWORD set but empty (a CI secret that is
    missing): the URL would have no password (libpq then falls back to PGPASSWORD or
    ~/.pgpass, or fails with 'no password supplied' at the first query), an empty host or
    database is refused without naming the variable.  Say which variable is empty."""
    for raw in ("postgresql+psycopg://app:${DB_PASSWORD}@db0/shop",
                "postgresql+psycopg://app:pw@${DB_HOST}/shop",
                "${DATABASE_URL}"):
        env = {"DB_PASSWORD": "", "DB_HOST": "", "DATABASE_URL": ""}
        with pytest.raises(ConfigurationError) as ei:
            load_config({"shards": [{"name": "s0", "primary": raw}]}, env=env)
        var = raw.split("${")[1].split("}")[0]
        assert ei.value.field == "shards[0].primary" and var in str(ei.value) and "empty" in str(ei.value), \
            str(ei.value)
    # An empty value asked for (a default of nothing) stays allowed: libpq finds the password.
    url = load_config({"shards": [{"name": "s0", "primary": "postgresql+psycopg://app:${PW:-}@db0/shop"}]},
                      env={}).shards[0].primary
    assert not url.password
    # Outside URLs an empty value is a value, as documented.
    assert load_config({"name": "${N}", "shards": [{"name": "s0", "primary": "postgresql+psycopg://a@h/d"}]},
                       env={"N": ""}).name == ""


def test_journal_messages_keep_words_that_equal_the_password(monkeypatch):
    """shardkit.compose.toml's default password is ``shardkit``, also the role, the schema
    and the command: a move's error (journal row, `rebalance status`, the raised
    RebalanceError) had every "shardkit" turned into "***" (`*** rebalance resume 1`,
    relation ***.ownership).  A password is masked where a URL or a connection string would
    carry it, not wherever its letters occur."""
    from pathlib import Path

    from shardkit.rebalance import mask_secrets

    compose = Path(__file__).resolve().parents[2] / "shardkit.compose.toml"
    monkeypatch.delenv("SHARDKIT_PASSWORD", raising=False)
    cluster = shardkit.Cluster.from_config(compose, follow_map=False)
    try:
        assert cluster.config.shards[0].primary.password == "shardkit"
        hint = ('relation "shardkit.ownership" does not exist; for user "shardkit" run '
                "`shardkit rebalance resume 1`")
        assert mask_secrets(hint, cluster) == hint
        leaked = ("Could not parse SQLAlchemy URL from string "
                  "'postgresql+psycopg://shardkit:shardkit@127.0.0.1:15432/shardkit'; "
                  "dsn: host=127.0.0.1 user=shardkit password=shardkit dbname=shardkit; "
                  "password='shardkit' ?password=shardkit; {'password': 'shardkit'}")
        masked = mask_secrets(leaked, cluster)
        assert masked.count("shardkit") == leaked.count("shardkit") - 5 and masked.count("***") == 5, masked
    finally:
        cluster.dispose()
