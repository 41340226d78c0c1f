"""shardkit: sharding and replica routing for SQLAlchemy on PostgreSQL.

    import shardkit
    from sqlalchemy.orm import sessionmaker

    cluster = shardkit.Cluster.from_config("shardkit.toml")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
"""

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
