"""Strategies: the pure functions that map a shard key to a shard name.

A strategy never touches a database.  Each one answers two questions:

* :meth:`Strategy.shard_for_key` - which shard owns this key;
* :meth:`Strategy.shards_for_interval` - which shards can hold keys in an
  interval (used for ``BETWEEN`` / ``<`` / ``>=`` predicates); ``None`` means
  "any shard" (hash and list strategies do not preserve order).
"""

from __future__ import annotations

import bisect
import datetime
import shlex
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._hashing import _bucket_for as bucket_for
from .errors import NoShardForKey, RoutingError, ShardKeyError

__all__ = [
    "CustomStrategy",
    "HashStrategy",
    "ListStrategy",
    "RangeStrategy",
    "Strategy",
]


class Strategy(ABC):
    """Maps shard-key values to shard names."""

    kind: str = "abstract"

    @abstractmethod
    def shard_for_key(self, key: Any) -> str:
        """The shard that owns ``key``."""

    def shards_for_interval(
        self,
        low: Any = None,
        high: Any = None,
        *,
        low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> frozenset[str] | None:
        """Shards that can hold keys between ``low`` and ``high`` (``None`` = unbounded).

        Returns ``None`` when the strategy cannot narrow the interval (every
        shard may hold such keys).
        """
        return None

    @property
    @abstractmethod
    def shards(self) -> frozenset[str]:
        """Every shard this strategy can return."""

    def unit_for_key(self, key: Any) -> int | None:
        """The bucket or slice number holding ``key`` (what moves between shards), if any."""
        return None


class HashStrategy(Strategy):
    """murmur3 of the key's canonical bytes, modulo a fixed bucket count, then the bucket map.

    ``bucket_map[b]`` is the shard owning bucket ``b``.  The map is data: moving
    buckets between shards changes the map, never the hash.
    """

    kind = "hash"

    def __init__(self, bucket_map: Sequence[str]) -> None:
        if not bucket_map:
            raise ValueError("bucket_map must not be empty")
        self.bucket_map: tuple[str, ...] = tuple(bucket_map)
        self.bucket_count = len(self.bucket_map)
        self._shards = frozenset(self.bucket_map)

    def bucket_for_key(self, key: Any) -> int:
        return bucket_for(key, self.bucket_count)

    def unit_for_key(self, key: Any) -> int | None:
        return bucket_for(key, self.bucket_count)

    def shard_for_key(self, key: Any) -> str:
        return self.bucket_map[bucket_for(key, self.bucket_count)]

    @property
    def shards(self) -> frozenset[str]:
        return self._shards

    def __repr__(self) -> str:
        return f"HashStrategy(buckets={self.bucket_count}, shards={sorted(self._shards)})"


@dataclass(frozen=True)
class KeyRange:
    """A half-open interval ``[lower, upper)`` of keys owned by ``shard``; ``None`` is unbounded.

    ``id`` is its slice number when the range comes from a catalog (it can move).
    """

    lower: Any
    upper: Any
    shard: str
    id: int | None = None

    def __str__(self) -> str:
        lo = "-inf" if self.lower is None else repr(self.lower)
        hi = "+inf" if self.upper is None else repr(self.upper)
        return f"[{lo}, {hi}) -> {self.shard}"


class RangeStrategy(Strategy):
    """Sorted, non-overlapping half-open ranges ``[lower, upper)``; the ends may be open.

    A key in a gap between ranges raises :class:`NoShardForKey`.  ``catalog_group``: the
    group's name when a catalog's slices make the ranges (its error then names the command
    that gives a gap to a shard; the config file's ranges are not read again).
    """

    kind = "range"

    def __init__(self, ranges: Sequence[KeyRange], *, catalog_group: str | None = None) -> None:
        self.catalog_group = catalog_group
        if not ranges:
            raise ValueError("a range strategy needs at least one range")
        # The caller (config) validates order and overlap with field names;
        # this re-check protects direct construction.  A uuid bound, as a uuid key, is
        # compared by its text form (see _lookup_form): TOML writes uuids as strings.
        ranges = [KeyRange(_lookup_form(r.lower), _lookup_form(r.upper), r.shard, r.id)
                  for r in ranges]
        ordered = sorted(ranges, key=_range_sort_key)
        for a, b in zip(ordered, ordered[1:]):
            if a.upper is None or b.lower is None or a.upper > b.lower:
                raise ValueError(f"ranges overlap: {a} and {b}")
        self.ranges: tuple[KeyRange, ...] = tuple(ordered)
        self._lowers = [r.lower for r in ordered[1:]]
        self._shards = frozenset(r.shard for r in ordered)

    def _index_for(self, key: Any) -> int:
        try:
            # Index of the last range whose lower bound is <= key.
            return bisect.bisect_right(self._lowers, key)
        except (TypeError, ArithmeticError) as e:  # (decimal's InvalidOperation is an ArithmeticError)
            _refuse_nan(key)
            problem = _offset_problem(key, [b for r in self.ranges for b in (r.lower, r.upper) if b is not None])
            if problem is not None:
                raise ShardKeyError(problem, key=key) from None
            raise ShardKeyError(
                f"range key {key!r} ({type(key).__name__}) cannot be compared with the "
                f"configured range bounds: {e}",
                key=key,
            ) from None

    def shard_for_key(self, key: Any) -> str:
        if key is None:
            raise ShardKeyError("range shard key is NULL; every row needs a key", key=key)
        key = _lookup_form(key)
        r = self.ranges[self._index_for(key)]
        try:
            inside = (r.lower is None or key >= r.lower) and (r.upper is None or key < r.upper)
        except (TypeError, ArithmeticError) as e:
            _refuse_nan(key)
            raise ShardKeyError(f"range key {key!r} cannot be compared: {e}", key=key) from None
        if not inside:
            _refuse_nan(key)
            raise NoShardForKey(self._gap_problem(key), key=key)
        return r.shard

    def _gap_problem(self, key: Any) -> str:
        if self.catalog_group is None:
            return (f"no range holds key {key!r}; configured ranges: " + ", ".join(str(x) for x in self.ranges)
                    + " (add a range that covers it)")
        return (f"no range of group {self.catalog_group} holds key {key!r}; the catalog's ranges: "
                + ", ".join(str(x) for x in self.ranges)
                + " (the catalog routes the group, not the config file's ranges: give the gap holding it to a "
                f"shard with `shardkit rebalance apply --split {_cli_spec(self.catalog_group, key)} --to SHARD`)")

    def unit_for_key(self, key: Any) -> int | None:
        if key is None:
            return None
        key = _lookup_form(key)
        try:
            r = self.ranges[self._index_for(key)]
            inside = (r.lower is None or key >= r.lower) and (r.upper is None or key < r.upper)
        except (TypeError, ArithmeticError, ShardKeyError):
            return None
        return r.id if inside else None

    def shards_for_interval(
        self, low: Any = None, high: Any = None, *, low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> frozenset[str] | None:
        low, high = _lookup_form(low), _lookup_form(high)
        if isinstance(low, str) or isinstance(high, str):
            # Strings: each shard compares them in its column's collation, which may
            # not be code point order (a linguistic one puts 'B' after 'a'), so no
            # shard can be left out.  Equality still routes to one shard.
            return None
        if _has_nan(low) or _has_nan(high):
            # PostgreSQL orders NaN above every number: no range of the config says where.
            return None
        out = set()
        try:
            for r in self.ranges:
                # The range [r.lower, r.upper) misses the interval if it ends at or before
                # low, or starts after high (or at high when high is exclusive).
                if low is not None and r.upper is not None and r.upper <= low:
                    continue
                if high is not None and r.lower is not None:
                    if r.lower > high or (r.lower == high and not high_inclusive):
                        continue
                out.add(r.shard)
        except (TypeError, ArithmeticError):
            return None
        return frozenset(out)

    @property
    def shards(self) -> frozenset[str]:
        return self._shards

    def __repr__(self) -> str:
        return "RangeStrategy(" + ", ".join(str(r) for r in self.ranges) + ")"


def _refuse_nan(key: Any) -> None:
    """Raise ShardKeyError, saying why, if ``key`` (a range key that found no range) is NaN."""
    if _has_nan(key):
        raise ShardKeyError(
            f"range key {key!r} is NaN (not a number), which no range holds: Python orders "
            "it with no number, PostgreSQL above every one; give the row a number as its key",
            key=key) from None


def _has_nan(key: Any) -> bool:
    """Whether ``key`` (or a part of a composite one) is a float or ``Decimal`` NaN, which
    compares with nothing (a ``Decimal`` one raises ``InvalidOperation`` instead)."""
    return any((isinstance(p, float) and p != p) or (isinstance(p, Decimal) and p.is_nan())
               for p in (key if isinstance(key, tuple) else (key,)))


def _range_sort_key(r: KeyRange) -> tuple[int, Any]:
    return (0, 0) if r.lower is None else (1, r.lower)


class ListStrategy(Strategy):
    """An explicit value -> shard mapping (regions, countries, tenants), with an optional default."""

    kind = "list"

    def __init__(self, mapping: Mapping[Hashable, str], default: str | None = None, *,
                 ids: Mapping[Hashable, int] | None = None, default_id: int | None = None,
                 catalog_group: str | None = None) -> None:
        # The group's name when a catalog's slices make the mapping (see RangeStrategy).
        self.catalog_group = catalog_group
        # A uuid is listed and looked up by its text form (see _lookup_form).
        self.mapping = {_lookup_form(v): s for v, s in mapping.items()}
        self.default = default
        # Slice numbers, when the mapping comes from a catalog (values can move).
        self.ids = {_lookup_form(v): i for v, i in (ids or {}).items()}
        self.default_id = default_id
        self._shards = frozenset(self.mapping.values()) | (
            frozenset([default]) if default else frozenset()
        )
        # Per key part, the date/time kinds of the values, and whether they are numbers
        # (see _date_kind_problem); () when every part's values are strings.
        self._date_kinds = _date_kinds(self.mapping)

    def shard_for_key(self, key: Any) -> str:
        if key is None:
            # Not the default's: a NULL key has no owner (as for hash and range groups;
            # verify reports such a row as one with a NULL shard key).
            raise ShardKeyError("list shard key is NULL; every row needs a key", key=key)
        try:
            return self.mapping[_lookup_form(key)]
        except KeyError:
            if self._date_kinds:
                problem = _date_kind_problem(key, self._date_kinds)
                if problem is not None:
                    raise ShardKeyError(problem, key=key) from None
            if self.default is not None:
                return self.default
            known = sorted(map(repr, self.mapping))[:10]
            if self.catalog_group is not None:
                raise NoShardForKey(
                    f"list value {key!r} of group {self.catalog_group} is not mapped to any shard and the "
                    f"group has no default (known values: {known}); the catalog routes the group, not "
                    "the config file's list: give the value to a shard with `shardkit rebalance apply "
                    f"--move-value {_cli_spec(self.catalog_group, key)} --to SHARD`",
                    key=key,
                ) from None
            raise NoShardForKey(
                f"list value {key!r} is not mapped to any shard and there is no default "
                f"(known values: {known}); add it to the "
                "list or set `default`",
                key=key,
            ) from None
        except TypeError:
            raise ShardKeyError(
                f"list key {key!r} ({type(key).__name__}) is not hashable", key=key
            ) from None

    @property
    def shards(self) -> frozenset[str]:
        return self._shards

    def unit_for_key(self, key: Any) -> int | None:
        key = _lookup_form(key)
        try:
            if key in self.mapping:
                return self.ids.get(key)
        except TypeError:
            return None
        return None if key is None else self.default_id

    def __repr__(self) -> str:
        return f"ListStrategy({len(self.mapping)} values, default={self.default!r})"


_NUMBER = "a number"
_STRING = "a string"


def _date_kind(v: Any) -> str | None:
    """``v``'s date/time kind, as PostgreSQL keeps them apart: a date, a date-time
    without or with a UTC offset; None for another value."""
    if isinstance(v, datetime.datetime):
        return "a date-time with a UTC offset" if v.utcoffset() is not None else "a date-time without a UTC offset"
    if isinstance(v, datetime.date):
        return "a date"
    return None


def _value_kind(v: Any) -> str | None:
    """A list value's kind: its date/time kind, a number, a string; None for another."""
    if isinstance(v, str):
        return _STRING
    if isinstance(v, (int, float, Decimal)) and not isinstance(v, bool):
        return _NUMBER
    return _date_kind(v)


def _date_kinds(values: Any) -> tuple[frozenset[str], ...]:
    """Per key part, the date/time kinds of a list group's ``values``, and "a number" and
    "a string" for its numbers and strings; () when no part's values are numbers, dates
    or times (a group of strings, the usual one, pays nothing for the check)."""
    kinds: list[set[str]] = []
    for v in values:
        for i, part in enumerate(v if isinstance(v, tuple) else (v,)):
            while len(kinds) <= i:
                kinds.append(set())
            k = _value_kind(part)
            if k is not None:
                kinds[i].add(k)
    return tuple(frozenset(k) for k in kinds) if any(k - {_STRING} for k in kinds) else ()


def _date_kind_problem(key: Any, kinds: tuple[frozenset[str], ...]) -> str | None:
    """What is wrong with a list ``key`` that no value holds, when a part of it is a date
    or date-time of another kind than the group's values there (``kinds``), or a string
    where they are numbers, dates or times (which the column parses as its own type): the column
    stores it as its own type (a date-time's date, a date's midnight, an offset applied or
    dropped by the server's TimeZone), whose value may be listed for another shard than
    the default.  None when there is no such part."""
    parts = key if isinstance(key, tuple) else (key,)
    for i, part in enumerate(parts):
        if i >= len(kinds):
            break
        if isinstance(part, str):
            # A string where the values are numbers, dates or times: the column (numeric,
            # date, timestamp) parses it into its own type, so '1' is stored as the listed
            # 1, and '2024-01-02' as the listed date: not a value of the default.
            if not kinds[i] or _STRING in kinds[i]:
                continue
            k = _STRING
        else:
            k = _date_kind(part)
            dates = kinds[i] - {_NUMBER, _STRING}
            if k is None or not dates or k in dates:
                continue
        return (f"list key {part!r} is {k}, and the group's values are {' and '.join(sorted(kinds[i]))}: "
                "the column stores it as its own type, which may be a value listed for another shard "
                "(not the default's); give the key as the column holds it (e.g. a date for a date "
                "column, in the time zone you mean; a number, not a string, for a numeric column)")
    return None


def _offset_problem(key: Any, bounds: list[Any]) -> str | None:
    """What is wrong with a date-time ``key`` (or part of a composite one) that Python
    cannot compare with the range ``bounds``: it has no UTC offset where they have one,
    or one where they have none.  None for anything else."""
    parts = key if isinstance(key, tuple) else (key,)
    for i, part in enumerate(parts):
        if not isinstance(part, datetime.datetime):
            continue
        column = [b[i] if isinstance(b, tuple) else b for b in bounds]
        aware = {b.tzinfo is not None for b in column if isinstance(b, datetime.datetime)}
        if len(aware) != 1 or (part.tzinfo is not None) in aware:
            continue
        if True in aware:
            return (f"range key {part.isoformat()} has no UTC offset, and the group's bounds have one: "
                    f"give it with its offset (e.g. {part.isoformat()}+00:00)")
        return (f"range key {part.isoformat()} has a UTC offset, and the group's bounds have none "
                f"(local date-times): give it without the offset (e.g. {part.replace(tzinfo=None).isoformat()})")
    return None


def _lookup_form(value: Any) -> Any:
    """A list value (or key) as a list group looks it up: a ``uuid.UUID`` by its text form,
    also as a part of a composite one.  TOML has no uuid type, so a config lists uuids as
    strings, while a uuid column's key is read as a ``uuid.UUID`` (from a model, a
    statement, an ORM object, a row); the guard's SQL matches the column's text form
    (``k::text``), which is ``str(uuid)``.

    A ``float`` by the decimal number it is written as (``0.1`` is ``Decimal("0.1")``):
    TOML has no decimal type either, so a config writes a ``numeric`` column's bounds and
    values as floats, while the column's keys are ``Decimal``s, which compare with a float
    by its binary value (``Decimal("0.10") < 0.1``, and never equal it): a float key and a
    Decimal key of one stored value would route apart."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, tuple) and any(isinstance(p, (uuid.UUID, float)) for p in value):
        return tuple(str(p) if isinstance(p, uuid.UUID) else Decimal(repr(p)) if isinstance(p, float) else p
                     for p in value)
    return value


def _cli_spec(group: str, key: Any) -> str:
    """``GROUP:KEY`` as a shell word, as `rebalance --split` and `--move-value` take it."""
    return shlex.quote(f"{group}:{_lookup_form(key)}")


class CustomStrategy(Strategy):
    """A user callable ``fn(key) -> shard name``; its answer is checked against the shards."""

    kind = "custom"

    def __init__(self, fn: Callable[[Any], str], shards: frozenset[str], name: str = "") -> None:
        self.fn = fn
        self._shards = frozenset(shards)
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def shard_for_key(self, key: Any) -> str:
        try:
            shard = self.fn(key)
        except RoutingError:  # (the function's own NoShardForKey, say: as it is)
            raise
        except Exception as e:
            raise ShardKeyError(
                f"custom strategy {self.name} raised {e!r} for key {key!r}; make it return a "
                f"configured shard's name (shards: {sorted(self._shards)}) for every key a row "
                "may have, or raise shardkit.NoShardForKey for a key no shard takes",
                key=key,
            ) from e
        try:
            known = isinstance(shard, str) and shard in self._shards
        except TypeError:  # a str subclass with an odd __hash__
            known = False
        if not known:
            raise NoShardForKey(
                f"custom strategy {self.name} returned {shard!r} for key {key!r}, which is "
                f"not a configured shard (shards: {sorted(self._shards)})",
                key=key,
            )
        return shard

    @property
    def shards(self) -> frozenset[str]:
        return self._shards

    def __repr__(self) -> str:
        return f"CustomStrategy({self.name})"
