"""Slices: the movable units of range and list groups.  Pure: no I/O.

Hash groups move buckets.  Range and list groups move *slices*: one key range
``[lower, upper)`` of a range group, or the values of a list group that live
together (one value each at first, plus the group's default, if it has one).
A slice has a number in its own space, above every bucket number
(:data:`SLICE_BASE` and up), so the ownership guard, the change log and the
mover treat buckets and slices alike: a shard owns numbers, and a move moves
numbers.

The catalog stores the slices of every range and list group with each map
version.  Splitting a range at a key, or taking a list value out of the
default, makes a new slice on the same shard (:func:`split_range`,
:func:`carve_value`); moving it is then a move like any other.  Splits never
change where a key lives; only moves do.

A group's slices can be moved when its tables have one key column and its
bounds or values are all integers or all strings (:func:`movable_kind`).
Strings compare by code point, in Python and (``COLLATE "C"``) in SQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from ._strategies import KeyRange, ListStrategy, RangeStrategy, Strategy, _cli_spec
from .errors import ConfigurationError

__all__ = ["SLICE_BASE", "Slice", "add_value", "carve_value", "fill_gap", "gained_slices", "gap_around",
           "group_slices", "holds_no_key", "initial_slices", "movable_kind", "slices_from_json", "slices_to_json", "split_range", "strategy_from_slices"]

#: The first slice number; bucket numbers stay below it.
SLICE_BASE: Final = 1 << 30


@dataclass(frozen=True)
class Slice:
    """A movable unit of a range or list group, owned by ``shard``.

    Range slices have ``lower``/``upper`` (``None``: unbounded); list slices
    have ``values``, or ``default=True`` for the values no slice lists.
    """

    id: int
    group: str
    shard: str
    lower: Any = None
    upper: Any = None
    values: tuple[Any, ...] = ()
    default: bool = False

    @property
    def kind(self) -> str:
        return "list" if self.values or self.default else "range"

    def describe(self) -> str:
        if self.default:
            return f"{self.group}: values not listed elsewhere (default)"
        if self.values:
            return f"{self.group}: " + ", ".join(map(repr, self.values))
        lo = "-inf" if self.lower is None else repr(self.lower)
        hi = "+inf" if self.upper is None else repr(self.upper)
        return f"{self.group}: [{lo}, {hi})"

    def contains(self, key: Any) -> bool:
        """Whether ``key`` falls in this slice (for a list default: not known here)."""
        if self.values:
            return key in self.values
        if self.default:
            return False
        return (self.lower is None or key >= self.lower) and (self.upper is None or key < self.upper)


def _scalar_kind(values: Iterable[Any]) -> str | None:
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def movable_kind(group: Any) -> tuple[str | None, str]:
    """(``"int"`` or ``"str"``, "") if ``group``'s slices can move, else (None, why not)."""
    strategy = group.strategy
    if not isinstance(strategy, (RangeStrategy, ListStrategy)):
        return None, f"group {group.name} uses the {strategy.kind} strategy"
    if any(len(cols) != 1 for cols in group.tables.values()):
        return None, f"group {group.name} has a composite shard key"
    if isinstance(strategy, RangeStrategy):
        bounds = [x for r in strategy.ranges for x in (r.lower, r.upper)]
    else:
        bounds = list(strategy.mapping)
    kind = _scalar_kind(bounds)
    if kind is None:
        return None, (f"group {group.name}'s bounds or values are not all integers or all strings "
                      "(only those can be compared the same way in Python and in SQL)")
    return kind, ""


def initial_slices(groups: Sequence[Any]) -> tuple[Slice, ...]:
    """The slices of the movable range and list groups as configured: one per range,
    one per list value, one for a list default.  Numbered from :data:`SLICE_BASE`,
    groups in name order."""
    out: list[Slice] = []
    n = SLICE_BASE
    for g in sorted(groups, key=lambda g: g.name):
        if movable_kind(g)[0] is None:
            continue
        s = g.strategy
        if isinstance(s, RangeStrategy):
            for r in s.ranges:
                out.append(Slice(n, g.name, r.shard, lower=r.lower, upper=r.upper))
                n += 1
        else:
            for value in sorted(s.mapping):
                out.append(Slice(n, g.name, s.mapping[value], values=(value,)))
                n += 1
            if s.default is not None:
                out.append(Slice(n, g.name, s.default, default=True))
                n += 1
    return tuple(out)


def add_missing_groups(slices: Sequence[Slice], groups: Sequence[Any]) -> tuple[Slice, ...]:
    """``slices`` plus initial slices (numbered after the highest) for groups it lacks."""
    have = {s.group for s in slices}
    n = max((s.id for s in slices), default=SLICE_BASE - 1) + 1
    extra = [replace(s, id=s.id - SLICE_BASE + n)
             for s in initial_slices([g for g in groups if g.name not in have])]
    return tuple(slices) + tuple(extra)


