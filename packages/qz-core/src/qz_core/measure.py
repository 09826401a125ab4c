"""Latency and size measurement that gives honest FP32/INT8 ratios on a CPU."""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def timing_setup(threads: int | None = None) -> int:
    """Flushes denormals and fixes the thread count; returns the thread count used.

    Random-weight FP32 models otherwise crawl through denormal floats, and ratios lie.
    """
    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def timing_state(threads: int | None = None) -> Iterator[int]:
    """``timing_setup`` for the duration of a block; the thread count and denormal handling are put back after.

    PyTorch cannot report whether denormals are flushed, so they are left unflushed after, its default.
    """
    previous = torch.get_num_threads()
    try:
        yield timing_setup(threads)
    finally:
        torch.set_num_threads(previous)
        torch.set_flush_denormal(False)


def _summary(samples: list[float]) -> Latency:
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Latency(statistics.median(samples), pick(0.1), pick(0.9), len(samples))


def compare_latency(
    runners: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    rounds: int = 20,
    threads: int | None = None,
    progress: bool = False,
    budget_s: float | None = None,
    min_rounds: int = 5,
) -> dict[str, Latency]:
    """Times several callables interleaved, round by round, so machine drift hits all alike.

    Args:
        runners: name -> zero-argument callable (one inference each).
        warmup: untimed calls of each before timing.
        rounds: timed calls of each.
        threads: intra-op threads (unchanged when None).
        budget_s: if given, fewer rounds (never below ``min_rounds``) when ``rounds`` of them would
            take longer than this many seconds, judged from the last warmup round: big models get
            a sweep done in hours, not days, and say how many rounds they got (``Latency.runs``).

    The thread count and denormal handling are restored when it returns.
    """
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with timing_state(threads), torch.inference_mode():
        last_call_s = {}
        for name, run in runners.items():
            for _ in range(warmup):
                start = time.perf_counter()
                run()
                last_call_s[name] = time.perf_counter() - start
        round_s = sum(last_call_s.values())
        if budget_s is not None and round_s > 0:
            rounds = min(rounds, max(min_rounds, int(budget_s / round_s)))
        for _ in tqdm(range(rounds), desc="timing", unit="round", disable=not progress):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(s) for name, s in samples.items()}


def measure_latency(model: nn.Module, example_input: Any, **kwargs: Any) -> Latency:
    """Median latency of ``model(example_input)``; keywords as in ``compare_latency``."""
    model.eval()
    return compare_latency({"model": lambda: model(example_input)}, **kwargs)["model"]


def model_size_mb(model: nn.Module) -> float:
    """Size of the model's serialized state dict in MiB (what a saved file takes)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def eager_op_profile(model: nn.Module, example_input: Any, *, runs: int = 10, warmup: int = 3) -> dict[str, float]:
    """Share of PyTorch's CPU time per operator (self time, e.g. ``quantized::conv2d``), largest first.

    Counts ``runs`` calls of ``model(example_input)`` after ``warmup`` uncounted ones.
    """
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(example_input)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(example_input)
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.self_cpu_time_total > 0}
    total = sum(times.values())
    return {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])} if total else {}
