"""Comparing a get() through shardkit's kept load statement with SQLAlchemy's own way
(ShardedSession._get_impl, _get_load): what a call gave, what the session recorded, and
the SQL each node ran."""

from __future__ import annotations

import re
from typing import Any

from own_tables import nodes_used
from sqlalchemy.orm import sessionmaker

import shardkit
import shardkit._session as sk_session


def shown(o: Any) -> Any:
    """``o`` as comparable data: objects by type, plain attributes and identity key."""
    if isinstance(o, (list, tuple)):
        return [shown(x) for x in o]
    if o is None or isinstance(o, (str, int)):
        return o
    return (type(o).__name__, {k: v for k, v in o.__dict__.items() if not k.startswith("_")
                               and not isinstance(v, list) and not hasattr(v, "_sa_instance_state")},
            o._sa_instance_state.key)


def outcome(cluster: shardkit.Cluster, fn: Any, **maker: Any) -> tuple[Any, Any, list[str], list[str]]:
    """``fn(session)`` in a new session (``maker``: sessionmaker arguments; ``class_``
    ShardedSession unless given): (what it gave or raised, the session's records, the
    nodes that ran statements, the statements), its transaction rolled back."""
    sql: list[str] = []

    def note(statement: str) -> bool:
        sql.append(statement)
        return True
    with nodes_used(cluster, note) as nodes:
        with sessionmaker(class_=maker.pop("class_", shardkit.ShardedSession), cluster=cluster, **maker)() as s:
            try:
                got: Any = "ok", shown(fn(s))
            except Exception as e:  # noqa: BLE001 - compared
                got = "error", type(e).__name__, re.sub(r" at 0x[0-9a-f]+", "", str(e))
            state = set(s._sk_written), dict(s._sk_replica), sorted(map(str, s.identity_map))
            s.rollback()
    return got, state, list(nodes), sql


def with_and_without_kept(cluster: shardkit.Cluster, monkeypatch: Any, fn: Any, between: Any = None,
                          **maker: Any) -> tuple[Any, Any]:
    """:func:`outcome` of ``fn`` with get()'s kept statement, then without it (SQLAlchemy's
    own way); ``between()`` runs between the two (to put rows back as they were)."""
    cluster.router.get_plans.clear()
    kept = outcome(cluster, fn, **dict(maker))
    if between is not None:
        between()
    with monkeypatch.context() as m:
        m.setattr(sk_session, "_get_load", lambda *a: None)
        cluster.router.get_plans.clear()
        theirs = outcome(cluster, fn, **dict(maker))
    cluster.router.get_plans.clear()
    return kept, theirs
