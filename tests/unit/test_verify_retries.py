"""verify runs again when the catalog's state changes while it reads the shards."""

from collections import Counter

from shardkit import verify as verify_mod
from shardkit.verify import TableReport, VerifyReport, verify


class FakeCluster:
    """Only what verify() asks of a Cluster outside the per-shard checks."""

    def __init__(self, changes: int) -> None:
        self.changes = changes   # how many refreshes install a new router
        self.router = object()
        self.refreshes = 0

    def refresh_map(self) -> None:
        self.refreshes += 1
        if self.changes:
            self.changes -= 1
            self.router = object()


def _report(ok: bool) -> VerifyReport:
    t = TableReport("t", "s1", rows=3)
    if not ok:
        t.misplaced = Counter({"s0": 3})
    return VerifyReport([t], [], [], 7)


def test_problems_by_an_unchanged_state_are_reported_after_one_check(monkeypatch):
    calls = []
    monkeypatch.setattr(verify_mod, "_verify_by", lambda c, r, b, s: calls.append(r) or _report(False))
    report = verify(FakeCluster(changes=0))  # type: ignore[arg-type]
    assert len(calls) == 1 and not report.ok and not report.map_changed
    assert "changed while" not in report.render()


def test_a_state_that_changed_is_checked_again_and_a_clean_check_is_kept(monkeypatch):
    results = iter([_report(False), _report(True)])
    calls = []
    monkeypatch.setattr(verify_mod, "_verify_by", lambda c, r, b, s: calls.append(r) or next(results))
    cluster = FakeCluster(changes=2)
    report = verify(cluster)  # type: ignore[arg-type]
    assert report.ok and not report.map_changed
    assert len(calls) == 2 and calls[0] is not calls[1], "the second check used the same state"


def test_a_state_that_keeps_changing_is_said_so(monkeypatch):
    calls = []
    monkeypatch.setattr(verify_mod, "_verify_by", lambda c, r, b, s: calls.append(r) or _report(False))
    report = verify(FakeCluster(changes=100), attempts=3)  # type: ignore[arg-type]
    assert len(calls) == 3 and not report.ok and report.map_changed
    assert report.as_dict()["map_changed"] is True
    assert "changed while the shards were read" in report.render()


def test_a_clean_report_of_no_tables_says_nothing_was_checked():
    """A config without groups gives verify no table to read: "clean" alone would read as
    if the shards had been checked."""
    from shardkit.verify import TableReport, VerifyReport
    assert VerifyReport([], []).render() == \
        "verify: clean (no sharded table is configured: nothing was checked)"
    one = TableReport(table="users", shard="s0", rows=3, method="sql")
    assert VerifyReport([one], []).render().splitlines()[-1] == "verify: clean"
