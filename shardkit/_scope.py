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


_EMPTY = RoutingScope()
_current: contextvars.ContextVar[RoutingScope] = contextvars.ContextVar(
    "shardkit_scope", default=_EMPTY
)


def current_scope() -> RoutingScope:
    """The innermost active :func:`scope` (an empty one outside any)."""
    return _current.get()


@contextlib.contextmanager
def scope(
    *,
    shard: str | None = _UNSET,
    key: Any = _UNSET,
    role: str | None = _UNSET,
    all_shards: bool = _UNSET,
) -> Iterator[RoutingScope]:
    """Set routing defaults for the code inside the block.

    :param shard: run every statement in the block on this shard.
    :param key: a shard-key value (a tenant id, a user id) used for statements
        that carry no key of their own; statements that do carry one still
        route by it.
    :param role: ``"primary"`` or ``"replica"`` for reads in the block.
    :param all_shards: allow key-less UPDATE/DELETE to run on every shard.
    """
    if role is not _UNSET and role not in (None, "primary", "replica"):
        raise ValueError(f"role must be 'primary' or 'replica', not {role!r}")
    changes = {
        name: value
        for name, value in (("shard", shard), ("key", key), ("role", role), ("all_shards", all_shards))
        if value is not _UNSET
    }
    new = replace(_current.get(), **changes)
    token = _current.set(new)
    try:
        yield new
    finally:
        _current.reset(token)
