"""When the mover's catch-up ends and goes to the cut-over (rebalance._catch_up_ends): a round
below the threshold, rounds that no longer shrink the backlog, or the round limit."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, strategies as st

from shardkit import rebalance
from shardkit.rebalance import _CATCH_UP_ROUNDS, _CHANGES_PER_ROUND, _CUTOVER_BELOW, _catch_up_ends

ABOVE = st.integers(min_value=_CUTOVER_BELOW, max_value=10 * _CHANGES_PER_ROUND)


def ends_after(totals: list[int]) -> tuple[int, str]:
    """The rounds the catch-up runs and why it ends, rounds applying ``totals`` changes
    (the last one repeated as often as it goes on)."""
    rounds: list[int] = []
    while True:
        rounds.append(totals[min(len(rounds), len(totals) - 1)])
        if why := _catch_up_ends(rounds):
            return len(rounds), why


def test_a_round_below_the_threshold_ends_it():
    assert ends_after([40_000, 9_000, 2_000, _CUTOVER_BELOW - 1]) == (4, "below threshold")
    assert ends_after([0]) == (1, "below threshold")


def test_rounds_that_stop_shrinking_end_it():
    # BENCHMARKS.md section 4: rounds of about 700 changes, every one, until the round limit.
    assert ends_after([3_000, 700]) == (4, "no longer shrinking")
    # Rounds that wobble around a level end it too (never twice larger than the round before).
    assert ends_after([3_000, 700, 690, 705, 695, 710, 698]) == (5, "no longer shrinking")
    # Rising rounds (writers writing faster than the catch-up applies): at the third.
    assert ends_after([1_000, 2_000, 4_000, 8_000]) == (3, "no longer shrinking")


def test_one_round_that_does_not_shrink_does_not_end_it():
    assert ends_after([20_000, 5_000, 5_100, 1_200, 300]) == (5, "below threshold")
    assert ends_after([20_000, 30_000, 8_000, 2_000, 100]) == (5, "below threshold")


def test_the_round_limit_ends_rounds_that_keep_shrinking():
    totals = [100_000 - 1_000 * i for i in range(_CATCH_UP_ROUNDS + 5)]
    assert ends_after(totals) == (_CATCH_UP_ROUNDS, "round limit")


@given(st.lists(st.integers(min_value=0, max_value=10 * _CHANGES_PER_ROUND), min_size=1,
                max_size=_CATCH_UP_ROUNDS + 10))
def test_it_always_ends_within_the_round_limit(totals):
    n, why = ends_after(totals)
    assert 1 <= n <= _CATCH_UP_ROUNDS
    assert why in ("below threshold", "no longer shrinking", "round limit")
    rounds = [totals[min(i, len(totals) - 1)] for i in range(n)]
    # It ends at the first round that gives a reason, never earlier.
    assert all(_catch_up_ends(rounds[:i]) is None for i in range(1, n))
    if why == "below threshold":
        assert rounds[-1] < _CUTOVER_BELOW
    else:
        assert min(rounds) >= _CUTOVER_BELOW
    if why == "no longer shrinking":
        # Two rounds in a row brought the backlog no lower than it had been.
        assert n >= 3 and rounds[-2] >= min(rounds[:-2]) and rounds[-1] >= min(rounds[:-2])


@given(st.lists(ABOVE, min_size=1, max_size=_CATCH_UP_ROUNDS - 1, unique=True))
def test_rounds_that_shrink_above_the_threshold_go_on(totals):
    rounds = sorted(totals, reverse=True)
    assert all(_catch_up_ends(rounds[:i]) is None for i in range(1, len(rounds) + 1))


@given(st.lists(ABOVE, min_size=2, max_size=_CATCH_UP_ROUNDS // 2, unique=True), st.data())
def test_a_single_round_that_does_not_shrink_goes_on(totals, data):
    """Shrinking rounds with one bump (a round no smaller than the fewest before it),
    each followed by a new low: no "no longer shrinking"."""
    rounds = sorted(totals, reverse=True)
    at = data.draw(st.integers(min_value=1, max_value=len(rounds) - 1))
    bump = data.draw(st.integers(min_value=rounds[at - 1], max_value=10 * _CHANGES_PER_ROUND))
    rounds.insert(at, bump)
    assert all(_catch_up_ends(rounds[:i]) is None for i in range(1, len(rounds) + 1))


def _catching_up(reads: list[int]) -> tuple[int, int, str]:
    """Mover._catch_up against reads of the change log that apply ``reads`` changes each."""
    it = iter(reads)
    fake = SimpleNamespace(_catch_up_round=lambda *a: next(it))
    return rebalance.Mover._catch_up(fake, _source(lambda: 0), None, [], [], "s1")  # type: ignore[arg-type]


def _source(highest_id):
    """A source connection whose change log's highest id is ``highest_id()``."""
    return SimpleNamespace(execute=lambda q, *a: SimpleNamespace(fetchone=lambda: (highest_id(),)))