def strategy_from_slices(slices: Sequence[Slice]) -> Strategy:
    """The range or list strategy of one group's slices."""
    if not slices:
        raise ValueError("no slices")
    if slices[0].kind == "range":
        return RangeStrategy([KeyRange(s.lower, s.upper, s.shard, s.id) for s in slices],
                             catalog_group=slices[0].group)
    mapping: dict[Any, str] = {}
    ids: dict[Any, int] = {}
    default = default_id = None
    for s in slices:
        if s.default:
            default, default_id = s.shard, s.id
        for v in s.values:
            mapping[v] = s.shard
            ids[v] = s.id
    return ListStrategy(mapping, default, ids=ids, default_id=default_id, catalog_group=slices[0].group)


def by_group(slices: Iterable[Slice]) -> dict[str, list[Slice]]:
    out: dict[str, list[Slice]] = {}
    for s in slices:
        out.setdefault(s.group, []).append(s)
    return out


def group_slices(slices: Sequence[Slice], group: str, kind: str, key: Any) -> list[Slice]:
    """The slices of ``group``, which must be a ``kind`` group whose keys are like ``key``."""
    mine = [s for s in slices if s.group == group]
    if not mine:
        raise ConfigurationError("group", f"{group!r} has no movable slices",
                                 f"name a {kind} group of the config (see `shardkit rebalance plan --help`)")
    if mine[0].kind != kind:
        raise ConfigurationError("group", f"{group!r} is a {mine[0].kind} group",
                                 "split range groups; move list values")
    _check_key(key, mine, group)
    return mine


def _inserted(slices: Sequence[Slice], new: Slice, next_to: Slice, changed: Slice | None = None,
              before: bool = False) -> tuple[Slice, ...]:
    """``slices`` with ``new`` placed after (or ``before``) ``next_to``, itself replaced by
    ``changed`` if given."""
    out: list[Slice] = []
    for x in slices:
        if x.id != next_to.id:
            out.append(x)
            continue
        mine = [changed or x, new]
        out.extend(reversed(mine) if before else mine)
    return tuple(out)


def split_range(slices: Sequence[Slice], group: str, at: Any) -> tuple[tuple[Slice, ...], Slice]:
    """Split the slice of range group ``group`` holding ``at`` into ``[lower, at)`` and
    ``[at, upper)``; the upper part is a new slice on the same shard.

    Returns (all slices after the split, the upper part).  ``at`` must lie
    strictly inside a slice (a slice already starting at ``at`` is returned
    as is, with the slices unchanged).
    """
    mine = group_slices(slices, group, "range", at)
    for s in mine:
        if s.lower == at:
            return tuple(slices), s
        if s.contains(at):
            new = Slice(max(x.id for x in slices) + 1, group, s.shard, lower=at, upper=s.upper)
            return _inserted(slices, new, s, replace(s, upper=at)), new
    raise ConfigurationError("at", f"no range of group {group!r} holds {at!r}",
                             "split inside one of its ranges: " + ", ".join(s.describe() for s in mine)
                             + f"; or give the keys of the gap holding {at!r} to a shard: `shardkit rebalance "
                             f"apply --split {_cli_spec(group, at)} --to SHARD`")


def gap_around(slices: Sequence[Slice], group: str, key: Any) -> tuple[Any, Any] | None:
    """``(lower, upper)`` of the gap of range group ``group`` holding ``key``: from the end of
    the range below it (None: no range below) to the start of the range above it (None:
    none above); None if a range holds ``key``."""
    mine = group_slices(slices, group, "range", key)
    if any(s.contains(key) for s in mine):
        return None
    lower = max((s.upper for s in mine if s.upper is not None and s.upper <= key), default=None)
    upper = min((s.lower for s in mine if s.lower is not None and s.lower > key), default=None)
    return lower, upper


def fill_gap(slices: Sequence[Slice], group: str, gap: tuple[Any, Any], shard: str) -> tuple[tuple[Slice, ...], Slice]:
    """``gap`` of range group ``group`` (:func:`gap_around`: keys no range held, which a router
    and the ownership guard refuse) as a new range on ``shard``.  Returns (all slices after,
    the new slice)."""
    mine = [s for s in slices if s.group == group]
    new = Slice(max(x.id for x in slices) + 1, group, shard, lower=gap[0], upper=gap[1])
    below = [s for s in mine if s.upper is not None and s.upper == gap[0]]
    if below:
        return _inserted(slices, new, below[0]), new
    above = next(s for s in mine if s.lower is not None and s.lower == gap[1])
    return _inserted(slices, new, above, before=True), new


def add_value(slices: Sequence[Slice], group: str, value: Any, shard: str) -> tuple[tuple[Slice, ...], Slice]:
    """A new slice listing ``value`` on ``shard``, for a list group without a default whose
    slices do not list it (a key no shard took: a router and the guard refuse it).  Returns
    (all slices after, the new slice)."""
    mine = group_slices(slices, group, "list", value)
    if any(value in s.values for s in mine) or any(s.default for s in mine):
        raise ConfigurationError("value", f"{value!r} already has a shard in list group {group!r} "
                                 "(a slice lists it, or the group's default holds it)")
    new = Slice(max(x.id for x in slices) + 1, group, shard, values=(value,))
    return _inserted(slices, new, mine[-1]), new


