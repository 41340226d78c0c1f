"""Plan which hash buckets (or range and list slices) move between shards.  Pure: no I/O.

A :class:`Plan` is the difference between two bucket maps (``bucket -> shard``)
plus the reason for it.  The planners build one:

* :func:`plan_add_shards` - new, empty shards each take about ``N/k`` buckets
  from the shards that own the most; no bucket moves between existing shards.
* :func:`plan_drain` - every bucket of one shard moves to the others, spread so
  they stay even; no other bucket moves.
* :func:`plan_even` - move the fewest buckets that bring every shard within a
  tolerance of the mean weight (rows or bytes per bucket).
* :func:`plan_from_maps` - diff two maps (an operator's hand-edited map).
* :func:`plan_split_range` - split a range group's range at a key and move
  one side; :func:`plan_move_value` - move one value of a list group.  These
  make a :class:`SlicePlan`.

Loads.  ``weights`` maps a bucket number to its weight (row count, bytes);
a bucket missing from it weighs 0.  Without weights every bucket weighs 1, so
a shard's load is its bucket count, and passing ``{b: 1 for b in ...}`` gives
exactly the same plan as passing nothing.

* Adding and draining decide *how many* buckets each shard ends with from
  bucket counts alone: keys hash evenly over buckets, so the bucket count is a
  shard's long-run share of new rows.  Weights, when given, only decide
  *which* buckets go: each donor sheds the buckets that bring its weight
  closest to its fair share, and each receiver takes those that bring it
  closest to its own.  Bucket-count balance therefore holds with or without
  weights.
* :func:`plan_even` balances weights and ignores bucket counts.

Determinism.  Shards are always taken in name order (plain string order, so
``s10`` sorts before ``s2``) and buckets in number order; nothing depends on
the order of dict or set iteration, or on the order in which the caller lists
names.  The same input always gives an equal plan.
"""

from __future__ import annotations

import functools
import heapq
import math
import numbers
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import groupby
from typing import Any

from ._slices import (Slice, add_value, carve_value, fill_gap, gained_slices, gap_around, group_slices,
                      holds_no_key, reassign, slices_from_json, slices_to_json, split_range)
from .errors import ConfigurationError

__all__ = [
    "BucketMove",
    "Plan",
    "SlicePlan",
    "keyless_moves",
    "plan_add_shards",
    "plan_drain",
    "plan_even",
    "plan_from_dict",
    "plan_from_maps",
    "plan_move_value",
    "plan_split_range",
]

_ALREADY = "already balanced"
_RANGES_WIDTH = 48  # longest "ranges" cell render() prints


@dataclass(frozen=True, order=True)
class BucketMove:
    """Bucket ``bucket`` changes owner from ``source`` to ``target``.

    Note: the dataclass ordering compares ``(bucket, source, target)``; a
    plan's moves are instead listed by ``(source, target, bucket)``.
    """

    bucket: int
    source: str
    target: str


def _move_key(m: BucketMove) -> tuple[str, str, int]:
    return (m.source, m.target, m.bucket)


def _pair(m: BucketMove) -> tuple[str, str]:
    return (m.source, m.target)


def _diff(old: tuple[str, ...], new: tuple[str, ...]) -> tuple[BucketMove, ...]:
    moves = [BucketMove(b, o, n) for b, (o, n) in enumerate(zip(old, new)) if o != n]
    moves.sort(key=_move_key)
    return tuple(moves)


