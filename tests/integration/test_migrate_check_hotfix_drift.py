"""`shardkit migrate check` against an operator's hotfix on one shard: psql on s1
changes an index, a default, a type, a collation, a trigger, row-level security, a
partition ...  `check` must name the shard and the object and exit 1 (README, "Alembic on
every shard"); a comment is not drift.  The ownership guard made ENABLE REPLICA (it then
fires only under session_replication_role = replica, so never for the application) is
as unguarded as a disabled one, for `check` and for a move's checks."""

from __future__ import annotations

import json

import pytest
from test_migrate_failures import BUCKETS, HASH, world  # noqa: F401 - the same fixtures

from shardkit import migrate, rebalance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    """test_migrate_failures's cluster with the 2 shards this module uses."""
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)

SCHEMA = """
CREATE TABLE things (id bigint PRIMARY KEY, v integer DEFAULT 0 NOT NULL, name text,
                     parent bigint);
CREATE TABLE kinds (id bigint PRIMARY KEY, label text);
ALTER TABLE things ADD CONSTRAINT things_parent_fk FOREIGN KEY (parent) REFERENCES kinds (id);
CREATE INDEX things_v ON things (v);
CREATE SEQUENCE ticket_seq;
CREATE VIEW big_things AS SELECT id FROM things WHERE id > 10;
CREATE FUNCTION twice(x integer) RETURNS integer LANGUAGE sql AS 'SELECT 2 * x';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
CREATE TRIGGER t_base BEFORE UPDATE ON kinds FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TABLE events (at date NOT NULL, n integer) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 (at date NOT NULL, n integer);
COMMENT ON TABLE things IS 'the things';
CREATE TABLE ev (id bigint, tenant bigint NOT NULL, y int NOT NULL, PRIMARY KEY (id, y)) PARTITION BY LIST (y);
CREATE TABLE ev_1 PARTITION OF ev FOR VALUES IN (1);
CREATE TABLE ev_2 PARTITION OF ev FOR VALUES IN (2);
"""
GROUPS = {**HASH, "ev": {"strategy": "hash", "tables": {"ev": "tenant"}}}

HOTFIXES = {   # name: (the hotfix on s1, its undo, the object the report must name)
    "extra index": ("CREATE INDEX things_name ON things (name)", "DROP INDEX things_name", "things_name"),
    "dropped index": ("DROP INDEX things_v", "CREATE INDEX things_v ON things (v)", "things_v"),
    "default": ("ALTER TABLE things ALTER v SET DEFAULT 1", "ALTER TABLE things ALTER v SET DEFAULT 0", "things"),
    "not null dropped": ("ALTER TABLE things ALTER v DROP NOT NULL", "ALTER TABLE things ALTER v SET NOT NULL",
                         "things"),
    "check added": ("ALTER TABLE things ADD CONSTRAINT v_pos CHECK (v >= 0)",
                    "ALTER TABLE things DROP CONSTRAINT v_pos", "v_pos"),
    "int to bigint": ("ALTER TABLE things ALTER v TYPE bigint", "ALTER TABLE things ALTER v TYPE integer", "things"),
    "collation": ('ALTER TABLE things ALTER name TYPE text COLLATE "C"',
                  'ALTER TABLE things ALTER name TYPE text COLLATE "default"', "things"),
    "trigger added": ("CREATE TRIGGER t_touch BEFORE INSERT ON things FOR EACH ROW EXECUTE FUNCTION touch()",
                      "DROP TRIGGER t_touch ON things", "t_touch"),
    "trigger disabled": ("ALTER TABLE kinds DISABLE TRIGGER t_base", "ALTER TABLE kinds ENABLE TRIGGER t_base",
                         "t_base"),
    "guard disabled": ("ALTER TABLE things DISABLE TRIGGER shardkit_guard",
                       "ALTER TABLE things ENABLE TRIGGER shardkit_guard", "guard of things is disabled"),
    "guard replica-only": ("ALTER TABLE things ENABLE REPLICA TRIGGER shardkit_guard",
                           "ALTER TABLE things ENABLE TRIGGER shardkit_guard", "guard of things is disabled"),
    "partition's guard disabled": ("ALTER TABLE ev_2 DISABLE TRIGGER shardkit_guard",
                                   "ALTER TABLE ev_2 ENABLE TRIGGER shardkit_guard", "guard of ev is disabled"),
    "sequence increment": ("ALTER SEQUENCE ticket_seq INCREMENT BY 10", "ALTER SEQUENCE ticket_seq INCREMENT BY 1",
                           "ticket_seq"),
    "extra table": ("CREATE TABLE scratch (id int)", "DROP TABLE scratch", "scratch"),
    "view differs": ("CREATE OR REPLACE VIEW big_things AS SELECT id FROM things WHERE id > 20",
                     "CREATE OR REPLACE VIEW big_things AS SELECT id FROM things WHERE id > 10", "big_things"),
    "function differs": ("CREATE OR REPLACE FUNCTION twice(x integer) RETURNS integer LANGUAGE sql AS 'SELECT 3 * x'",
                         "CREATE OR REPLACE FUNCTION twice(x integer) RETURNS integer LANGUAGE sql AS 'SELECT 2 * x'",
                         "twice"),
    "rls": ("ALTER TABLE things ENABLE ROW LEVEL SECURITY", "ALTER TABLE things DISABLE ROW LEVEL SECURITY", "things"),
    "unique added": ("ALTER TABLE things ADD CONSTRAINT things_name_uq UNIQUE (name)",
                     "ALTER TABLE things DROP CONSTRAINT things_name_uq", "things_name_uq"),
    "fk dropped": ("ALTER TABLE things DROP CONSTRAINT things_parent_fk",
                   "ALTER TABLE things ADD CONSTRAINT things_parent_fk FOREIGN KEY (parent) REFERENCES kinds (id)",
                   "things"),
    "comment": ("COMMENT ON TABLE things IS 'hotfixed'", "COMMENT ON TABLE things IS 'the things'", "things"),
    "partition attached": ("ALTER TABLE events ATTACH PARTITION events_2025 "
                           "FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
                           "ALTER TABLE events DETACH PARTITION events_2025", "events"),
}


