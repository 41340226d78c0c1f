"""Alembic environment: one revision chain, applied to every shard's primary.

Each shard keeps its own ``alembic_version`` table, so shards can be told
apart when one of them fails; ``shardkit migrate check`` reports shards at
different revisions or with different schemas.

Further options of Alembic's ``context.configure()`` (``include_object``,
``target_metadata``, ``compare_server_default`` ...) go to every shard as keyword
arguments: ``run_migrations(context, include_object=...)``.
"""

from logging.config import fileConfig

from alembic import context

from shardkit.migrate import run_migrations

# alembic.ini's logging ("Running upgrade a1 -> a2"), as Alembic's own env.py sets it up;
# loggers made before it (shardkit's) keep working.
if context.config.config_file_name and context.config.file_config.has_section("loggers"):
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

run_migrations(context)
