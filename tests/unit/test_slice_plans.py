"""Plans that split a range group's range (``--split GROUP:KEY [--lower]``) or move a list
group's value (``--move-value GROUP:VALUE``), at the edges of the key column's type and
under random groups (no server: the key columns' types are given, as a shard reports them).

Invariants: a plan's split changes no key's owner, its move changes exactly the keys of
the moved slice (to the target), the moved slice holds at least one key the column can
hold, the plan is deterministic, and a refused plan is a ShardkitError naming the key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardkit import rebalance
from shardkit._guard import Guarded, KeyType
from shardkit._rebalance_plan import keyless_moves, plan_from_dict, plan_move_value, plan_split_range
from shardkit._slices import SLICE_BASE, Slice, holds_no_key, strategy_from_slices
from shardkit.errors import ConfigurationError, NoShardForKey, RebalanceError, ShardkitError

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
UUID_NIL, UUID_MAX = "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"
SHARDS = ("s0", "s1", "s2")


def _ranges(*spec: tuple, group: str = "g", first: int = SLICE_BASE) -> tuple[Slice, ...]:
    return tuple(Slice(first + i, group, shard, lower=lo, upper=hi) for i, (lo, hi, shard) in enumerate(spec))


def _check(plan, *kinds: str, monkeypatch) -> None:
    """``rebalance.check_slice_plan`` (what `plan` and `apply` run) with the group's key
    columns of types ``kinds`` on the shards."""
    types = [(Guarded(f"t{i}", "k", plan.group, "range", "int" if k[:3] in ("int", "num") else "str"), k)
             for i, k in enumerate(kinds)]
    monkeypatch.setattr(rebalance, "_key_types", lambda *a, **kw: types)
    monkeypatch.setattr(rebalance, "refuse_rows_of_gained", lambda *a, **kw: None)  # (reads the shards)
    rebalance.check_slice_plan(SimpleNamespace(config=None, shard_names=list(SHARDS)), plan)


# -- the edges of the key column's type ---------------------------------------------------------


def test_a_lower_split_at_bigints_minimum_is_refused_it_would_move_nothing(monkeypatch):
    """`plan --split g:-9223372036854775808 --lower` on a bigint column planned moving
    [-inf, -9223372036854775808): no bigint lies there, so the move would copy no row and
    be reported done.  It is refused, naming the key, the column and what to do."""
    slices = _ranges((None, 0, "s0"), (0, None, "s1"))
    plan = plan_split_range(slices, "g", I64_MIN, "s2", lower=True)
    with pytest.raises(RebalanceError) as e:
        _check(plan, "int8", monkeypatch=monkeypatch)
    msg = str(e.value)
    assert f"nothing lies below {I64_MIN}" in msg and "t0.k (int8)" in msg, msg
    assert f"whose keys run from {I64_MIN} to {I64_MAX}" in msg, msg
    assert "leave out --lower" in msg and f"split at a key above {I64_MIN}" in msg, msg
    # A domain over bigint alike (its base type decides).
    deep = KeyType("int8")
    deep.domain = "deep_id"
    with pytest.raises(RebalanceError, match="deep_id"):
        _check(plan, deep, monkeypatch=monkeypatch)
    # One key above the minimum: that key moves; the upper side of the split at the minimum
    # moves every key of its range.
    _check(plan_split_range(slices, "g", I64_MIN + 1, "s2", lower=True), "int8", monkeypatch=monkeypatch)
    _check(plan_split_range(slices, "g", I64_MIN, "s2"), "int8", monkeypatch=monkeypatch)
    # A numeric column holds keys below bigint's minimum: they move.
    _check(plan, "numeric", monkeypatch=monkeypatch)
    # A group with an int8 and a numeric table: the numeric one's keys below it move.
    _check(plan, "int8", "numeric", monkeypatch=monkeypatch)


def test_the_upper_side_at_bigints_maximum_holds_that_key_and_beyond_an_int4s_nothing(monkeypatch):
    slices = _ranges((None, 0, "s0"), (0, None, "s1"))
    _check(plan_split_range(slices, "g", I64_MAX, "s2"), "int8", monkeypatch=monkeypatch)
    # An int4 column: bounds are compared as bigint (so no write fails), but no int4 lies at
    # or above 2**31: that move would move nothing.
    plan = plan_split_range(slices, "g", 2**31, "s2")
    with pytest.raises(RebalanceError, match=r"nothing lies at or above 2147483648.*at most 2147483647"):
        _check(plan, "int4", monkeypatch=monkeypatch)
    _check(plan_split_range(slices, "g", 2**31 - 1, "s2"), "int4", monkeypatch=monkeypatch)
    with pytest.raises(RebalanceError, match="nothing lies below -32768"):
        _check(plan_split_range(slices, "g", -(2**15), "s2", lower=True), "int2", monkeypatch=monkeypatch)
    # int2 and int8 tables in one group: the int8 table holds keys beyond int2's range.
    _check(plan_split_range(slices, "g", 2**31, "s2"), "int2", "int8", monkeypatch=monkeypatch)
    # Beyond bigint stays refused as before (a bound the guard cannot cast).
    with pytest.raises(RebalanceError, match="beyond the range"):
        _check(plan_split_range(slices, "g", I64_MAX + 1, "s2"), "int8", monkeypatch=monkeypatch)


def test_a_lower_split_at_the_lowest_string_or_uuid_is_refused(monkeypatch):
    slices = _ranges((None, "m", "s0"), ("m", None, "s1"))
    with pytest.raises(ConfigurationError) as e:
        plan_split_range(slices, "g", "", "s2", lower=True)
    assert "lies below ''" in str(e.value) and "without --lower" in str(e.value), str(e.value)
    assert plan_split_range(slices, "g", "", "s2").moves  # every key of [-inf, 'm') but none
    # A uuid column, whose keys the slices compare by their text form: none below the nil uuid.
    mid = "80000000-0000-0000-0000-000000000000"
    uu = _ranges((None, mid, "s0"), (mid, None, "s1"))
    with pytest.raises(RebalanceError, match=f"nothing lies below '{UUID_NIL}'"):
        _check(plan_split_range(uu, "g", UUID_NIL, "s2", lower=True), "uuid", monkeypatch=monkeypatch)
    _check(plan_split_range(uu, "g", UUID_NIL, "s2"), "uuid", monkeypatch=monkeypatch)
    _check(plan_split_range(uu, "g", UUID_MAX, "s2"), "uuid", monkeypatch=monkeypatch)
    # Text naming no uuid is refused as such first; a text column holds such keys.
    with pytest.raises(RebalanceError, match="'g' is not a uuid"):
        _check(plan_split_range(uu, "g", "g", "s2"), "uuid", monkeypatch=monkeypatch)
    _check(plan_split_range(uu, "g", "g", "s2"), "text", monkeypatch=monkeypatch)
    # (Were the uuid check not there, no uuid's text sorts at or above 'g'.)
    assert keyless_moves(plan_split_range(uu, "g", "g", "s2"), UUID_NIL, UUID_MAX)


def test_splits_at_existing_boundaries_and_open_ends():
    slices = _ranges((0, 10, "s0"), (10, 20, "s1"), (30, None, "s0"))
    # At a boundary: nothing splits, the range starting (or, --lower, ending) there moves.
    up = plan_split_range(slices, "g", 10, "s2")
    assert not up.splits and [(m.bucket, m.target) for m in up.moves] == [(SLICE_BASE + 1, "s2")]
    low = plan_split_range(slices, "g", 10, "s2", lower=True)
    assert not low.splits and [m.bucket for m in low.moves] == [SLICE_BASE]
    # The top of a bounded range with a gap above it: --lower moves that range.
    assert [m.bucket for m in plan_split_range(slices, "g", 20, "s2", lower=True).moves] == [SLICE_BASE + 1]
    # Below the first, bounded start, nothing is the group's: refused, saying what to do.
    with pytest.raises(ConfigurationError, match=r"no range of group 'g' ends at 0.*split at a key above"):
        plan_split_range(slices, "g", 0, "s2", lower=True)
    with pytest.raises(ConfigurationError, match="no range of group 'g' ends at 30"):
        plan_split_range(slices, "g", 30, "s2", lower=True)
    # A key no range holds: its gap (open below the lowest range) becomes a range on the target.
    for at, gap in ((-1, (None, 0)), (20, (20, 30)), (25, (20, 30))):
        plan = plan_split_range(slices, "g", at, "s2")
        assert not plan.moves and [(s.lower, s.upper, s.shard) for s in plan.gained] == [(*gap, "s2")]


def test_a_key_of_another_type_is_refused_at_a_bound_too():
    """`plan_split_range(slices, "g", 1.0, ..., lower=True)` (or True) where a range ends at
    1 and none goes on: the key's type was checked only once the range was split, and that
    path split nothing, so the float (bool) was taken for the int bound."""
    slices = _ranges((None, 1, "s0"), (5, None, "s1"))
    for bad in (1.0, True):
        with pytest.raises(ConfigurationError, match=f"{bad!r} .* is not a key of group 'g'"):
            plan_split_range(slices, "g", bad, "s2", lower=True)


# -- random range groups --------------------------------------------------------------------------

INT_EDGES = st.one_of(st.integers(-40, 40), st.sampled_from(
    [I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, -(2**31), 2**31 - 1, 2**31]))
STR_EDGES = st.text(alphabet="ab\x00\U0010ffff", max_size=3)


@st.composite
def range_groups(draw, edges):
    """Sorted bounds, each gap between neighbours a range or a hole, the ends open or not."""
    bounds = sorted(draw(st.sets(edges, min_size=1, max_size=6)))
    points = ([None] if draw(st.booleans()) else []) + bounds + ([None] if draw(st.booleans()) else [])
    spans = list(zip(points, points[1:]))
    kept = [sp for sp in spans if draw(st.booleans())] or [spans[0] if spans else (None, None)]
    assume(kept != [(None, None)])
    return bounds, _ranges(*((lo, hi, draw(st.sampled_from(SHARDS))) for lo, hi in kept))


def _owner(slices, key):
    try:
        return strategy_from_slices(slices).shard_for_key(key)
    except NoShardForKey:
        return None


def _near(values, step):
    out = set()
    for v in values:
        if v is None:
            continue
        out.add(v)
        out |= {v - 1, v + 1} if step else {v + "\x00", v[:-1]}
    return out


def _split_property(slices, bounds, at, lower, target, kinds, monkeypatch, int_keys):
    try:
        plan = plan_split_range(slices, "g", at, target, lower=lower)
        _check(plan, *kinds, monkeypatch=monkeypatch)
    except ShardkitError as e:
        assert repr(at) in str(e) or str(at) in str(e), str(e)
        return None
    again = plan_split_range(slices, "g", at, target, lower=lower)
    assert again.as_dict() == plan.as_dict()  # deterministic
    assert plan_from_dict(plan.as_dict()).as_dict() == plan.as_dict()
    ids = [s.id for s in plan.split]
    assert len(ids) == len(set(ids)) and set(s.id for s in slices) <= set(ids)
    moved = {m.bucket for m in plan.moves}
    assert len(moved) <= 1 and all(m.target == target for m in plan.moves)
    side = next((s for s in plan.split if s.id in moved), None)
    if side is not None:
        assert (side.upper if lower else side.lower) == at  # the side asked for
        # The moved slice holds a key the column can hold.
        lo = side.lower
        if int_keys:
            low, high = rebalance.key_span(kinds)
            if low is None:  # (numeric: any integer)
                assert side.contains(at - 1 if lower else at), side
            else:
                lo = low if lo is None or lo < low else lo
                assert lo <= high and side.contains(lo), side
        else:
            assert side.contains("" if lo is None else lo), side
    keys = _near([*bounds, at], int_keys) | ({I64_MIN, I64_MAX, 0} if int_keys else {"", "a"})
    for k in keys:
        before = _owner(slices, k)
        # A split moves no key (a key no range held may gain the target: at's gap, nothing moves).
        gained = before is None and any(g.contains(k) for g in plan.gained)
        assert _owner(plan.split, k) == (target if gained else before), k
        assert _owner(plan.new, k) == (target if gained or (side is not None and side.contains(k)) else before), k
    assert not plan.gained or (_owner(slices, at) is None and not plan.moves and not lower)
    return plan


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(group=range_groups(INT_EDGES), at=st.one_of(INT_EDGES, st.sampled_from([I64_MIN - 1, I64_MAX + 1])),
       lower=st.booleans(), target=st.sampled_from(SHARDS), kind=st.sampled_from(["int8", "int4", "numeric"]))
def test_random_integer_range_groups_split_soundly(group, at, lower, target, kind):
    bounds, slices = group
    if kind == "int4":
        assume(all(-(2**31) <= b < 2**31 for b in bounds))  # (init refuses such a bound... on bigint only)
    with pytest.MonkeyPatch.context() as mp:
        plan = _split_property(slices, bounds, at, lower, target, [kind], mp, True)
    if plan is not None and plan.moves and kind != "numeric":
        lo, hi = rebalance.key_span([kind])
        assert not keyless_moves(plan, lo, hi)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(group=range_groups(STR_EDGES), at=STR_EDGES, lower=st.booleans(), target=st.sampled_from(SHARDS))
def test_random_string_range_groups_split_soundly(group, at, lower, target):
    bounds, slices = group
    with pytest.MonkeyPatch.context() as mp:
        _split_property(slices, bounds, at, lower, target, ["text"], mp, False)


@settings(max_examples=100, deadline=None)
@given(at=st.one_of(st.none(), st.floats(allow_nan=True), st.booleans(), st.binary(max_size=2),
                    st.text(max_size=2), st.integers()),
       lower=st.booleans())
def test_keys_of_another_type_are_refused_not_crashed_on(at, lower):
    slices = _ranges((None, 1, "s0"), (5, 10, "s1"), (10, None, "s2"))
    try:
        plan_split_range(slices, "g", at, "s0", lower=lower)
    except ShardkitError as e:
        assert repr(at) in str(e), str(e)
        return
    assert isinstance(at, int) and not isinstance(at, bool)


def test_holds_no_key():
    assert holds_no_key(Slice(1, "g", "s0", upper=""))
    assert not holds_no_key(Slice(1, "g", "s0", upper="\x00"))
    assert holds_no_key(Slice(1, "g", "s0", upper=I64_MIN), I64_MIN, I64_MAX)
    assert not holds_no_key(Slice(1, "g", "s0", upper=I64_MIN + 1), I64_MIN, I64_MAX)
    assert holds_no_key(Slice(1, "g", "s0", lower=I64_MAX + 1), I64_MIN, I64_MAX)
    assert not holds_no_key(Slice(1, "g", "s0", lower=I64_MAX), I64_MIN, I64_MAX)
    assert not holds_no_key(Slice(1, "g", "s0", values=("a",)))


# -- list groups ----------------------------------------------------------------------------------

VALUES = st.sampled_from(["", "a", "b", "uk", "us", "\x00"])


@st.composite
def list_groups(draw):
    """Slices each listing one or more values, and a default or not."""
    values = sorted(draw(st.sets(VALUES, min_size=1, max_size=5)))
    out, n, i = [], SLICE_BASE, 0
    while i < len(values):
        take = draw(st.integers(1, len(values) - i))
        out.append(Slice(n, "L", draw(st.sampled_from(SHARDS)), values=tuple(values[i:i + take])))
        n, i = n + 1, i + take
    if draw(st.booleans()):
        out.append(Slice(n, "L", draw(st.sampled_from(SHARDS)), default=True))
    return tuple(draw(st.permutations(out)))


@settings(max_examples=300, deadline=None)
@given(slices=list_groups(), value=st.one_of(VALUES, st.integers(0, 2), st.none()),
       target=st.sampled_from(SHARDS))
def test_random_list_groups_move_one_value_soundly(slices, value, target):
    listed = {v for s in slices for v in s.values}
    try:
        plan = plan_move_value(slices, "L", value, target)
    except ShardkitError as e:
        assert repr(value) in str(e), str(e)
        assert not isinstance(value, str) or (value not in listed and not any(s.default for s in slices))
        return
    assert isinstance(value, str)
    assert plan_move_value(slices, "L", value, target).as_dict() == plan.as_dict()
    assert plan_from_dict(plan.as_dict()).as_dict() == plan.as_dict()
    [mine] = [s for s in plan.split if value in s.values]
    assert mine.values == (value,) and not mine.default
    assert [m.bucket for m in plan.moves] == ([] if mine.shard == target else [mine.id])
    gained = value not in listed and not any(s.default for s in slices)  # (a new slice on the target)
    assert [s.values for s in plan.gained] == ([(value,)] if gained else []) and not (gained and plan.moves)
    for v in listed | {value, "zz"}:
        before = _owner(slices, v)
        assert _owner(plan.split, v) == (target if gained and v == value else before)
        assert _owner(plan.new, v) == (target if v == value else before)


def test_move_value_present_absent_and_default():
    slices = (Slice(SLICE_BASE, "L", "s0", values=("uk", "eu")), Slice(SLICE_BASE + 1, "L", "s1", default=True))
    plan = plan_move_value(slices, "L", "eu", "s2")
    assert plan.splits and [(m.source, m.target) for m in plan.moves] == [("s0", "s2")]
    plan = plan_move_value(slices, "L", "br", "s2")  # only the default held it
    assert plan.splits and [(m.source, m.target) for m in plan.moves] == [("s1", "s2")]
    nothing = plan_move_value(slices, "L", "br", "s1")
    assert not nothing.moves and "already on s1" in nothing.reason
    # No default: a value no slice lists gets a new slice on the target; nothing moves.
    added = plan_move_value(slices[:1], "L", "br", "s2")
    assert not added.moves and [(s.values, s.shard) for s in added.gained] == [(("br",), "s2")]
    with pytest.raises(ConfigurationError, match="7 .* is not a key of group 'L'"):
        plan_move_value(slices, "L", 7, "s2")


def test_moving_a_list_value_no_row_can_hold_is_refused(monkeypatch):
    """A value above an int4 column's maximum (below bigint's, so the guard takes it) is
    no row's: moving it would move nothing.  Refused as a split's empty side is."""
    slices = (Slice(SLICE_BASE, "L", "s0", values=(1, 2)), Slice(SLICE_BASE + 1, "L", "s1", default=True))
    plan = plan_move_value(slices, "L", 2**31, "s2")
    with pytest.raises(RebalanceError) as e:
        _check(plan, "int4", monkeypatch=monkeypatch)
    assert "2147483648 lies between -2147483648 and 2147483647" in str(e.value), str(e.value)
    assert "t0.k (int4)" in str(e.value) and "move a value the column can hold" in str(e.value)
    _check(plan, "int8", monkeypatch=monkeypatch)
    _check(plan_move_value(slices, "L", 2**31 - 1, "s2"), "int4", monkeypatch=monkeypatch)
    _check(plan_move_value(slices, "L", 2, "s2"), "int2", monkeypatch=monkeypatch)
    assert holds_no_key(Slice(1, "L", "s0", values=(2**31, -(2**31) - 1)), -(2**31), 2**31 - 1)
    assert not holds_no_key(Slice(1, "L", "s0", values=(2**31, 5)), -(2**31), 2**31 - 1)
    assert not holds_no_key(Slice(1, "L", "s0", default=True), 0, 0)
