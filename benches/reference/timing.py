"""Shared timing for the PyTorch reference scripts (imported from their folder)."""
import statistics
import time


def median_seconds(fn, warmup=3, reps=20):
    """Median wall time of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
