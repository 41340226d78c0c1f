"""shardkit: sharding and replica routing for SQLAlchemy on PostgreSQL.

    import shardkit
    from sqlalchemy.orm import sessionmaker

    cluster = shardkit.Cluster.from_config("shardkit.toml")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._cluster import Cluster
    from ._config import ClusterConfig, load_config, mask_url
    from ._hashing import bucket_for, canonical_bytes, hash_key
    from ._routing import Route
    from ._scope import current_scope, scope
    from ._session import ShardedSession, run_transaction
    from ._sql import install as install_sql
    from ._sql import uninstall as uninstall_sql
    from ._strategies import CustomStrategy, HashStrategy, ListStrategy, RangeStrategy, Strategy
    from .errors import (
        CommitError,
        ConfigurationError,
        CrossShardWriteError,
        DevClusterError,
        NoShardForKey,
        NotOwned,
        RebalanceError,
        RoutingError,
        ScatterError,
        ScatterRefused,
        ShardKeyError,
        ShardkitError,
        ShardUnavailable,
    )

# The public names are imported on first use (PEP 562): a process that
# imports only a submodule (the ``shardkit`` command, a shard's Alembic running
# ``shardkit.migrate``) does not load the session and routing code, nor the ORM.
_LAZY = {
    "Cluster": ("._cluster", "Cluster"),
    "ClusterConfig": ("._config", "ClusterConfig"),
    "load_config": ("._config", "load_config"),
    "mask_url": ("._config", "mask_url"),
    "bucket_for": ("._hashing", "bucket_for"),
    "canonical_bytes": ("._hashing", "canonical_bytes"),
    "hash_key": ("._hashing", "hash_key"),
    "Route": ("._routing", "Route"),
    "current_scope": ("._scope", "current_scope"),
    "scope": ("._scope", "scope"),
    "ShardedSession": ("._session", "ShardedSession"),
    "run_transaction": ("._session", "run_transaction"),
    "install_sql": ("._sql", "install"),
    "uninstall_sql": ("._sql", "uninstall"),
    "CustomStrategy": ("._strategies", "CustomStrategy"),
    "HashStrategy": ("._strategies", "HashStrategy"),
    "ListStrategy": ("._strategies", "ListStrategy"),
    "RangeStrategy": ("._strategies", "RangeStrategy"),
    "Strategy": ("._strategies", "Strategy"),
    "CommitError": (".errors", "CommitError"),
    "ConfigurationError": (".errors", "ConfigurationError"),
    "CrossShardWriteError": (".errors", "CrossShardWriteError"),
    "DevClusterError": (".errors", "DevClusterError"),
    "NoShardForKey": (".errors", "NoShardForKey"),
    "NotOwned": (".errors", "NotOwned"),
    "RebalanceError": (".errors", "RebalanceError"),
    "RoutingError": (".errors", "RoutingError"),
    "ScatterError": (".errors", "ScatterError"),
    "ScatterRefused": (".errors", "ScatterRefused"),
    "ShardKeyError": (".errors", "ShardKeyError"),
    "ShardkitError": (".errors", "ShardkitError"),
    "ShardUnavailable": (".errors", "ShardUnavailable"),
}


def __getattr__(name: str) -> _typing.Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module, __name__), attr)
    globals()[name] = value   # looked up here from now on, without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "ClusterConfig",
    "CommitError",
    "ConfigurationError",
    "CrossShardWriteError",
    "CustomStrategy",
    "DevClusterError",
    "HashStrategy",
    "ListStrategy",
    "NoShardForKey",
    "NotOwned",
    "RangeStrategy",
    "RebalanceError",
    "Route",
    "RoutingError",
    "ScatterError",
    "ScatterRefused",
    "ShardKeyError",
    "ShardUnavailable",
    "ShardedSession",
    "ShardkitError",
    "Strategy",
    "bucket_for",
    "canonical_bytes",
    "current_scope",
    "hash_key",
    "install_sql",
    "load_config",
    "mask_url",
    "run_transaction",
    "scope",
    "uninstall_sql",
]
