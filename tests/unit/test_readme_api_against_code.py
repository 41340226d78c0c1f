"""The README's Python API against the code, from the other side (no server).

test_docs_claims.py, test_docs_defaults_and_options.py and test_readme_reference.py check
that the names, keyword arguments, defaults and error attributes the README shows
exist.  These check what they leave out:

* ``ShardedSession`` takes ``Session``'s own arguments, as the API table says:
  ``query_cls=`` too (a custom legacy ``Query`` class), which was a ``TypeError``;
* the error tree drawn in ``shardkit.errors``' docstring is the README's (it lacked
  ``CommitError.prepared``);
* ``Strategy.unit_for_key()`` is what the table says of it for range and list groups
  (a slice number only when the map comes from a catalog, ``None`` otherwise);
* every method and attribute the API table names on ``Cluster``, ``ClusterConfig``
  and ``Route`` has a docstring (``help(cluster.node_url)`` must say it holds the
  password);
* a ``DevClusterError`` about one node names it in ``.node``.
"""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table
from sqlalchemy.ext.horizontal_shard import ShardedQuery
from sqlalchemy.orm import Query, registry, sessionmaker

import shardkit
import shardkit.errors as errors
from shardkit._config import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
API_TABLE = README.split("### The Python API at a glance", 1)[1].split("\n## ", 1)[0]
CONFIG = {
    "shards": [{"name": "s0", "primary": "postgresql+psycopg://app@db0.invalid/app"},
               {"name": "s1", "primary": "postgresql+psycopg://app@db1.invalid/app"}],
    "groups": {
        "users": {"tables": {"users": "id"}},
        "events": {"strategy": "range", "tables": {"events": "n"},
                   "ranges": [{"shard": "s0", "to": 100}, {"shard": "s1", "from": 100}]},
        "geo": {"strategy": "list", "tables": {"places": "region"},
                "values": {"s0": ["eu"], "s1": ["us"]}},
    },
}


def _api_row(start: str) -> str:
    rows = [line for line in API_TABLE.splitlines() if line.startswith("| `" + start)]
    assert len(rows) == 1
    return rows[0]


# -- ShardedSession takes Session's own arguments ------------------------------------------------


def test_a_session_takes_a_query_class_of_its_own():
    # API table: "besides `cluster=` and `Session`'s own arguments (not `bind=`/`binds=`...)";
    # query_cls= is one of them (and horizontal_shard.ShardedSession's), for a legacy
    # Query subclass with the application's own methods.
    assert "`Session`'s own arguments" in _api_row("ShardedSession")
    users = Table("users", MetaData(), Column("id", Integer, primary_key=True))

    class User:
        pass

    registry().map_imperatively(User, users)

    class AppQuery(ShardedQuery):
        def newest(self) -> AppQuery:
            return self.order_by(users.c.id.desc())

    cluster = shardkit.Cluster.from_config(CONFIG)
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, query_cls=AppQuery)
        with Session() as session:
            query = session.query(User)
            assert type(query) is AppQuery and isinstance(query.newest(), AppQuery)
        with shardkit.ShardedSession(cluster=cluster) as session:
            assert type(session.query(User)) is ShardedQuery   # the default, as before
        with shardkit.ShardedSession(cluster=cluster, query_cls=Query) as session:
            assert type(session.query(User)) is Query   # as horizontal_shard takes any
    finally:
        cluster.dispose()


# -- the error tree of errors.py's docstring -----------------------------------------------------


def _tree(text: str) -> dict[str, tuple[int, set[str]]]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([│ ]*)[├└]── (\w+)\s*(.*)$", line)
        if m:
            attrs = set(re.findall(r"(?<![\w])\.(\w+)", m.group(3)))
            out[m.group(2)] = (len(m.group(1)) // 4, attrs)
    return out


def test_the_error_modules_tree_is_the_readmes():
    (readme_tree,) = re.findall(r"```\n(ShardkitError\n.*?)```", README, re.S)
    readme, module = _tree(readme_tree), _tree(errors.__doc__)
    assert set(readme) == set(module) == set(errors.__all__) - {"ShardkitError"}
    differ = {name: (readme[name], module[name]) for name in readme if readme[name] != module[name]}
    assert differ == {}


# -- Strategy.unit_for_key -----------------------------------------------------------------------


def test_unit_for_key_is_what_the_api_table_says():
    config = shardkit.load_config(CONFIG, env={})
    by_name = {g.name: g.strategy for g in config.groups}
    # A hash group: the bucket, as bucket_for.
    assert by_name["users"].unit_for_key(42) == shardkit.bucket_for(42, config.bucket_count) == 318
    # Range and list groups number their slices only in a map read from a catalog
    # (config.slices); by the config file's map they have none.
    assert config.slices == ()
    assert by_name["events"].unit_for_key(5) is None and by_name["geo"].unit_for_key("eu") is None
    row = " ".join(_api_row("Strategy").split())
    m = re.search(r"`unit_for_key\(key\)` \(([^)]*(?:\([^)]*\)[^)]*)*)\)", row)
    assert m, row
    said = m.group(1)
    assert "catalog" in said and "`None`" in said, said


# -- docstrings of what the API table names ------------------------------------------------------


def test_every_api_table_member_has_a_docstring():
    cluster_row = _api_row("Cluster.from_config")
    config_row = _api_row("load_config")
    route_row = _api_row("Route")
    wanted = {
        shardkit.Cluster: set(re.findall(r"`(\w+)(?:\(|`)", cluster_row.split("|")[2])),
        ClusterConfig: set(re.findall(r"`(\w+)(?:\(|`)", config_row.split("ClusterConfig` is", 1)[1])),
        shardkit.Route: set(re.findall(r"`(\w+)`", route_row.split("returns:", 1)[1])),
    }
    missing = []
    for cls, names in wanted.items():
        for name in sorted(names):
            if name in getattr(cls, "__dataclass_fields__", {}):
                continue   # a field: the class's docstring says it
            member = inspect.getattr_static(cls, name, None)
            if member is None or not (callable(member) or isinstance(member, property)):
                continue   # an attribute set in __init__ (its class's docstring)
            if not inspect.getdoc(member if isinstance(member, property) else getattr(cls, name)):
                missing.append(f"{cls.__name__}.{name}")
    assert {"node_url", "shard_names", "dispose"} <= wanted[shardkit.Cluster]
    assert {"shard", "shard_names"} <= wanted[ClusterConfig]
    assert "is_scatter" in wanted[shardkit.Route]
    assert missing == []
    # What the README warns of, said where help() shows it.
    assert "password" in inspect.getdoc(shardkit.Cluster.node_url)


# -- DevClusterError.node -----------------------------------------------------------------------


def test_a_port_in_use_names_its_node():
    from shardkit.devcluster import plan_nodes

    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            if port > 65535 - 4 or not _free(port - 1):
                continue  # (the port before it is someone else's: the primary's would be taken)
            # s0's primary gets port_start, its replica the next: make the replica's taken.
            with pytest.raises(shardkit.DevClusterError) as info:
                plan_nodes(1, 1, port - 1)
            break
    else:
        pytest.skip("no free port with a free port before it")
    assert "s0/r0" in str(info.value)
    assert info.value.node == "s0/r0"


def _free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
