"""Slices of range and list groups, and the plans that split and move them (no server)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit._config import load_config, with_bucket_map
from shardkit._rebalance_plan import SlicePlan, plan_from_dict, plan_move_value, plan_split_range
from shardkit._slices import (
    SLICE_BASE,
    add_missing_groups,
    carve_value,
    initial_slices,
    movable_kind,
    reassign,
    slices_from_json,
    slices_to_json,
    split_range,
    strategy_from_slices,
)
from shardkit.errors import ConfigurationError


def _config(groups: dict) -> object:
    return load_config({"bucket_count": 8, "shards": [
        {"name": f"s{i}", "primary": f"postgresql://u@h/db{i}"} for i in range(3)], "groups": groups})


GROUPS = {
    "orders": {"strategy": "range", "tables": {"orders": "no", "lines": "order_no"},
               "ranges": [{"to": 100, "shard": "s0"}, {"from": 100, "to": 500, "shard": "s1"},
                          {"from": 600, "shard": "s2"}]},
    "stores": {"strategy": "list", "tables": {"stores": "region"},
               "values": {"s0": ["uk", "eu"], "s1": ["us"]}, "default": "s1"},
    "users": {"strategy": "hash", "tables": {"users": "id"}},
}


def test_initial_slices_number_ranges_values_and_default_above_the_buckets():
    cfg = _config(GROUPS)
    slices = initial_slices(cfg.groups)
    assert [s.id for s in slices] == list(range(SLICE_BASE, SLICE_BASE + 7))
    assert [(s.group, s.lower, s.upper, s.values, s.default, s.shard) for s in slices] == [
        ("orders", None, 100, (), False, "s0"), ("orders", 100, 500, (), False, "s1"),
        ("orders", 600, None, (), False, "s2"),
        ("stores", None, None, ("eu",), False, "s0"), ("stores", None, None, ("uk",), False, "s0"),
        ("stores", None, None, ("us",), False, "s1"), ("stores", None, None, (), True, "s1")]
    assert initial_slices(cfg.groups) == slices  # deterministic


def test_groups_that_cannot_move_say_why():
    cfg = _config({
        "mixed": {"strategy": "list", "tables": {"t": "k"}, "values": {"s0": [1, 2.5]}},
        "pair": {"strategy": "range", "tables": {"p": ["a", "b"]}, "ranges": [{"shard": "s0"}]},
        "floats": {"strategy": "range", "tables": {"f": "x"}, "ranges": [{"to": 1.5, "shard": "s0"}]},
    })
    why = {g.name: movable_kind(g) for g in cfg.groups}
    assert why["mixed"][0] is None and "all integers or all strings" in why["mixed"][1]
    assert why["pair"] == (None, "group pair has a composite shard key")
    assert why["floats"][0] is None
    assert initial_slices(cfg.groups) == ()


def test_routing_from_slices_matches_the_config():
    cfg = _config(GROUPS)
    routed = with_bucket_map(cfg, cfg.bucket_map, initial_slices(cfg.groups))
    old = {g.name: g.strategy for g in cfg.groups}
    new = {g.name: g.strategy for g in routed.groups}
    for key in [-5, 0, 99, 100, 499, 600, 10**9]:
        assert new["orders"].shard_for_key(key) == old["orders"].shard_for_key(key)
    for key in ["uk", "eu", "us", "br", ""]:
        assert new["stores"].shard_for_key(key) == old["stores"].shard_for_key(key)
    assert new["orders"].unit_for_key(100) == SLICE_BASE + 1
    assert new["orders"].unit_for_key(550) is None  # in the gap
    assert new["stores"].unit_for_key("br") == SLICE_BASE + 6  # the default
    assert routed.slices == initial_slices(cfg.groups)


def test_catalog_slices_on_an_unknown_shard_are_refused():
    cfg = _config(GROUPS)
    slices = reassign(initial_slices(cfg.groups), {SLICE_BASE: "s9"})
    with pytest.raises(ConfigurationError, match="s9"):
        with_bucket_map(cfg, cfg.bucket_map, slices)


def test_split_and_carve():
    slices = initial_slices(_config(GROUPS).groups)
    after, upper = split_range(slices, "orders", 300)
    assert upper.id == SLICE_BASE + 7 and (upper.lower, upper.upper, upper.shard) == (300, 500, "s1")
    assert [(s.lower, s.upper) for s in after if s.group == "orders"] == [
        (None, 100), (100, 300), (300, 500), (600, None)]
    # Splitting at an existing boundary splits nothing.
    same, existing = split_range(after, "orders", 300)
    assert same == after and existing == upper
    with pytest.raises(ConfigurationError, match="no range of group 'orders' holds 550"):
        split_range(slices, "orders", 550)
    with pytest.raises(ConfigurationError, match="integer"):
        split_range(slices, "orders", "300")
    with pytest.raises(ConfigurationError, match="list group"):
        split_range(slices, "stores", "x")

    after, br = carve_value(slices, "stores", "br")
    assert br.values == ("br",) and br.shard == "s1" and br.id == SLICE_BASE + 7
    same, uk = carve_value(slices, "stores", "uk")
    assert same == slices and uk.values == ("uk",)
    with pytest.raises(ConfigurationError, match="range group"):
        carve_value(slices, "orders", 5)


def test_a_slice_listing_several_values_gives_one_up():
    slices = slices_from_json([{"id": SLICE_BASE, "group": "g", "shard": "s0", "values": ["a", "b", "c"]}])
    after, b = carve_value(slices, "g", "b")
    assert [(s.id, s.values) for s in after] == [(SLICE_BASE, ("a", "c")), (SLICE_BASE + 1, ("b",))]
    with pytest.raises(ConfigurationError, match="no default"):
        carve_value(slices, "g", "z")


def test_json_round_trip():
    slices = initial_slices(_config(GROUPS).groups)
    assert slices_from_json(slices_to_json(slices)) == slices
    with pytest.raises(ConfigurationError, match=r"slices\[0\]"):
        slices_from_json([{"group": "g"}])


def test_add_missing_groups_numbers_after_the_highest():
    cfg = _config(GROUPS)
    only_orders = tuple(s for s in initial_slices(cfg.groups) if s.group == "orders")
    full = add_missing_groups(only_orders, cfg.groups)
    assert full[:3] == only_orders
    assert [s.id for s in full[3:]] == list(range(SLICE_BASE + 3, SLICE_BASE + 7))
    assert add_missing_groups(full, cfg.groups) == full


def test_split_plan_moves_one_side():
    slices = initial_slices(_config(GROUPS).groups)
    plan = plan_split_range(slices, "orders", 300, "s2")
    assert plan.splits
    [m] = plan.moves
    assert (m.bucket, m.source, m.target) == (SLICE_BASE + 7, "s1", "s2")
    new = strategy_from_slices(plan.new)
    assert [new.shard_for_key(k) for k in (150, 299, 300, 499)] == ["s1", "s1", "s2", "s2"]
    lower = plan_split_range(slices, "orders", 300, "s0", lower=True)
    assert [(m.bucket, m.target) for m in lower.moves] == [(SLICE_BASE + 1, "s0")]
    assert "First split" in plan.render() and "[300, 500)" in plan.render()
    assert plan_from_dict(plan.as_dict()).as_dict() == plan.as_dict()
    assert isinstance(plan_from_dict(plan.as_dict()), SlicePlan)
    nothing = plan_split_range(slices, "orders", 300, "s1")
    assert not nothing.moves and "already" in nothing.reason


def test_value_plan():
    slices = initial_slices(_config(GROUPS).groups)
    plan = plan_move_value(slices, "stores", "br", "s2")
    assert plan.splits and strategy_from_slices(plan.new).shard_for_key("br") == "s2"
    assert strategy_from_slices(plan.new).shard_for_key("jp") == "s1"
    plan = plan_move_value(slices, "stores", "uk", "s2")
    assert not plan.splits and [m.bucket for m in plan.moves] == [SLICE_BASE + 4]


def test_slice_plan_refuses_moves_that_do_not_match_its_slices():
    slices = initial_slices(_config(GROUPS).groups)
    plan = plan_move_value(slices, "stores", "uk", "s2")
    d = plan.as_dict()
    d["moves"][0]["source"] = "s1"
    with pytest.raises(ConfigurationError, match="is not on s1"):
        plan_from_dict(d)


@settings(max_examples=200, deadline=None)
@given(bounds=st.lists(st.integers(-1000, 1000), min_size=1, max_size=6, unique=True),
       at=st.integers(-1200, 1200), target=st.sampled_from(["s0", "s1", "s2"]),
       keys=st.lists(st.integers(-1500, 1500), min_size=1, max_size=50))
def test_a_split_moves_exactly_the_keys_of_one_side(bounds, at, target, keys):
    bounds = sorted(bounds)
    edges = [None, *bounds, None]
    ranges = [{"shard": f"s{i % 3}", **({"from": lo} if lo is not None else {}),
               **({"to": hi} if hi is not None else {})} for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    cfg = _config({"g": {"strategy": "range", "tables": {"t": "k"}, "ranges": ranges}})
    slices = initial_slices(cfg.groups)
    before = strategy_from_slices(slices)
    after_split, upper = split_range(slices, "g", at)
    split = strategy_from_slices(after_split)
    plan = plan_split_range(slices, "g", at, target)
    moved = strategy_from_slices(plan.new)
    for k in keys:
        # A split never changes where a key lives; the move changes exactly the upper side.
        assert split.shard_for_key(k) == before.shard_for_key(k)
        expected = target if upper.contains(k) else before.shard_for_key(k)
        assert moved.shard_for_key(k) == expected
        assert split.unit_for_key(k) == next(s.id for s in after_split if s.contains(k))
