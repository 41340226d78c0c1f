"""shardkit verify finds rows on the wrong shard and duplicates, with and without the SQL hash."""

import json

import inproc_cli
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

import shardkit
from models import Base, Event, User, groups_config

pytestmark = pytest.mark.integration


def run(cfg_path):
    """``shardkit verify --json``, in this process (``inproc_cli``; the command runs as a
    process in test_operator_walkthrough)."""
    r = inproc_cli.run(["verify", "--config", str(cfg_path), "--json"])
    return r.returncode, json.loads(r.stdout)


@pytest.mark.parametrize("with_sql", [True, False])
def test_verify_finds_misplaced_and_duplicate_rows(shardkit_module_cluster_factory, tmp_path, with_sql):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    names = [s.name for s in dev.shards]
    cfg_path = tmp_path / "shardkit.toml"
    dev.write_config(cfg_path, groups_config(names))
    cluster = shardkit.Cluster.from_config(cfg_path)
    for s in names:
        with cluster.primary(s).begin() as c:
            Base.metadata.create_all(c)
            if with_sql:
                shardkit.install_sql(c)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add_all(User(id=k, name="u") for k in range(300))
        s.add_all(Event(id=k, payload="p") for k in (5, 1500, 9000))
        s.commit()
    code, rep = run(cfg_path)
    assert code == 0 and rep["ok"], rep
    users = [t for t in rep["tables"] if t["table"] == "users"]
    assert sum(t["rows"] for t in users) == 300
    assert {t["method"] for t in users} == {"sql" if with_sql else "python"}

    # A row written straight to the wrong shard, and a copy of a row on a second shard.
    k = 7
    owner = cluster.shard_for(User, k)
    wrong = next(s for s in names if s != owner)
    with cluster.primary(wrong).begin() as c:
        c.execute(text("INSERT INTO users (id, name) VALUES (:k, 'dup')"), {"k": k})
        stray = next(i for i in range(1000, 2000) if cluster.shard_for(User, i) != wrong)
        c.execute(text("INSERT INTO users (id, name) VALUES (:k, 'stray')"), {"k": stray})
        c.execute(text("INSERT INTO events (id, payload) VALUES (9999, 'x')"))  # range group
    code, rep = run(cfg_path)
    assert code == 1 and not rep["ok"]
    bad = {(t["table"], t["shard"]): t for t in rep["tables"] if t["misplaced"]}
    u = bad[("users", wrong)]
    assert sum(u["misplaced"].values()) == 2 and u["duplicates"] == 1
    assert u["misplaced"].get(owner, 0) >= 1
    # Duplicates are looked for among the first `sample` misplaced rows: the report says so.
    assert u["duplicates_checked"] == 2
    from shardkit.verify import verify
    line = next(ln for ln in verify(cluster, sample=1).render().splitlines()
                if ln.startswith(wrong) and " users " in ln)
    assert "of the 1 looked for (of 2) also present on their owner" in line, line
    line = next(ln for ln in verify(cluster, sample=0).render().splitlines()
                if ln.startswith(wrong) and " users " in ln)
    assert "2 misplaced" in line and "not looked for on their owner" in line, line
    ev_shard = wrong
    if ev_shard != cluster.shard_for(Event, 9999):
        assert ("events", ev_shard) in bad
    cluster.dispose()
