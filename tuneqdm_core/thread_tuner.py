"""How many intra-op threads quantizing one layer on the CPU should use, chosen by measuring.

Group-wise quantization (quant.py) is many element-wise ops over medium tensors. With torch's OpenMP
pool, every op is a parallel region that waits for all its threads; when the cores are shared with other
busy processes a waiting thread is often descheduled, and each region then costs a scheduler time slice
instead of microseconds. Measured on this project's 2-core machine while other test runs used it (load
average 6-7): the SDXL test file (154M parameters) quantized to W4 in 236 s with 2 threads and in 6.2 s
with 1; quant.quantize_weight at group 16: 1,497 ms per million values with 2 threads, 20 with 1. On a
quiet or many-core machine more threads are faster. So the tuner times each large layer per value with
the thread count it ran, tries every candidate early, keeps the fastest, and re-tries the others now and
then because other processes come and go.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

MIN_NUMEL = 2**18  # smaller layers are too quick to time; they run with the best count so far
PROBE_MAX = 2**20  # candidates are tried on layers up to this size: a slow try then costs little
RETRY_EVERY = 100  # timed layers between re-tries of the other candidates


class ThreadTuner:
    """`begin(numel)` before a layer's quantization sets the thread count; `end()` after it records the
    time. Candidates: 1 and the count torch had when the tuner was made (if more)."""

    def __init__(self) -> None:
        self.original = torch.get_num_threads()
        self.candidates = sorted({1, self.original})
        self.rate: dict[int, float] = {}  # threads -> seconds per value (exponential average)
        self.since_probe = 0  # layers timed since a candidate other than the best was last tried
        self._start: tuple[int, float, int] | None = None

    def best(self) -> int:
        return min(self.rate, key=self.rate.get) if self.rate else 1

    def _probe(self) -> int | None:
        """The candidate to try on the next small layer, if one is due."""
        untried = [c for c in self.candidates if c not in self.rate]
        if untried:
            return untried[0]
        if self.since_probe >= RETRY_EVERY:
            return next((c for c in self.candidates if c != self.best()), None)
        return None

    def begin(self, numel: int) -> None:
        threads = self.best()
        if MIN_NUMEL <= numel <= PROBE_MAX and (probe := self._probe()) is not None:
            threads, self.since_probe = probe, 0
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self._start = (threads, time.perf_counter(), numel) if numel >= MIN_NUMEL else None

    def end(self) -> None:
        if self._start is None:
            return
        threads, start, numel = self._start
        per_value = (time.perf_counter() - start) / numel
        old = self.rate.get(threads)
        self.rate[threads] = per_value if old is None else 0.5 * old + 0.5 * per_value
        self.since_probe += 1
        self._start = None

    def summary(self) -> str:
        rates = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {r * 1e9:.0f} ms per million values"
                          for t, r in sorted(self.rate.items()))
        return f"CPU threads per layer chosen by timing ({rates})" if rates else ""


@contextmanager
def tuned_threads(enabled: bool = True) -> Iterator[ThreadTuner | None]:
    """A tuner for the layers quantized inside; torch's thread count is restored on exit."""
    if not enabled or torch.get_num_threads() <= 1:
        yield None
        return
    tuner = ThreadTuner()
    try:
        yield tuner
    finally:
        torch.set_num_threads(tuner.original)