def gained_slices(old: Sequence[Slice], split: Sequence[Slice]) -> list[Slice]:
    """The slices of ``split`` (one group's slices after a plan's split) holding keys that no
    slice of ``old`` held: a list value of a group without a default that no slice listed, a
    range in a gap of the ranges (or below the lowest, above the highest)."""
    if not old:
        return []
    ids = {s.id for s in old}
    if old[0].kind == "list":
        if any(s.default for s in old):
            return []
        listed = {v for s in old for v in s.values}
        return [s for s in split if s.id not in ids and s.values and not set(s.values) & listed]

    def inside(p: Slice, o: Slice) -> bool:
        return (o.lower is None or (p.lower is not None and p.lower >= o.lower)) and (
            o.upper is None or (p.upper is not None and p.upper <= o.upper))
    return [p for p in split if p.id not in ids and not any(inside(p, o) for o in old)]


def carve_value(slices: Sequence[Slice], group: str, value: Any) -> tuple[tuple[Slice, ...], Slice]:
    """The slice holding list value ``value`` alone: its own slice if it has one (a slice
    listing other values too is split), else a new slice taken from the default.

    Returns (all slices after the change, the value's slice).
    """
    mine = group_slices(slices, group, "list", value)
    new_id = max(x.id for x in slices) + 1
    for s in mine:
        if value in s.values:
            if len(s.values) == 1:
                return tuple(slices), s
            new = Slice(new_id, group, s.shard, values=(value,))
            rest = tuple(v for v in s.values if v != value)
            return _inserted(slices, new, s, replace(s, values=rest)), new
    default = next((s for s in mine if s.default), None)
    if default is None:
        raise ConfigurationError("value", f"{value!r} is not a value of list group {group!r}, which has no default",
                                 "give it to a shard: `shardkit rebalance apply --move-value "
                                 f"{_cli_spec(group, value)} --to SHARD`")
    new = Slice(new_id, group, default.shard, values=(value,))
    return _inserted(slices, new, default, before=True), new


def holds_no_key(s: Slice, lowest: Any = None, highest: Any = None) -> bool:
    """Whether slice ``s`` holds no key of a column whose keys run from ``lowest`` to
    ``highest`` (both included; None: no such end, except that no string sorts below ``""``):
    ``[-inf, -9223372036854775808)`` holds no bigint, ``[-inf, '')`` no string.  A list
    slice holds none when each of its values lies outside them (a default: not known)."""
    if s.default:
        return False
    if s.values:
        return all((lowest is not None and v < lowest) or (highest is not None and v > highest)
                   for v in s.values)
    if lowest is None and isinstance(s.upper, str):
        lowest = ""
    lo = s.lower if lowest is None or (s.lower is not None and s.lower > lowest) else lowest
    if lo is not None and s.upper is not None and s.upper <= lo:
        return True  # every key of the slice would lie below its start, or below the lowest key
    return highest is not None and s.lower is not None and s.lower > highest


def key_kind(mine: Sequence[Slice]) -> str | None:
    """``"int"`` or ``"str"``: the type of one group's bounds or values."""
    return _scalar_kind(x for s in mine for x in (s.lower, s.upper, *s.values))


def _check_key(key: Any, mine: Sequence[Slice], group: str) -> None:
    kind = key_kind(mine)
    if _scalar_kind([key]) != kind or key is None:
        raise ConfigurationError("key", f"{key!r} ({type(key).__name__}) is not a key of group {group!r}, "
                                 f"whose keys are {kind or 'of another type'}s",
                                 "pass an integer or a string like the group's bounds")


def reassign(slices: Sequence[Slice], moves: Mapping[int, str]) -> tuple[Slice, ...]:
    """``slices`` with slice ``id`` given to shard ``moves[id]``."""
    return tuple(replace(s, shard=moves[s.id]) if s.id in moves else s for s in slices)


# -- storage --------------------------------------------------------------------------


def slices_to_json(slices: Sequence[Slice]) -> list[dict[str, Any]]:
    out = []
    for s in slices:
        d: dict[str, Any] = {"id": s.id, "group": s.group, "shard": s.shard}
        if s.default:
            d["default"] = True
        elif s.values:
            d["values"] = list(s.values)
        else:
            d["lower"], d["upper"] = s.lower, s.upper
        out.append(d)
    return out


def slices_from_json(raw: Any) -> tuple[Slice, ...]:
    if not isinstance(raw, list):
        raise ConfigurationError("slices", "must be a list (the catalog's or a plan's slices)")
    out = []
    for i, d in enumerate(raw):
        try:
            out.append(Slice(int(d["id"]), str(d["group"]), str(d["shard"]), lower=d.get("lower"),
                             upper=d.get("upper"), values=tuple(d.get("values") or ()),
                             default=bool(d.get("default", False))))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigurationError(f"slices[{i}]", f"is not a slice ({e})") from None
    return tuple(out)