@dataclass(frozen=True, repr=False)
class Plan:
    """Moving from ``old_map`` to ``new_map``.

    ``moves`` holds exactly the buckets whose owner changes, sorted by
    ``(source, target, bucket)``; constructing a Plan whose moves do not match
    its maps raises :class:`ConfigurationError` (build one with
    :func:`plan_from_maps`).  ``weights`` is the per-bucket weight used by the
    planner (dense, one float per bucket), or ``None`` when none was given; it
    is only used for reporting.
    """

    reason: str
    old_map: tuple[str, ...]
    new_map: tuple[str, ...]
    moves: tuple[BucketMove, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ConfigurationError("reason", f"{self.reason!r} must be a non-empty string",
                                     'say why the buckets move, e.g. "add shards s2"')
        old, new = tuple(self.old_map), tuple(self.new_map)
        if not old:
            raise ConfigurationError("old_map", "is empty", "a bucket map has one shard name per bucket")
        if len(new) != len(old):
            raise ConfigurationError(
                "new_map", f"has {len(new)} buckets but old_map has {len(old)}",
                "both maps must cover the same buckets: bucket_count never changes")
        moves = tuple(self.moves)
        if moves != _diff(old, new):
            raise ConfigurationError(
                "moves", "do not match the difference between old_map and new_map",
                "build plans with plan_from_maps(), which computes the moves")
        object.__setattr__(self, "old_map", old)
        object.__setattr__(self, "new_map", new)
        object.__setattr__(self, "moves", moves)
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != len(old):
                raise ConfigurationError(
                    "weights", f"has {len(weights)} entries for {len(old)} buckets",
                    "give one weight per bucket, or None")
            object.__setattr__(self, "weights", weights)

    def __repr__(self) -> str:
        return (f"Plan(reason={self.reason!r}, buckets={len(self.old_map)}, "
                f"moves={len(self.moves)})")

    @property
    def bucket_count(self) -> int:
        return len(self.old_map)

    # -- grouping ------------------------------------------------------------------

    def batches(self, max_buckets: int) -> list[tuple[BucketMove, ...]]:
        """The moves cut into batches of one ``(source, target)`` pair, at most ``max_buckets`` each.

        In plan order: pairs by ``(source, target)``, buckets ascending inside
        a pair; every move appears in exactly one batch.
        """
        if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
            raise ConfigurationError("max_buckets", f"{max_buckets!r} must be an integer >= 1",
                                     "e.g. batches(16)")
        out: list[tuple[BucketMove, ...]] = []
        for _, group in groupby(self.moves, key=_pair):
            g = tuple(group)
            out.extend(g[i:i + max_buckets] for i in range(0, len(g), max_buckets))
        return out

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per ``(source, target)`` pair, in plan order.

        Keys: ``source``, ``target``, ``buckets`` (how many), ``first_bucket``,
        ``last_bucket``, ``ranges`` (e.g. ``"0-170, 512-681"``) and, when the
        plan has weights, ``weight`` (the total weight moved).
        """
        rows: list[dict[str, Any]] = []
        for (source, target), group in groupby(self.moves, key=_pair):
            buckets = [m.bucket for m in group]
            row: dict[str, Any] = {
                "source": source,
                "target": target,
                "buckets": len(buckets),
                "first_bucket": buckets[0],
                "last_bucket": buckets[-1],
                "ranges": _spans(buckets),
            }
            if self.weights is not None:
                row["weight"] = math.fsum(self.weights[b] for b in buckets)
            rows.append(row)
        return rows

    # -- per-shard totals ----------------------------------------------------------

    def _shards(self) -> list[str]:
        return sorted(set(self.old_map) | set(self.new_map))

    def _counts(self, m: tuple[str, ...]) -> dict[str, int]:
        c = Counter(m)
        return {s: c.get(s, 0) for s in self._shards()}

    def _loads(self, m: tuple[str, ...]) -> dict[str, float]:
        assert self.weights is not None
        per: dict[str, list[float]] = {s: [] for s in self._shards()}
        for s, w in zip(m, self.weights):
            per[s].append(w)
        return {s: math.fsum(ws) for s, ws in per.items()}

    # -- output --------------------------------------------------------------------

    def render(self) -> str:
        """A human-readable table of the moves, then each shard's before/after totals."""
        weighted = self.weights is not None
        n = len(self.old_map)
        lines = [f"Rebalance plan: {self.reason}"]
        if not self.moves:
            lines.append(f"Nothing to move ({n} buckets): {_ALREADY}.")
        else:
            lines.append(f"{len(self.moves)} of {n} buckets move.")
            lines.append("")
            head = ["source", "target", "buckets"] + (["weight"] if weighted else []) + ["ranges"]
            rows = []
            for r in self.summary_rows():
                cells = [r["source"], "-> " + r["target"], str(r["buckets"])]
                if weighted:
                    cells.append(_fmt_weight(r["weight"]))
                ranges = r["ranges"]
                if len(ranges) > _RANGES_WIDTH:
                    ranges = ranges[:_RANGES_WIDTH - 3].rsplit(",", 1)[0] + ", ..."
                cells.append(ranges)
                rows.append(cells)
            total = ["total", "", str(len(self.moves))]
            if weighted:
                assert self.weights is not None
                total.append(_fmt_weight(math.fsum(self.weights[m.bucket] for m in self.moves)))
            total.append("")
            rows.append(total)
            lines += _table(head, rows, right={2, 3} if weighted else {2})
        lines.append("")
        head = ["shard", "buckets before", "after"]
        before, after = self._counts(self.old_map), self._counts(self.new_map)
        if weighted:
            head += ["weight before", "after"]
            wb, wa = self._loads(self.old_map), self._loads(self.new_map)
        rows = []
        for s in self._shards():
            cells = [s, str(before[s]), str(after[s])]
            if weighted:
                cells += [_fmt_weight(wb[s]), _fmt_weight(wa[s])]
            rows.append(cells)
        lines += _table(head, rows, right={1, 2, 3, 4})
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description; :meth:`from_dict` rebuilds the plan from it."""
        d: dict[str, Any] = {
            "reason": self.reason,
            "bucket_count": len(self.old_map),
            "moves": [{"bucket": m.bucket, "source": m.source, "target": m.target}
                      for m in self.moves],
            "summary": self.summary_rows(),
            "old_counts": self._counts(self.old_map),
            "new_counts": self._counts(self.new_map),
        }
        if self.weights is not None:
            d["old_weights"] = self._loads(self.old_map)
            d["new_weights"] = self._loads(self.new_map)
        d["old_map"] = list(self.old_map)
        d["new_map"] = list(self.new_map)
        d["weights"] = None if self.weights is None else list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`as_dict` output (e.g. read back from JSON)."""
        if not isinstance(d, Mapping):
            raise ConfigurationError("plan", "must be a mapping (Plan.as_dict() output)")
        for key in ("reason", "old_map", "new_map"):
            if key not in d:
                raise ConfigurationError(f"plan.{key}", "is missing", "pass Plan.as_dict() output")
        raw_w = d.get("weights")
        if raw_w is not None and (isinstance(raw_w, (str, bytes)) or not isinstance(raw_w, Sequence)):
            raise ConfigurationError("plan.weights", "must be a list with one weight per bucket, or null")
        weights = None if raw_w is None else dict(enumerate(raw_w))
        plan = plan_from_maps(d["old_map"], d["new_map"], d["reason"], weights=weights)
        if raw_w is not None and len(raw_w) != plan.bucket_count:
            raise ConfigurationError("plan.weights", f"has {len(raw_w)} entries for "
                                     f"{plan.bucket_count} buckets")
        if "moves" in d:
            if not isinstance(d["moves"], list):
                raise ConfigurationError("plan.moves", f"must be a list of moves, not {type(d['moves']).__name__}",
                                         "the stored plan was edited or corrupted")
            listed = [(m.get("bucket"), m.get("source"), m.get("target")) if isinstance(m, Mapping)
                      else m for m in d["moves"]]
            if listed != [(m.bucket, m.source, m.target) for m in plan.moves]:
                raise ConfigurationError("plan.moves", "do not match old_map -> new_map",
                                         "the stored plan was edited or corrupted")
        return plan


# -- validation ------------------------------------------------------------------------


def _check_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(field, f"{name!r} is not a shard name",
                                 "shard names are non-empty strings such as 's2'")
    if name != name.strip():
        raise ConfigurationError(field, f"shard name {name!r} has leading or trailing whitespace",
                                 f"write {name.strip()!r}")
    return name


def _check_map(raw: Any, field: str = "bucket_map") -> tuple[str, ...]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ConfigurationError(field, f"must be a sequence of shard names, got {type(raw).__name__}",
                                 "bucket_map[b] is the shard that owns bucket b")
    out = tuple(raw)
    if not out:
        raise ConfigurationError(field, "is empty", "a bucket map has one shard name per bucket")
    for name in dict.fromkeys(out):  # each distinct name once, in first-seen order
        try:
            _check_name(name, field)
        except ConfigurationError as e:
            raise ConfigurationError(f"{field}[{out.index(name)}]", e.problem, e.hint) from None
    return out


def _check_names(raw: Any, field: str, empty_problem: str, empty_hint: str) -> list[str]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ConfigurationError(field, f"must be a list of shard names, got {type(raw).__name__}",
                                 'e.g. ["s2", "s3"]')
    names = list(raw)
    if not names:
        raise ConfigurationError(field, empty_problem, empty_hint)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        _check_name(name, f"{field}[{i}]")
        if name in seen:
            raise ConfigurationError(f"{field}[{i}]", f"shard {name!r} is listed twice "
                                     f"(also at [{seen[name]}])", "list each shard once")
        seen[name] = i
    return names


def _dense_weights(raw: Any, n: int) -> tuple[float, ...]:
    if not isinstance(raw, Mapping):
        raise ConfigurationError("weights", f"must be a mapping bucket -> weight, got {type(raw).__name__}",
                                 "e.g. {0: 1200, 1: 980}; buckets left out weigh 0")
    out = [0.0] * n
    for key, value in raw.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise ConfigurationError("weights", f"key {key!r} is not a bucket number",
                                     "keys are integer bucket numbers")
        b = int(key)
        if not 0 <= b < n:
            raise ConfigurationError(f"weights[{b}]", f"bucket {b} is outside 0..{n - 1}",
                                     f"the bucket map has {n} buckets")
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
            raise ConfigurationError(f"weights[{b}]", f"{value!r} is not a number",
                                     "give rows or bytes as a number")
        try:
            w = float(value)  # Decimal too: PostgreSQL's sum() of bigint is numeric
        except OverflowError:
            w = math.inf
        if math.isnan(w) or math.isinf(w):
            raise ConfigurationError(f"weights[{b}]", f"{value!r} is not a finite number")
        if w < 0:
            raise ConfigurationError(f"weights[{b}]", f"{value!r} is negative",
                                     "weights are row counts or bytes, so >= 0")
        out[b] = w
    return tuple(out)


def _weights_or_ones(raw: Any, n: int) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """(weights to plan with, weights to store in the plan)."""
    if raw is None:
        return (1.0,) * n, None
    w = _dense_weights(raw, n)
    return w, w


# -- building blocks ---------------------------------------------------------------------


def _make(reason: str, old: tuple[str, ...], new_map: Sequence[str],
          weights: tuple[float, ...] | None, *, if_empty: str = _ALREADY) -> Plan:
    """The plan old -> new_map; with no moves, ``reason`` gets ``: <if_empty>`` appended."""
    new = tuple(new_map)
    moves = _diff(old, new)
    if not moves and if_empty not in reason and "nothing to move" not in reason:
        reason = f"{reason}: {if_empty}"
    return Plan(reason, old, new, moves, weights)


def _by_shard(old: tuple[str, ...], w: tuple[float, ...]) -> dict[str, list[tuple[float, int]]]:
    """shard -> its buckets as (weight, bucket), sorted."""
    out: dict[str, list[tuple[float, int]]] = {}
    for b, s in enumerate(old):
        out.setdefault(s, []).append((w[b], b))
    for items in out.values():
        items.sort()
    return out


def _pick(items: list[tuple[float, int]], m: int, want: float
          ) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """Choose ``m`` of ``items`` (sorted by weight) whose total weight is close to ``want``.

    Takes a run of ``m`` consecutive items: sliding the run up the sorted list
    never lowers its total, so a binary search finds the closest run; a tie
    goes to the lighter run (less data to copy).  With equal weights this is
    the ``m`` lowest bucket numbers.  Returns (chosen, rest).
    """
    if m <= 0:
        return [], items
    if m >= len(items):
        return items, []
    pre = [0.0]
    for w, _ in items:
        pre.append(pre[-1] + w)
    lo, hi = 0, len(items) - m
    while lo < hi:  # first run whose total is >= want
        mid = (lo + hi) // 2
        if pre[mid + m] - pre[mid] >= want:
            hi = mid
        else:
            lo = mid + 1
    i = lo
    if i > 0 and want - (pre[i - 1 + m] - pre[i - 1]) <= (pre[i + m] - pre[i]) - want:
        i -= 1
    return items[i:i + m], items[:i] + items[i + m:]


# -- planners --------------------------------------------------------------------------


def plan_add_shards(bucket_map: Sequence[str], new_shards: Sequence[str],
                    weights: Mapping[int, float] | None = None) -> Plan:
    """New, empty shards take buckets from the shards that own the most.

    Bucket counts are water-filled: repeatedly, the new shard with the fewest
    buckets takes one from the existing shard with the most (ties: the heavier
    one, then name), until no existing shard has more than one bucket above
    the emptiest new shard.  From an even map (counts within 1) the result is
    within one bucket of ``N/k`` everywhere.  Buckets only move from existing
    to new shards.  See the module docstring for what ``weights`` changes.
    """
    old = _check_map(bucket_map)
    n = len(old)
    new = _check_names(new_shards, "new_shards", "names no shard to add",
                       'e.g. plan_add_shards(bucket_map, ["s2"])')
    present = set(old)
    for i, s in enumerate(new):
        if s in present:
            raise ConfigurationError(
                f"new_shards[{i}]", f"shard {s!r} already owns buckets in the map",
                "pick a new name; to rebalance existing shards use plan_even")
    w, stored = _weights_or_ones(weights, n)
    old_names, new_names = sorted(present), sorted(new)
    counts = Counter(old)
    by_shard = _by_shard(old, w)
    loads = {s: math.fsum(x for x, _ in by_shard[s]) for s in old_names}

    # How many buckets each shard gives or gets: counts only.
    donors = [(-counts[s], -loads[s], s) for s in old_names]
    receivers = [(0, s) for s in new_names]
    heapq.heapify(donors)
    heapq.heapify(receivers)
    gives = dict.fromkeys(old_names, 0)
    gets = dict.fromkeys(new_names, 0)
    while True:
        neg_count, neg_load, d = donors[0]
        have, r = receivers[0]
        if -neg_count - have <= 1:
            break
        heapq.heapreplace(donors, (neg_count + 1, neg_load, d))
        heapq.heapreplace(receivers, (have + 1, r))
        gives[d] += 1
        gets[r] += 1

    # Which buckets: each donor sheds what brings it nearest its fair share of the weight.
    total = math.fsum(w)
    pool: list[tuple[float, int]] = []
    for d in old_names:
        if gives[d]:
            fair = total * (counts[d] - gives[d]) / n
            chosen, _ = _pick(by_shard[d], gives[d], loads[d] - fair)
            pool += chosen
    pool.sort()
    new_map = list(old)
    for r in new_names:
        chosen, pool = _pick(pool, gets[r], total * gets[r] / n)
        for _, b in chosen:
            new_map[b] = r
    return _make(f"add shards {', '.join(new_names)}", old, new_map, stored)


def plan_drain(bucket_map: Sequence[str], shard: str, weights: Mapping[int, float] | None = None,
               remaining: Sequence[str] | None = None) -> Plan:
    """Move every bucket of ``shard`` to the other shards; nothing else moves.

    ``remaining`` names the shards that receive (default: every other shard
    in the map); it may name shards that own nothing yet (to replace a shard),
    and shards of the map it leaves out keep their buckets and receive none.
    Each drained bucket goes, by count, to the receiver with the fewest
    buckets (ties: the lighter, then name), so receivers that were even stay
    within one bucket of each other.
    """
    old = _check_map(bucket_map)
    n = len(old)
    _check_name(shard, "shard")
    present = sorted(set(old))
    if shard not in present:
        raise ConfigurationError("shard", f"unknown shard {shard!r}: it owns no bucket in the map",
                                 "shards in the map: " + ", ".join(present))
    if remaining is None:
        targets = [s for s in present if s != shard]
        if not targets:
            raise ConfigurationError(
                "shard", f"cannot drain {shard!r}: it is the last shard and owns all {n} buckets",
                "add a shard first (plan_add_shards), or name receivers with remaining=[...]")
    else:
        targets = _check_names(remaining, "remaining",
                               f"names no shard to receive the buckets of {shard!r}",
                               "list at least one shard, or pass None for every other shard")
        for i, s in enumerate(targets):
            if s == shard:
                raise ConfigurationError(f"remaining[{i}]", f"{shard!r} is the shard being drained",
                                         "list only the shards that receive its buckets")
        targets = sorted(targets)
    w, stored = _weights_or_ones(weights, n)
    counts = Counter(old)
    by_shard = _by_shard(old, w)
    loads = {s: math.fsum(x for x, _ in by_shard.get(s, [])) for s in targets}

    heap = [(counts[s], loads[s], s) for s in targets]
    heapq.heapify(heap)
    quota = dict.fromkeys(targets, 0)
    for _ in range(counts[shard]):
        have, load, s = heap[0]
        heapq.heapreplace(heap, (have + 1, load, s))
        quota[s] += 1

    total = math.fsum(w)
    pool = by_shard[shard]
    new_map = list(old)
    for r in targets:
        fair = total * (counts[r] + quota[r]) / n
        chosen, pool = _pick(pool, quota[r], fair - loads[r])
        for _, b in chosen:
            new_map[b] = r
    reason = f"drain {shard}" + ("" if remaining is None else f" onto {', '.join(targets)}")
    return _make(reason, old, new_map, stored)


def plan_even(bucket_map: Sequence[str], weights: Mapping[int, float],
              shards: Sequence[str] | None = None, tolerance: float = 0.05) -> Plan:
    """Move buckets until every shard's weight is within ``tolerance`` of the mean.

    ``shards`` limits the balancing to those shards (default: every shard in
    the map); it may name shards that own nothing yet, and shards of the map
    it leaves out neither give nor take.  Greedy, one bucket at a time: the
    heaviest shard above the mean gives to the lightest below it (at least one
    of them outside the band ``mean * (1 +- tolerance)``) the bucket whose
    weight is closest to what would bring one of them to the mean.  A bucket
    is only moved if it is lighter than the gap between the two shards, so
    no shard ever ends heavier than the heaviest or lighter than the lightest
    was (each such move lowers the sum of squared loads, so the loop ends), and
    empty (weight 0) buckets never move; the plan moves each bucket once, from
    its owner to where the steps leave it.
    If no such move is left before every shard is in the band, the plan stops
    there and its reason says how far off it remains.
    """
    old = _check_map(bucket_map)
    n = len(old)
    if weights is None:
        raise ConfigurationError("weights", "plan_even needs the weight (rows or bytes) of each bucket",
                                 "e.g. {bucket: row_count}; to even bucket counts use plan_add_shards/plan_drain")
    w = _dense_weights(weights, n)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) \
            or not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigurationError("tolerance", f"{tolerance!r} must be a number >= 0",
                                 "a fraction of the mean weight, e.g. 0.05 for 5%")
    if shards is None:
        scope = sorted(set(old))
    else:
        scope = sorted(_check_names(shards, "shards", "names no shard to balance",
                                    "pass None to balance every shard in the map"))
    in_scope = set(scope)
    items: dict[str, list[tuple[float, int]]] = {s: [] for s in scope}
    for b, s in enumerate(old):
        if s in in_scope:
            items[s].append((w[b], b))
    for lst in items.values():
        lst.sort()
    load = {s: math.fsum(x for x, _ in items[s]) for s in scope}
    mean = math.fsum(load.values()) / len(scope)
    low, high = mean * (1 - tolerance), mean * (1 + tolerance)
    pct = f"{float(tolerance) * 100:g}%"

    new_map = list(old)
    while any(not low <= load[s] <= high for s in scope):
        heavy = [s for s in sorted(scope, key=lambda s: (-load[s], s)) if load[s] > mean]
        light = [s for s in sorted(scope, key=lambda s: (load[s], s)) if load[s] < mean]
        move = None
        for d in heavy:
            for r in light:
                if low <= load[r] and load[d] <= high:
                    continue  # both inside the band: moving would not fix anything
                i = _closest(items[d], min(load[d] - mean, mean - load[r]), load[d] - load[r])
                if i is not None:
                    move = (d, r, i)
                    break
            if move:
                break
        if move is None:
            break
        d, r, i = move
        wb, b = items[d].pop(i)
        insort(items[r], (wb, b))  # it may move on later (the plan holds only where it ends)
        load[d] -= wb
        load[r] += wb
        new_map[b] = r

    reason = f"even by weight within {pct}"
    worst = max(scope, key=lambda s: abs(load[s] - mean))  # first in name order on a tie
    if low <= load[worst] <= high:
        return _make(reason, old, new_map, w)
    off = (load[worst] - mean) / mean * 100
    reason += (f" (best effort: {worst} stays {abs(off):.1f}% {'above' if off > 0 else 'below'} "
               "the mean; no bucket move brings it closer)")
    return _make(reason, old, new_map, w, if_empty="nothing to move")