#: What the README does not claim `check` compares (it says so): not asserted as drift.
NOT_COMPARED = {"sequence increment", "view differs", "function differs", "comment"}


def test_hotfixes_on_one_shard_are_drift_naming_shard_and_object(world):
    w = world(shards=2, groups=GROUPS, catalog=True)
    for i in range(2):
        w.sql(i, SCHEMA)
    rebalance.init(w.cluster)
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok
    missed = {}
    for name, (sql, undo, obj) in HOTFIXES.items():
        w.sql(1, sql)
        r = migrate.check(w.cluster, alembic_ini=w.ini)
        if name == "comment":
            assert r.ok, r.as_dict()
        elif name not in NOT_COMPARED and (
                r.ok or not any(d.startswith("s1: ") and obj in d for d in r.schema_differences)):
            missed[name] = r.schema_differences
        if name == "collation":   # the CLI too: exit 1, the line in --json
            c = w.cli("migrate", "check", "--json")
            out = json.loads(c.stdout)
            assert c.returncode == 1 and not out["ok"], c.stdout + c.stderr
            assert any(d.startswith("s1: things columns differ") and "text COLLATE pg_catalog." in d
                       for d in out["schema_differences"]), out
        w.sql(1, undo)
    assert missed == {}, missed
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok

    # A move checks the guard as PostgreSQL fires it: an ENABLE REPLICA guard captures
    # none of the writes made during the copy (lost on the target).
    w.sql(1, "ALTER TABLE things ENABLE REPLICA TRIGGER shardkit_guard")
    r = w.cli("rebalance", "apply", "--drain", "s1")
    assert r.returncode == 2 and "things on s1 have no ownership guard" in r.stderr, r.stdout + r.stderr
    # ... and what `check` says to run makes it fire again.
    w.rev("g1", None, "op.install_shardkit_guard()")
    assert w.cli("migrate", "upgrade").returncode == 0
    assert w.sql(1, "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'shardkit_guard' "
                    "AND tgrelid = 'things'::regclass") == [("O",)]
    # A partition's clone of the guard disabled: the partition's writes are as uncaptured.
    w.sql(1, "ALTER TABLE ev_2 DISABLE TRIGGER shardkit_guard")
    r = w.cli("rebalance", "apply", "--drain", "s1")
    assert r.returncode == 2 and "ev on s1 have no ownership guard" in r.stderr, r.stdout + r.stderr
