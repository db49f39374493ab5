"""The benchmark's statistics on synthetic timings (never on wall-clock speed)."""
import itertools
import random

import pytest

from dcft_kernels.paired_timing import median_interval, paired_ratios, run_rounds


def _noisy_pair(true_ratio, rounds, seed=0):
    """Baseline and row timings sharing a round-to-round machine slowdown, each with its own noise."""
    rng = random.Random(seed)
    base, row = [], []
    for _ in range(rounds):
        machine = rng.choice([1.0, 1.0, 1.3, 2.0])  # another process now and then
        base.append(10.0 * machine * rng.uniform(0.98, 1.02))
        row.append(10.0 * true_ratio * machine * rng.uniform(0.98, 1.02))
    return row, base


def test_a_known_ratio_is_recovered_inside_a_narrow_interval():
    row, base = _noisy_pair(1.07, 60)
    summary = paired_ratios(row, base)
    assert summary.lo <= 1.07 <= summary.hi
    assert summary.hi - summary.lo < 0.02
    assert summary.verdict == "slower"


def test_unpaired_medians_would_not_have_recovered_it():
    """Why we pair: the ratio of medians taken in different machine phases is far off."""
    row, base = _noisy_pair(1.07, 60)
    slow_phase_row = [t * 2.0 for t in row]  # the row timed while the machine was busy
    assert paired_ratios(row, base).ratio == pytest.approx(1.07, abs=0.01)
    assert sorted(slow_phase_row)[30] / sorted(base)[30] > 1.5


def test_an_impossible_ratio_is_flagged_within_noise():
    row, base = _noisy_pair(0.93, 40)  # an adapter "faster" than the layer it wraps
    summary = paired_ratios(row, base)
    assert summary.ratio < 1.0 and summary.verdict == "within noise"


def test_an_interval_holding_one_is_within_noise():
    rng = random.Random(3)
    base = [10.0] * 9
    row = [10.0 * rng.uniform(0.9, 1.12) for _ in range(9)]
    summary = paired_ratios(row, base)
    assert summary.lo <= 1.0 <= summary.hi and summary.verdict == "within noise"


@pytest.mark.parametrize("n,k", [(5, 1), (6, 1), (9, 2), (20, 6), (100, 40)])
def test_median_interval_uses_the_binomial_order_statistics(n, k):
    values = list(range(1, n + 1))
    median, lo, hi = median_interval(values)
    assert (lo, hi) == (k, n + 1 - k)
    assert lo <= median <= hi


def test_rounds_interleave_rows_and_stop_when_narrow():
    calls = []
    counter = itertools.count()

    def row(name, t):
        def run():
            calls.append(name)
            return t * (1.0 + 0.001 * (next(counter) % 3))
        return run

    rows = {"base": row("base", 10.0), "a": row("a", 11.0), "b": row("b", 12.0)}
    result = run_rounds(rows, {"base": "base", "a": "base", "b": "base"}, min_rounds=5, time_cap_s=60,
                        target_width=0.02)
    assert result.rounds == 5  # narrow after the minimum
    for i in range(result.rounds):  # every row once per round
        assert sorted(calls[3 * i: 3 * i + 3]) == ["a", "b", "base"]
    assert len({tuple(calls[3 * i: 3 * i + 3]) for i in range(result.rounds)}) > 1  # order shuffled


def test_rounds_stop_at_the_time_cap_when_noise_stays_wide():
    rng = random.Random(0)
    rows = {"base": lambda: 10.0, "noisy": lambda: 10.0 * rng.uniform(0.5, 2.0)}
    result = run_rounds(rows, {"noisy": "base"}, min_rounds=3, max_rounds=40, time_cap_s=1e9, target_width=0.001)
    assert result.rounds == 40


def test_a_pair_naming_an_untimed_row_is_an_error():
    with pytest.raises(ValueError, match="not timed"):
        run_rounds({"a": lambda: 1.0}, {"a": "missing"})
