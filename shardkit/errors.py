"""The errors shardkit raises.

Every error is a :class:`ShardkitError`, which is itself a
:class:`sqlalchemy.exc.SQLAlchemyError`, so code that already catches
SQLAlchemy errors keeps working::

    ShardkitError                      (sqlalchemy.exc.SQLAlchemyError)
    ├── ConfigurationError             .field .problem .hint
    ├── RoutingError                   .table .statement
    │   ├── ShardKeyError              .key   key missing, or of a type that cannot be hashed
    │   ├── NoShardForKey              .key   no range / list entry holds this key
    │   ├── CrossShardWriteError              a write that would span or leave its shard
    │   ├── ScatterRefused             .construct  strict mode, or a query that cannot merge exactly
    │   └── NotOwned                   .shard .bucket .map_version  the map has changed: a refused write, a moved object
    ├── RebalanceError                 .move_id .step  a move failed or cannot start
    ├── CommitError                    .committed .failed .not_committed .cause .prepared  a multi-shard commit that did not commit every shard
    ├── ShardUnavailable               .shard .node .cause
    │   └── ScatterError               .failures {shard: exception}
    └── DevClusterError                .node  the local development cluster failed

Errors carry their context as attributes, and their messages carry the
numbers and the fix.  Connection URLs in messages are always masked.
"""

from __future__ import annotations

import pickle
from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc

__all__ = [
    "CommitError",
    "ConfigurationError",
    "CrossShardWriteError",
    "DevClusterError",
    "NoShardForKey",
    "NotOwned",
    "RebalanceError",
    "RoutingError",
    "ScatterError",
    "ScatterRefused",
    "ShardKeyError",
    "ShardUnavailable",
    "ShardkitError",
]


