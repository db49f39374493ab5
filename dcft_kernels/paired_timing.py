"""Timing in rounds, paired ratios and their 95% intervals: how the benchmark tells a real
difference from noise on a shared machine.

A round runs every compared row once, in a shuffled order; each row's ratio is taken against the
baseline of the *same* round, so slow phases of the machine (another process, frequency changes)
hit both sides of a ratio alike. Per row the median paired ratio is reported with a distribution-free
95% interval from order statistics (the binomial rule for a median), and rounds are added until
every interval is narrow enough or a time cap is reached.
"""
from __future__ import annotations

import gc
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

# An adapter cannot be faster than the layer it wraps: a ratio below this is a measurement error.
IMPOSSIBLE_BELOW = 1.0


@dataclass
class RatioSummary:
    ratio: float  # median paired ratio
    lo: float  # 95% interval of that median
    hi: float
    rounds: int

    @property
    def verdict(self) -> str:
        """"within noise" when the interval holds 1.0 or the ratio is below 1 (for a row that
        wraps the baseline that cannot be real); else the ratio with its interval is the result."""
        if self.ratio < IMPOSSIBLE_BELOW or self.lo <= 1.0 <= self.hi:
            return "within noise"
        return "slower" if self.lo > 1.0 else "faster"

    @property
    def relative_width(self) -> float:
        return (self.hi - self.lo) / self.ratio if self.ratio else math.inf


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi): the order statistics x_(k), x_(n+1-k) with the largest k such that
    P(Binomial(n, ½) < k) ≤ (1 - confidence) / 2 — exact and distribution-free. With fewer than 6
    values no such k exists and the interval is (min, max), which is then wider than 95%."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    alpha = (1.0 - confidence) / 2
    k, cumulative = 0, 0.0
    while k < n:
        p = math.comb(n, k) / 2**n
        if cumulative + p > alpha:
            break
        cumulative += p
        k += 1
    k = max(k, 1)  # 1-based index of the lower order statistic
    return statistics.median(xs), xs[k - 1], xs[n - k]


def paired_ratios(samples: list[float], baseline: list[float]) -> RatioSummary:
    """Ratios of a row's time to the baseline's, round by round."""
    if len(samples) != len(baseline):
        raise ValueError(f"paired samples need equal rounds, got {len(samples)} and {len(baseline)}")
    ratios = [s / b for s, b in zip(samples, baseline)]
    median, lo, hi = median_interval(ratios)
    return RatioSummary(median, lo, hi, len(ratios))


@dataclass
class RoundsResult:
    samples: dict  # row -> ms per round
    rounds: int
    seconds: float


def run_rounds(rows: dict, pairs: dict, *, min_rounds: int = 7, max_rounds: int = 200,
               time_cap_s: float = 60.0, target_width: float = 0.02, seed: int = 0,
               on_round: Callable[[int], None] | None = None) -> RoundsResult:
    """Run every row once per round, in a shuffled order, until each paired ratio's interval
    (relative to the ratio) is at most ``target_width``, or ``time_cap_s`` / ``max_rounds`` is hit.

    ``rows`` maps a key to a function that runs the row once and returns its time in ms; ``pairs``
    maps a row to the row it is compared with (a row paired with itself is a baseline). Python's
    garbage collector is off while timing: a collection inside one row would bias that row.
    """
    for row, base in pairs.items():
        if row not in rows or base not in rows:
            raise ValueError(f"pair {row!r} -> {base!r} names a row that is not timed")
    compared = [(row, base) for row, base in pairs.items() if row != base]
    order = list(rows)
    rng = random.Random(seed)
    samples: dict = {key: [] for key in rows}
    start = time.perf_counter()
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        rounds = 0
        while rounds < max_rounds:
            rng.shuffle(order)
            for key in order:
                samples[key].append(rows[key]())
            rounds += 1
            if on_round is not None:
                on_round(rounds)
            if rounds < min_rounds:
                continue
            if time.perf_counter() - start > time_cap_s:
                break
            if all(paired_ratios(samples[row], samples[base]).relative_width <= target_width
                   for row, base in compared):
                break
    finally:
        if was_enabled:
            gc.enable()
    return RoundsResult(samples, rounds, time.perf_counter() - start)