def _closest(items: list[tuple[float, int]], x: float, below: float) -> int | None:
    """Index in ``items`` (sorted (weight, bucket)) of the bucket with ``0 < weight < below``
    closest to ``x`` (ties: lighter, then lower bucket number); None if there is none."""
    best: tuple[float, float, int, int] | None = None
    j = bisect_left(items, (x, -1))  # first item with weight >= x
    candidates = []
    if j < len(items):
        candidates.append(j)
    if j > 0:
        candidates.append(bisect_left(items, (items[j - 1][0], -1)))  # lowest bucket of that weight
    for k in candidates:
        wk, bk = items[k]
        if 0 < wk < below:
            key = (abs(wk - x), wk, bk, k)
            if best is None or key < best:
                best = key
    return None if best is None else best[3]


def plan_from_maps(old_map: Sequence[str], new_map: Sequence[str], reason: str, *,
                   weights: Mapping[int, float] | None = None) -> Plan:
    """The plan that turns ``old_map`` into ``new_map`` (e.g. a hand-edited map)."""
    old = _check_map(old_map, "old_map")
    new = _check_map(new_map, "new_map")
    if len(new) != len(old):
        raise ConfigurationError(
            "new_map", f"has {len(new)} buckets but old_map has {len(old)}",
            "both maps must cover the same buckets: bucket_count never changes")
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigurationError("reason", f"{reason!r} must be a non-empty string",
                                 'say why the buckets move, e.g. "move hot tenant to s3"')
    stored = None if weights is None else _dense_weights(weights, len(old))
    return _make(reason, old, new, stored)


