"""`shardkit` option values of the right syntax but a surprising meaning, without a server:
each is refused up front, with one line naming the option and what to give, and exit 2
(not a move started and then stopped, nor an obscure error from a server or Alembic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardkit import cli, rebalance
from shardkit.errors import RebalanceError

ROOT = Path(__file__).resolve().parents[2]
# Unreachable on purpose: nothing below may connect (a password that must never show).
URL = "postgresql+psycopg://app:sekretPW@db{}.invalid/app"


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text("bucket_count = 16\n" + "".join(
        f'[[shards]]\nname = "s{i}"\nprimary = "{URL.format(i)}"\n' for i in range(2))
        + '[groups.users]\ntables = { users = "id" }\n')
    return cfg


def run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:   # argparse's usage errors
        rc = e.code
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "sekretPW" not in cap.out + cap.err
    return rc, cap.out, cap.err


@pytest.mark.parametrize("duty", [1e-300, 1e-9, 0.001])
def test_a_duty_so_small_its_rest_never_ends_is_refused_before_anything_moves(duty):
    # --duty 1e-300 was accepted: the move started, and its first rest overflowed mid-move
    # ("OverflowError: timestamp out of range for platform time_t"), leaving it to resume
    # or abort; 1e-9 rested a billion times as long as it worked.
    with pytest.raises(RebalanceError, match=r"at least 0\.01"):
        rebalance.Mover(None, duty=duty)   # refused before the cluster is looked at


def test_a_tiny_duty_on_the_command_line_is_one_line_naming_the_floor(tmp_path, capsys):
    cfg = write_config(tmp_path)
    for verb in (["apply", "--add", "s1"], ["resume", "1"]):
        rc, out, err = run(["rebalance", *verb, "--duty", "1e-300", "-c", str(cfg)], capsys)
        assert rc == 2
        assert "duty 1e-300" in err and "at least 0.01" in err, err
        assert err.count("\n") == 1


def test_the_least_duty_is_still_accepted():
    with pytest.raises(RebalanceError, match="no catalog"):   # past the duty check
        rebalance.Mover(_NoCatalog(), duty=0.01)


class _NoCatalog:
    catalog = None


@pytest.mark.parametrize("verb", [["resume"], ["abort"], ["abort", "--target-lost"], ["status"]])
@pytest.mark.parametrize("move", ["99999999999999999999999", "9223372036854775808", "0", "-1", "1.5"])
def test_a_move_number_no_move_can_have_is_a_usage_error(verb, move, tmp_path, capsys):
    # A number beyond bigint reached the catalog's server, whose refusal was the error:
    # "UndefinedFunction: function pg_try_advisory_lock(smallint, numeric) does not exist".
    cfg = write_config(tmp_path)
    rc, out, err = run(["rebalance", *verb, move, "-c", str(cfg)], capsys)
    assert rc == 2
    assert f"argument move: {move!r} is not a move's number (1 or more" in err, err
    assert "usage: shardkit rebalance" in err


def test_the_largest_move_number_parses():
    args = cli.build_parser().parse_args(["rebalance", "resume", str(2**63 - 1)])
    assert args.move == 2**63 - 1
    assert cli.build_parser().parse_args(["rebalance", "status"]).move is None


@pytest.mark.parametrize("revision", ["", "  "])
@pytest.mark.parametrize("verb", ["upgrade", "downgrade"])
def test_an_empty_revision_is_refused_before_any_shard_is_touched(verb, revision, tmp_path, capsys):
    # Alembic answered an empty REVISION with a bare "AssertionError" on every shard (exit 1).
    cfg = write_config(tmp_path)   # unreachable shards: refused before connecting
    rc, out, err = run(["migrate", verb, revision, "-c", str(cfg),
                        "--alembic-ini", str(ROOT / "migrations" / "alembic.ini")], capsys)
    assert rc == 2
    assert err.startswith("error: REVISION: ") and "is empty" in err and f"name the revision to {verb}" in err, err
    assert "AssertionError" not in err and out == ""
