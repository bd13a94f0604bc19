"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, reps: int, flush=None) -> float:
    """Median wall time of fn() in ms after two warm-up calls: CUDA events on a GPU (recorded from an idle
    stream, so launch gaps count), perf_counter on CPU. `flush` runs untimed before each rep (e.g. L2)."""
    cuda = torch.cuda.is_available()
    fn()
    fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src), 10) / 1e3)


def timed_batch(engine, prompts, **kw):
    """engine.generate_batch(prompts, **kw) -> (outputs, decode seconds, target positions pushed), both with the
    prefills taken out; the positions count padding, which costs what a real position does."""
    positions = 0
    forward_rows = engine.target.forward_rows

    def counting(tokens, *args, **kwargs):
        nonlocal positions
        positions += tokens.numel()
        return forward_rows(tokens, *args, **kwargs)

    engine.target.forward_rows = counting
    try:
        t0 = time.perf_counter()
        out = engine.generate_batch(prompts, **kw)
        wall = time.perf_counter() - t0
    finally:
        engine.target.forward_rows = forward_rows
    return (out, wall - sum(o.stats.prefill_s for o in out),
            positions - sum(len(o.prompt_ids) for o in out))
