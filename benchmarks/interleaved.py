"""auto against what a user would run instead, timed in interleaved rounds: each round runs every
contender once, in turn, so that load on a shared machine falls on all of them."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

ROUNDS = 25
# auto's median may be this much above the fastest contender's: a shared machine's noise (a worse
# choice was 1.3-5x slower: memvp's fp32 torch backend for bf16, cross_attention's cpu backend).
TOLERANCE = 1.2


def interleaved_medians(benchmark, contenders: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median milliseconds of each contender over ROUNDS interleaved rounds (two more to warm up),
    recorded in the benchmark's extra_info."""
    times: dict[str, list[float]] = {name: [] for name in contenders}

    def one_round():
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    for _ in range(2):
        one_round()
    for samples in times.values():
        samples.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    while len(next(iter(times.values()))) < ROUNDS:  # --benchmark-disable runs one round: take them all
        one_round()
    medians = {name: statistics.median(samples) * 1e3 for name, samples in times.items()}
    benchmark.extra_info["median_ms"] = medians
    return medians
