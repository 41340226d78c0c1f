"""`rebalance plan|apply --split/--move-value` refusals name the option as the operator
wrote it, and the command that does what they meant."""

from __future__ import annotations

import inproc_cli
import pytest
from test_range_list_e2e import world  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def _cli(cfg, *args):
    return inproc_cli.run(["rebalance", *args, "--config", str(cfg)])


@pytest.mark.parametrize("verb", ["plan", "apply"])
@pytest.mark.parametrize("option,spec,says,sends_to", [
    # events is a range group, stores a list group: each was refused as
    # "error: group: 'events' is a range group (split range groups; move list values)",
    # a field name ("group:") of the Python planner and no command to run.
    ("--move-value", "events:5", "group events is a range group", "--split events:KEY --to SHARD"),
    ("--split", "stores:m", "group stores is a list group", "--move-value stores:VALUE --to SHARD"),
])
def test_a_split_of_a_list_group_or_a_value_move_of_a_range_group_names_the_option(
        world, verb, option, spec, says, sends_to):
    dev, cluster, cfg, Session = world
    version = cluster.catalog.current_map().version
    r = _cli(cfg, verb, option, spec, "--to", "s1", *(("--grace", "0") if verb == "apply" else ()))
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = r.stderr.strip()
    assert line.startswith(f"error: {option} {spec}: {says}"), line
    assert sends_to in line, line
    assert "group: " not in line and "Traceback" not in line, line
    assert cluster.catalog.current_map().version == version  # nothing was published
