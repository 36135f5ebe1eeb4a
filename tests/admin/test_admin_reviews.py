"""The review arithmetic: who acted, and the series false-alarm target a slice target implies."""

from __future__ import annotations

import pytest
from scipy.stats import binom

from node.admin.auth import Identity
from node.admin.reviews import ModelStats, actor_name, binomial_tail


@pytest.mark.parametrize(("n", "p", "k"), [(120, 0.01, 3), (36, 0.05, 1), (10, 0.2, 10),
                                           (5, 0.3, 0), (5, 0.3, 6)])
def test_binomial_tail_matches_scipy(n: int, p: float, k: int) -> None:
    assert binomial_tail(n, p, k) == pytest.approx(float(binom.sf(k - 1, n, p)), abs=1e-12)


def test_expected_series_rate_averages_over_the_scored_series() -> None:
    stats = ModelStats(model="m 1", scored=2, flagged=1, confirmed=0, false_alarms=1,
                       false_alarm_rate=0.5, series_shapes=((120, 3), (36, 1)))
    expected = (binom.sf(2, 120, 0.01) + binom.sf(0, 36, 0.01)) / 2
    assert stats.expected_false_alarm_rate(0.01) == pytest.approx(expected)
    assert ModelStats("m", 0, 0, 0, 0, None).expected_false_alarm_rate(0.01) is None


def test_actor_is_the_authenticated_name_before_a_typed_one() -> None:
    assert actor_name(Identity("alice", "cookie"), "mallory", "10.0.0.1") == "alice"
    assert actor_name(Identity("", "bearer"), " bob ", "10.0.0.1") == "bob"
    assert actor_name(Identity("", "open"), "", "127.0.0.1") == "anonymous@127.0.0.1"