class ShardkitError(sa_exc.SQLAlchemyError):
    """Base class of every error raised by shardkit."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        # Pickled (an error a worker process sends back, copy.copy()) with its attributes:
        # its __init__ takes other arguments than the message it passes on.  An attribute
        # that cannot be pickled (an ORM statement, whose mapper cannot) goes as its text.
        state = {}
        for name, value in self.__dict__.items():
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - whatever pickle raises for it
                value = str(value)
            state[name] = value
        return _rebuild, (type(self), self.message), state


def _rebuild(cls: type[ShardkitError], message: str) -> ShardkitError:
    """An error of ``cls`` with ``message``, its attributes to be set from its pickled state."""
    error = cls.__new__(cls)
    ShardkitError.__init__(error, message)
    return error


class ConfigurationError(ShardkitError):
    """The cluster configuration is wrong.

    ``field`` is the dotted path of the offending setting (``shards[1].name``)
    and ``hint`` says how to fix it.
    """

    def __init__(self, field: str, problem: str, hint: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.hint = hint
        msg = f"{field}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class RoutingError(ShardkitError):
    """A statement or object cannot be routed to a shard."""

    def __init__(
        self, message: str, *, table: str | None = None, statement: Any = None
    ) -> None:
        self.table = table
        self.statement = statement
        super().__init__(message)


class ShardKeyError(RoutingError):
    """A shard key is missing or has a value that cannot be placed."""

    def __init__(
        self, message: str, *, table: str | None = None, key: Any = None,
        statement: Any = None,
    ) -> None:
        self.key = key
        super().__init__(message, table=table, statement=statement)


class NoShardForKey(RoutingError):
    """No shard holds this key: a gap between ranges, or a list value with no default."""

    def __init__(self, message: str, *, table: str | None = None, key: Any = None) -> None:
        self.key = key
        super().__init__(message, table=table)


class CrossShardWriteError(RoutingError):
    """A write that would leave its shard: a shard-key change, or a key-less write."""


class ScatterRefused(RoutingError):
    """A query that would need several shards was refused.

    Raised in strict mode, and for constructs whose result cannot be merged
    exactly from per-shard results (``construct`` names it).
    """

    def __init__(
        self, message: str, *, construct: str | None = None, table: str | None = None,
        statement: Any = None,
    ) -> None:
        self.construct = construct
        super().__init__(message, table=table, statement=statement)


class NotOwned(RoutingError):
    """A shard's ownership guard refused a write to a bucket it does not own, or a
    keyed UPDATE/DELETE that matched no rows ran on a shard this process's map is
    out of date about (the rows it meant may live on another shard now), or an
    object loaded before its bucket moved was refreshed, lazy-loaded or written.

    ``bucket`` is the bucket number, or for range and list groups the slice
    number (at or above ``2**30``).  ``map_version`` is the version of the
    bucket map that sent the write to ``shard`` (``None`` when not known, as
    for an object whose new place the map in use already shows): retrying
    needs a newer map than that one, and :func:`shardkit.run_transaction`
    waits for the catalog to publish it.

    The process routed with a stale bucket map (a move has switched the
    bucket to another shard).  Nothing was written by the refused statement; the
    transaction on that shard is rolled back (on a primary in autocommit, the
    statements before it committed as they ran).  shardkit refreshes its map on
    this error; retry the transaction (:func:`shardkit.run_transaction` does it
    once, unless a statement before it committed in autocommit).
    """

    def __init__(self, message: str, *, shard: str | None = None, bucket: int | None = None,
                 table: str | None = None, statement: Any = None,
                 map_version: int | None = None) -> None:
        self.shard = shard
        self.bucket = bucket
        self.map_version = map_version
        super().__init__(message, table=table, statement=statement)


class RebalanceError(ShardkitError):
    """A rebalancing move cannot start, or failed at ``step`` (see ``shardkit rebalance status``)."""

    def __init__(self, message: str, *, move_id: int | None = None, step: str | None = None) -> None:
        self.move_id = move_id
        self.step = step
        super().__init__(message)


class CommitError(ShardkitError):
    """A commit of a transaction that used several shards did not commit all of them.

    A ShardedSession commits each shard's transaction in turn; it is not a distributed
    transaction.  ``committed`` names the shards whose commit went through (their writes
    are durable), ``failed`` the shard whose commit (or earlier statement) failed, and
    ``not_committed`` the shards rolled back.  ``cause`` is the error from ``failed``.
    When ``committed`` is empty, nothing was written anywhere.  After a two-phase
    commit, ``prepared`` maps each shard whose transaction is still prepared (its
    outcome is commit: ``COMMIT PREPARED`` it there) to the transaction's id.
    """

    def __init__(self, message: str, *, committed: list[str], failed: str | None,
                 not_committed: list[str], cause: BaseException | None = None,
                 prepared: dict[str, str] | None = None) -> None:
        self.committed = list(committed)
        self.failed = failed
        self.not_committed = list(not_committed)
        self.cause = cause
        self.prepared = dict(prepared or {})
        super().__init__(message)


class ShardUnavailable(ShardkitError):
    """A shard (or the node a statement needs) cannot be reached."""

    def __init__(
        self, message: str, *, shard: str | None = None, node: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        self.shard = shard
        self.node = node
        self.cause = cause
        super().__init__(message)


class ScatterError(ShardUnavailable):
    """One or more shards failed during a cross-shard query.

    ``failures`` maps each failed shard name to its exception.
    """

    def __init__(self, failures: dict[str, BaseException], *, note: str | None = None) -> None:
        self.failures = dict(failures)
        parts = "; ".join(
            f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for name, e in sorted(self.failures.items())
        )
        first = sorted(self.failures)[0] if self.failures else None
        # The database refused the statement or a value of it there (an integer out of
        # range, a bad cast): the fix is the statement's, not partial results (which would
        # leave those shards' rows out).
        refused = bool(self.failures) and all(
            str(getattr(getattr(e, "orig", None), "sqlstate", None) or "")[:2] in ("22", "42", "0A")
            for e in self.failures.values())
        super().__init__(
            f"{len(self.failures)} shard(s) failed during a cross-shard query: {parts}. "
            + (note + "." if note else
               "The database refused the statement or one of its values there: correct it "
               "(partial results would leave those shards' rows out)." if refused else
               "Pass execution_options(shardkit_partial_results=True) to accept partial results."),
            shard=first,
            cause=self.failures.get(first) if first else None,
        )


class DevClusterError(ShardkitError):
    """The local development cluster could not be started, stopped or changed."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        self.node = node
        super().__init__(message)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unreachable_reason(context: Any) -> str | None:
    """In a ``handle_error`` hook: the first line of the driver's error when the server
    could not be reached (a connection lost or refused), else ``None`` (pre-pings
    included: the pool reconnects by itself)."""
    cause = context.original_exception
    if not isinstance(cause, Exception):
        # Ctrl-C, SystemExit: SQLAlchemy drops the connection, but the server is fine.
        return None
    if context.is_pre_ping or not (context.is_disconnect or (
            context.connection is None and isinstance(cause, psycopg.OperationalError))):
        return None
    return first_line(cause)