class Log:
    """A change log on the source: ``backlog`` changes logged before the catch-up, and
    writers that log ``per_read`` more while each read of it runs."""

    def __init__(self, backlog: int, per_read: int) -> None:
        self.next_id, self.pending, self.per_read, self.reads = 1, [], per_read, 0
        self.log(backlog)

    def log(self, n: int) -> None:
        self.pending += range(self.next_id, self.next_id + n)
        self.next_id += n

    def read(self, *args) -> int:
        """Mover._catch_up_round: the first _CHANGES_PER_ROUND changes of ids up to its last
        argument (the round's mark)."""
        up_to = args[-1]
        self.reads += 1
        assert self.reads < 10_000, "the catch-up does not end"
        taken = [i for i in self.pending[:_CHANGES_PER_ROUND] if i <= up_to]
        self.pending = self.pending[len(taken):]
        self.log(self.per_read)
        return len(taken)

    def catch_up(self) -> tuple[int, int, str]:
        mover = SimpleNamespace(_catch_up_round=self.read)
        return rebalance.Mover._catch_up(mover, _source(lambda: self.next_id - 1),  # type: ignore[arg-type]
                                         None, [], [], "s1")


def test_writers_that_log_a_full_read_while_each_read_runs_do_not_keep_a_round_going():
    """A round reads up to the log's highest id when it began: writers that fill every
    read (faster than the catch-up) end each round all the same, and the rounds that
    then stop shrinking end the catch-up."""
    changes, rounds, why = Log(backlog=20_000, per_read=_CHANGES_PER_ROUND).catch_up()
    assert (rounds, why) == (3, "no longer shrinking")


def test_a_large_backlog_shrinking_round_by_round_ends_below_the_threshold():
    """A round's size is the backlog it began with: a large one (a long copy) drained
    over many reads is not mistaken for rounds that no longer shrink."""
    changes, rounds, why = Log(backlog=200_000, per_read=100).catch_up()
    assert why == "below threshold"
    assert changes >= 200_000


def test_catch_up_counts_a_round_of_several_reads_as_one():
    full = _CHANGES_PER_ROUND
    # Rounds of 2 reads (full, then 700): 5,700 changes each, which stop shrinking.
    assert _catching_up([full, 9_000 - full, full, 700, full, 700, full, 700]) == (
        9_000 + 3 * (full + 700), 4, "no longer shrinking")
    assert _catching_up([full, full, 10, 300]) == (2 * full + 10 + 300, 2, "below threshold")


def test_catch_up_without_a_threshold_ends_when_nothing_shrinks(monkeypatch):
    """The integration test's setting: only the new rule, or the round limit, ends it."""
    monkeypatch.setattr(rebalance, "_CUTOVER_BELOW", 0)
    assert _catching_up([3, 0, 0, 0]) == (3, 4, "no longer shrinking")
    assert _catching_up([5, 2, 4, 1, 3, 2]) == (17, 6, "no longer shrinking")
