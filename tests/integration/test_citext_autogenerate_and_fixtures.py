"""The citext shard-key refusal, autogenerate's one
diff across shards, and the test plugin's documented fixtures."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.operations import ops
from sqlalchemy.dialects.postgresql import CITEXT

import shardkit
import shardkit.testing
from shardkit import ConfigurationError
from shardkit.migrate import _OneDiff


class _CitextOnPostgres(sa.TypeDecorator):
    """Text elsewhere, citext on PostgreSQL (the implementation chosen per dialect)."""
    impl = sa.String
    cache_ok = True

    def load_dialect_impl(self, dialect):
        return dialect.type_descriptor(CITEXT() if dialect.name == "postgresql" else sa.String())


class _CitextDecorator(sa.TypeDecorator):
    impl = CITEXT
    cache_ok = True


def _members(type_):
    md = sa.MetaData()
    sa.Table("members", md, sa.Column("email", type_, primary_key=True))
    return md


def test_citext_key_given_per_dialect_is_refused_and_text_on_postgres_is_not(shardkit_dev_cluster):
    """A model portable to other databases declares its citext column as a variant
    (String().with_variant(CITEXT(), "postgresql")) or a TypeDecorator choosing citext in
    load_dialect_impl: on PostgreSQL the column is citext all the same ('Ada' = 'ada',
    hashed apart).  Those used to pass; a citext decorator whose PostgreSQL variant is
    text was refused though PostgreSQL gets text."""
    cfg = {**shardkit_dev_cluster.config_dict(),
           "groups": {"m": {"strategy": "hash", "tables": {"members": "email"}}}}
    for type_ in (sa.String().with_variant(CITEXT(), "postgresql"), _CitextOnPostgres()):
        with pytest.raises(ConfigurationError) as ei:
            shardkit.Cluster.from_config(cfg, metadata=_members(type_))
        assert "members.email is citext" in str(ei.value), type_
    cluster = shardkit.Cluster.from_config(
        cfg, metadata=_members(_CitextDecorator().with_variant(sa.Text(), "postgresql")))
    try:
        with cluster.primary(cluster.shard_names[0]).connect() as c:
            assert c.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        cluster.dispose()


def _script(order):
    up = ops.UpgradeOps([ops.DropTableOp(n) for n in order] +
                        [ops.ModifyTableOps("gadgets", [ops.DropColumnOp("gadgets", c) for c in order])])
    down = ops.DowngradeOps([ops.ModifyTableOps("gadgets", [
        ops.AddColumnOp("gadgets", sa.Column(c, sa.Text())) for c in order])])
    return up, down


def test_autogenerate_keeps_one_diff_when_shards_list_the_same_changes_in_another_order():
    """Alembic lists tables and columns the models no longer have in the order it meets
    them (a set filled in the database's catalog order): two shards with the same schema,
    whose tables were created in another order (one restored from a dump), give the same
    operations in another order.  That used to be refused as shards that "compare
    differently"; a real difference still is."""
    hook = _OneDiff()
    up0, down0 = _script(["old_a", "old_b", "old_c"])
    script = ops.MigrationScript("r1", up0, down0)
    hook.shard = "s0"
    hook(None, None, [script])
    up1, down1 = _script(["old_c", "old_a", "old_b"])
    script._upgrade_ops.append(up1)
    script._downgrade_ops.append(down1)
    hook.shard = "s1"
    hook(None, None, [script])
    assert script.upgrade_ops is up0 and script.downgrade_ops is down0
    up2, down2 = _script(["old_a", "old_b"])
    script._upgrade_ops.append(up2)
    script._downgrade_ops.append(down2)
    hook.shard = "s2"
    with pytest.raises(shardkit.ShardkitError, match="shard s2's schema compares with the models differently"):
        hook(None, None, [script])


def test_testing_package_names_every_fixture_of_its_plugin():
    """shardkit.testing's documentation listed two session fixtures, not the module-scoped
    factory the plugin also provides."""
    assert "shardkit_module_cluster_factory`` (module)" in shardkit.testing.__doc__
