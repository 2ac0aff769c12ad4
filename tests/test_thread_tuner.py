"""The CPU thread count for quantizing layers is chosen by timing (tuneqdm_core/thread_tuner.py): every
candidate is tried on a small layer, the fastest per value is kept, the others are re-tried now and then,
and torch's own count is back afterwards."""
from __future__ import annotations

import pytest
import torch

from tuneqdm_core import thread_tuner
from tuneqdm_core.thread_tuner import MIN_NUMEL, PROBE_MAX, RETRY_EVERY, tuned_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _run(tuner, clock, numel: int, seconds_per_value: dict[int, float]) -> int:
    tuner.begin(numel)
    threads = torch.get_num_threads()
    clock[0] += numel * seconds_per_value[threads]
    tuner.end()
    return threads


@pytest.mark.parametrize("fast", [1, 2])
def test_the_faster_count_is_kept_and_the_other_retried(monkeypatch, two_threads, fast):
    clock = [0.0]
    monkeypatch.setattr(thread_tuner.time, "perf_counter", lambda: clock[0])
    cost = {fast: 1e-8, 3 - fast: 1e-6}
    with tuned_threads() as tuner:
        tried = [_run(tuner, clock, PROBE_MAX, cost) for _ in range(2)]
        assert sorted(tried) == [1, 2]
        big = [_run(tuner, clock, 4 * PROBE_MAX, cost) for _ in range(RETRY_EVERY)]
        assert set(big) == {fast}  # large layers are never probes
        assert _run(tuner, clock, MIN_NUMEL, cost) == 3 - fast  # a re-try, on a small layer, when due
        assert _run(tuner, clock, MIN_NUMEL, cost) == fast
        assert "ms per million values" in tuner.summary()
    assert torch.get_num_threads() == 2


def test_one_thread_needs_no_tuner():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tuned_threads() as tuner:
            assert tuner is None
    finally:
        torch.set_num_threads(before)


def test_quantizing_a_model_in_memory_is_tuned_too(two_threads):
    """Quantize UNet's path (a float model already in memory, no file) times its CPU layers like the loader."""
    from torch import nn

    from tuneqdm_core import TuneQDMConfig, quantize_model

    model = nn.Sequential(*(nn.Linear(1024, MIN_NUMEL // 1024) for _ in range(3)))
    report = quantize_model(model, TuneQDMConfig(bits=4, experts=1))
    assert any("ms per million values" in note for note in report.notes)
    assert torch.get_num_threads() == 2
