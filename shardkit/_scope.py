"""Per-scope routing defaults, carried in a context variable.

``with shardkit.scope(key=tenant_id):`` makes every statement in the block
that has no shard key of its own run on the tenant's shard; ``scope(shard=...)``
pins the block to one shard; ``scope(role="primary")`` forces reads to primaries.
Scopes nest; an inner scope overrides only what it sets.  They follow the
code across ``await`` and into threads started with ``contextvars.copy_context``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["RoutingScope", "current_scope", "scope"]

_UNSET: Any = object()


@dataclass(frozen=True)
class RoutingScope:
    """The routing defaults in force; ``None`` means "not set"."""

    shard: str | None = None
    key: Any = None
    role: str | None = None
    all_shards: bool = False
    consistency: str | None = None
    max_lag_seconds: float | None = None
    max_lag_bytes: int | None = None
    strict: bool = False


#: The scope in force outside any :func:`scope` block (nothing set).
NO_SCOPE = RoutingScope()
_current: contextvars.ContextVar[RoutingScope] = contextvars.ContextVar(
    "shardkit_scope", default=NO_SCOPE
)


def current_scope() -> RoutingScope:
    """The innermost active :func:`scope` (an empty one outside any)."""
    return _current.get()


def lag_limit_problem(name: str, value: Any) -> str | None:
    """What is wrong with a per-read lag limit (``max_lag_seconds``/``max_lag_bytes``), if anything."""
    integer = name.endswith("bytes")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not value >= 0:
        return (f"{name} must be {'an integer' if integer else 'a number'} >= 0 "
                f"({'WAL bytes' if integer else 'seconds'}), not {value!r}")
    return None


def switch_problem(name: str, value: Any) -> str | None:
    """What is wrong with a True/False switch (``all_shards``, ``strict``, ...), if anything:
    another value is refused, not read as true or false (``"false"``, a setting's string,
    would be true)."""
    return None if isinstance(value, bool) else f"{name} must be True or False, not {value!r}"


@contextlib.contextmanager
def scope(
    *,
    shard: str | None = _UNSET,
    key: Any = _UNSET,
    role: str | None = _UNSET,
    all_shards: bool = _UNSET,
    consistency: str | None = _UNSET,
    max_lag_seconds: float | None = _UNSET,
    max_lag_bytes: int | None = _UNSET,
    strict: bool = _UNSET,
) -> Iterator[RoutingScope]:
    """Set routing defaults for the code inside the block.

    :param shard: run the block's statements on this shard (an INSERT's rows that
        carry their shard key still go to their key's shard, as the ORM writes objects;
        an UPDATE may not set a key another shard owns).
    :param key: a shard-key value (a tenant id, a user id) used for statements
        that carry no key of their own; statements that do carry one still
        route by it.
    :param role: ``"primary"`` or ``"replica"`` for reads in the block.
    :param all_shards: allow key-less UPDATE/DELETE to run on every shard.
    :param consistency: ``"eventual"``, ``"read_your_writes"`` or ``"strong"`` for reads.
    :param max_lag_seconds: the staleness reads in the block accept (e.g. 30 for a report).
    :param max_lag_bytes: the same, in WAL bytes.
    :param strict: refuse any read in the block that would need more than one shard
        (a scatter); a key-less UPDATE/DELETE on every shard is what ``all_shards`` allows.
    """
    if shard is not _UNSET and shard is not None and not isinstance(shard, str):
        raise ValueError(f"shard must be a shard's name (a str) or None, not {shard!r}")
    if role is not _UNSET and role not in (None, "primary", "replica"):
        raise ValueError(f"role must be 'primary' or 'replica', not {role!r}")
    if consistency is not _UNSET and consistency not in (None, "eventual", "read_your_writes", "strong"):
        raise ValueError(
            f"consistency must be 'eventual', 'read_your_writes' or 'strong', not {consistency!r}")
    for name, value in (("all_shards", all_shards), ("strict", strict)):
        # (all_shards= lets key-less UPDATE/DELETE run on every shard.)
        if value is not _UNSET and (problem := switch_problem(name, value)):
            raise ValueError(problem)
    for name, value in (("max_lag_seconds", max_lag_seconds), ("max_lag_bytes", max_lag_bytes)):
        if value is not _UNSET and value is not None:
            problem = lag_limit_problem(name, value)
            if problem:
                raise ValueError(problem)
    changes = {
        name: value
        for name, value in (("shard", shard), ("key", key), ("role", role),
                            ("all_shards", all_shards), ("consistency", consistency),
                            ("max_lag_seconds", max_lag_seconds), ("max_lag_bytes", max_lag_bytes),
                            ("strict", strict))
        if value is not _UNSET
    }
    new = replace(_current.get(), **changes)
    token = _current.set(new)
    try:
        yield new
    finally:
        _current.reset(token)