# -- range and list groups ---------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class SlicePlan:
    """Moving slices of one range or list group (see :mod:`shardkit._slices`).

    ``old`` is the group's slices when planned, ``split`` the same after the
    split (or carve-out) the plan needs first (equal to ``old`` when it needs
    none), ``moves`` the slices that change owner (``BucketMove.bucket`` is
    the slice number).  Build one with :func:`plan_split_range` or
    :func:`plan_move_value`.

    ``split`` may also give a shard keys that no slice of ``old`` held (a list
    value of a group without a default, a gap between ranges): :attr:`gained`.
    No row can hold such a key (routers and the guard refuse it), so nothing
    moves: applying the plan publishes the new slice.
    """

    reason: str
    group: str
    old: tuple[Slice, ...]
    split: tuple[Slice, ...]
    moves: tuple[BucketMove, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ConfigurationError("reason", f"{self.reason!r} must be a non-empty string")
        ids = {s.id: s for s in self.split}
        for m in self.moves:
            if m.bucket not in ids or ids[m.bucket].shard != m.source or m.source == m.target:
                raise ConfigurationError("moves", f"slice {m.bucket} is not on {m.source} in the plan",
                                         "build plans with plan_split_range() or plan_move_value()")
        if any(s.group != self.group for s in (*self.old, *self.split)):
            raise ConfigurationError("group", f"the plan's slices are not all of group {self.group!r}")
        if any(ids[m.bucket].default for m in self.moves):
            raise ConfigurationError("moves", "move a list group's default by moving its values one by one",
                                     "plan_move_value() takes a value out of the default, then moves it")
        _check_split(self.old, self.split)

    def __repr__(self) -> str:
        return f"SlicePlan(reason={self.reason!r}, group={self.group!r}, moves={len(self.moves)})"

    @property
    def new(self) -> tuple[Slice, ...]:
        return reassign(self.split, {m.bucket: m.target for m in self.moves})

    @property
    def splits(self) -> bool:
        return self.split != self.old

    @functools.cached_property
    def gained(self) -> tuple[Slice, ...]:
        """The slices of ``split`` holding keys no slice of ``old`` held (see the class)."""
        return tuple(gained_slices(self.old, self.split))

    def batches(self, max_buckets: int) -> list[tuple[BucketMove, ...]]:
        """One batch per ``(source, target)`` pair (a plan moves few slices)."""
        return [tuple(g) for _, g in groupby(self.moves, key=_pair)]

    def render(self) -> str:
        lines = [f"Rebalance plan: {self.reason}"]
        gained = {s.id for s in self.gained}
        if self.splits:
            before = {s.id for s in self.old}
            for s in self.split:
                if s.id in gained:
                    lines.append(f"New slice {s.id}: {s.describe()} on {s.shard} (keys no slice held: no row "
                                 "can have them yet).")
                elif s.id not in before:
                    lines.append(f"First split: {s.describe()} becomes slice {s.id} (on {s.shard}).")
        if not self.moves:
            lines.append("Nothing to move: the new slice is published, no row moves." if gained
                         else f"Nothing to move: {_ALREADY}.")
        by_id = {s.id: s for s in self.split}
        rows = [[str(m.bucket), by_id[m.bucket].describe(), m.source, "-> " + m.target] for m in self.moves]
        if rows:
            lines.append("")
            lines += _table(["slice", "keys", "source", "target"], rows, right={0})
        lines.append("")
        lines.append(f"Group {self.group} after the move:")
        lines += _table(["slice", "keys", "shard"],
                        [[str(s.id), s.describe(), s.shard] for s in self.new], right={0})
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "slices", "reason": self.reason, "group": self.group,
                "moves": [{"slice": m.bucket, "source": m.source, "target": m.target} for m in self.moves],
                "old": slices_to_json(self.old), "split": slices_to_json(self.split),
                "new": slices_to_json(self.new)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SlicePlan:
        try:
            moves = tuple(BucketMove(_slice_number(m["slice"]), _check_name(m["source"], "plan.moves.source"),
                                     _check_name(m["target"], "plan.moves.target")) for m in d["moves"])
            return cls(d["reason"], d["group"], slices_from_json(d["old"]), slices_from_json(d["split"]), moves)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigurationError("plan", f"is not a slice plan ({e!r} missing or wrong)",
                                     "pass SlicePlan.as_dict() output") from None


def _slice_number(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"slice {v!r} is not a slice number")
    return v


def _check_split(old: Sequence[Slice], split: Sequence[Slice]) -> None:
    """Refuse a split that would change where a key lives (only moves do that): each
    range must be cut into pieces on its own shard, with no key lost, and each list
    value must stay on its shard (new values only out of the default).  Keys no slice
    held may be gained, on any shard: a range in a gap of the old ranges, a value of a
    list group without a default (see :func:`shardkit._slices.gained_slices`)."""
    if not old:
        return
    problem = ("split", "changes where keys live, which only a move may do",
               "build plans with plan_split_range() or plan_move_value()")
    if old[0].kind == "range":
        gained = gained_slices(old, split)
        for g in gained:
            if any(_overlap(g, o) for o in old) or any(_overlap(g, x) for x in split if x.id != g.id):
                raise ConfigurationError(*problem)
        split = [s for s in split if s not in gained]
        pieces = sorted(split, key=lambda s: (s.lower is not None, s.lower))
        for o in old:
            mine = [p for p in pieces if p.shard == o.shard and (o.lower is None or (
                p.lower is not None and p.lower >= o.lower)) and (o.upper is None or (
                    p.upper is not None and p.upper <= o.upper))]
            edges = [o.lower] + [x for p in mine for x in (p.lower, p.upper)] + [o.upper]
            if not mine or any(edges[i] != edges[i + 1] for i in range(0, len(edges), 2)):
                raise ConfigurationError(*problem)
        if sum(1 for _ in pieces) != len({p.id for p in pieces}) or \
                len(pieces) != sum(1 for p in pieces for o in old if p.shard == o.shard and (
                    o.lower is None or (p.lower is not None and p.lower >= o.lower)) and (
                    o.upper is None or (p.upper is not None and p.upper <= o.upper))):
            raise ConfigurationError(*problem)
        return
    def placement(slices: Sequence[Slice]) -> tuple[dict[Any, str], str | None, int | None]:
        values = {v: s.shard for s in slices for v in s.values}
        default = next((s for s in slices if s.default), None)
        return values, default.shard if default else None, default.id if default else None
    old_values, old_default, old_default_id = placement(old)
    new_values, new_default, new_default_id = placement(split)
    if (new_default, new_default_id) != (old_default, old_default_id) or any(
            new_values.get(v) != shard for v, shard in old_values.items()) or any(
            shard != old_default for v, shard in new_values.items() if v not in old_values
            and old_default is not None):
        raise ConfigurationError(*problem)


def _overlap(a: Slice, b: Slice) -> bool:
    """Whether ranges ``a`` and ``b`` share a key."""
    return (a.upper is None or b.lower is None or b.lower < a.upper) and (
        b.upper is None or a.lower is None or a.lower < b.upper)


def _group_slices(slices: Sequence[Slice], group: str) -> tuple[Slice, ...]:
    return tuple(s for s in slices if s.group == group)


def plan_split_range(slices: Sequence[Slice], group: str, at: Any, target: str, *,
                     lower: bool = False) -> SlicePlan:
    """Split range group ``group`` at key ``at`` and move the upper side, keys ``>= at`` up to
    the end of the range holding ``at`` (or with ``lower``, the lower side, keys ``< at``
    down to its start) to ``target``.  ``at`` may be an existing boundary: nothing splits.
    A side that holds no key (below ``''``, the lowest string) is refused; so is one the
    key column cannot hold (see :func:`keyless_moves`), by ``rebalance.check_slice_plan``.

    ``at`` in a gap (no range holds it: between two ranges, below the lowest or above the
    highest bounded one): the gap becomes a new range on ``target`` (:attr:`SlicePlan.gained`),
    from the end of the range below to the start of the range above (open where there is
    none); nothing moves.  ``lower`` is refused there (unless a range ends at ``at``)."""
    target = _check_name(target, "target")
    mine = group_slices(slices, group, "range", at)  # (a key of the group's type: 1.0 or True is no int key)
    ends_there = [s for s in mine if s.upper == at]
    gap = gap_around(slices, group, at)
    if gap is not None and not (lower and ends_there):
        lo = "-inf" if gap[0] is None else repr(gap[0])
        hi = "+inf" if gap[1] is None else repr(gap[1])
        if lower:
            raise ConfigurationError(
                "at", f"no range of group {group!r} holds {at!r} (it lies in the gap [{lo}, {hi}), keys no "
                "range held), so there is no lower side to move",
                f"leave out --lower to give that gap to {target}, or split inside a range with --lower: "
                + ", ".join(s.describe() for s in mine))
        after, _ = fill_gap(slices, group, gap, target)
        return SlicePlan(f"give keys [{lo}, {hi}) of group {group} (the gap holding {at!r}), which no range "
                         f"held, to {target}",
                         group, _group_slices(slices, group), _group_slices(after, group), ())
    if lower and ends_there and not any(s.contains(at) for s in mine):
        # ``at`` is where a range ends and no range goes on (the top of the last one, bounded,
        # or a gap above it): nothing splits, that range moves.
        after, upper = tuple(slices), ends_there[0]
    else:
        after, upper = split_range(slices, group, at)
    side = upper
    if lower:
        below = [s for s in after if s.group == group and s.upper == at]
        if not below:
            raise ConfigurationError("at", f"no range of group {group!r} ends at {at!r}, so no key below it "
                                     "is the group's to move",
                                     "with --lower, split at a key above the start of a range: "
                                     + ", ".join(s.describe() for s in mine))
        side = below[0]
    if holds_no_key(side):
        raise ConfigurationError("at", f"no key of group {group!r} lies below {at!r} ({side.describe()}: "
                                 f"no string sorts below {at!r})",
                                 f"split at a key above {at!r} to move the keys below it, or move the "
                                 f"keys from {at!r} up (without --lower)")
    moves = () if side.shard == target else (BucketMove(side.id, side.shard, target),)
    what = f"split group {group} at {at!r}; {side.describe()}"
    return SlicePlan(f"{what} to {target}" if moves else f"{what} already on {target}",
                     group, _group_slices(slices, group), _group_slices(after, group), moves)


def keyless_moves(plan: SlicePlan, lowest: Any = None, highest: Any = None) -> list[Slice]:
    """The slices ``plan`` moves (or gives a shard: :attr:`SlicePlan.gained`) that hold no
    key of a key column whose keys run from ``lowest`` to ``highest`` (both included; None:
    no such end): a split at bigint's minimum whose lower side moves, say, or a list value
    above an int4 column's maximum, would move nothing."""
    by_id = {s.id: s for s in plan.split}
    return [by_id[m.bucket] for m in plan.moves if holds_no_key(by_id[m.bucket], lowest, highest)] + [
        s for s in plan.gained if holds_no_key(s, lowest, highest)]


def plan_move_value(slices: Sequence[Slice], group: str, value: Any, target: str) -> SlicePlan:
    """Move list value ``value`` of group ``group`` (alone) to ``target``.

    A value no slice lists, of a group without a default (no shard took it: routers and
    the guard refuse it), gets a new slice on ``target`` (:attr:`SlicePlan.gained`); nothing
    moves."""
    target = _check_name(target, "target")
    if not any(s.default or value in s.values for s in group_slices(slices, group, "list", value)):
        after, _ = add_value(slices, group, value, target)
        return SlicePlan(f"add value {value!r} to group {group} on {target} (no shard had it)",
                         group, _group_slices(slices, group), _group_slices(after, group), ())
    after, mine = carve_value(slices, group, value)
    moves = () if mine.shard == target else (BucketMove(mine.id, mine.shard, target),)
    return SlicePlan(f"move value {value!r} of group {group} to {target}" if moves
                     else f"value {value!r} of group {group} already on {target}",
                     group, _group_slices(slices, group), _group_slices(after, group), moves)


def plan_from_dict(d: Mapping[str, Any]) -> Plan | SlicePlan:
    """A bucket or slice plan from its ``as_dict()`` output."""
    if isinstance(d, Mapping) and d.get("kind") == "slices":
        return SlicePlan.from_dict(d)
    return Plan.from_dict(d)


# -- formatting ------------------------------------------------------------------------


def _spans(buckets: Sequence[int]) -> str:
    """Sorted bucket numbers as ``"0-170, 512-681, 700"``."""
    spans: list[str] = []
    start = prev = None
    for b in buckets:
        if start is not None and b == prev + 1:  # type: ignore[operator]
            prev = b
            continue
        if start is not None:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = b
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(spans)


def _fmt_weight(x: float) -> str:
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.2f}"


def _table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return [line(head), *(line(r) for r in rows)]
