"""Timing a training step and measuring its peak memory, for the step-time benchmarks (speed.py, speed_vlm.py).

Both benchmarks time every method in interleaved rounds (round-robin, order rotated) and measure peak memory in a
separate, untimed pass per method with nothing else of that method alive, the same way:

* CUDA: ``torch.cuda.max_memory_allocated`` over the second training step (peak stats reset after the first, so
  AdamW state exists), minus what was allocated before the method was built.
* CPU: there is no allocator peak counter, so the pass runs under ``torch.profiler`` with ``profile_memory=True``
  from an empty start (model built, optimizer created, two steps) and `cpu_peak_bytes` replays every
  allocation/free event in time order; the peak of live bytes during the second step is the method's peak.

`resolve_preset` applies ``--device`` / ``--dtype`` / ``--threads`` to a step-time preset.
"""

from __future__ import annotations

import copy
import gc
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(), synchronised on CUDA."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cpu_peak_bytes(prof, start_ns: int) -> int:
    """Peak live bytes after ``start_ns``, replaying the profiler's allocation events from the profile's start."""
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda t: t[0],
    )
    live, peak = 0, 0
    for ts, nbytes in events:
        live += nbytes
        if ts >= start_ns:
            peak = max(peak, live)
    return peak


MARK = "speed_bench_measured_step"


def mark_ns(prof) -> int:
    """Start of the measured (second) step in the profiler's own clock, found by its record_function marker."""
    starts = [e.start_ns() for e in prof.profiler.kineto_results.events() if e.name() == MARK]
    if len(starts) != 1:
        raise RuntimeError(f"expected one '{MARK}' event in the memory profile, found {len(starts)}")
    return starts[0]


def peak_bytes(start: Callable[[], Callable[[], None]], device: str) -> int:
    """Peak bytes of one method's second training step, nothing else of it alive (see the module docstring).

    ``start()`` builds the method (model, optimizer) and returns its step function; what it builds is reachable
    only through that function, so it is freed before this returns.
    """
    release(device)
    if device == "cuda":
        base_alloc = torch.cuda.memory_allocated()
        step = start()
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_alloc
    else:
        from torch.profiler import ProfilerActivity, profile, record_function

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step = start()
            step()
            with record_function(MARK):
                step()
        peak = cpu_peak_bytes(prof, mark_ns(prof))
    del step
    release(device)
    return peak


def resolve_preset(presets: dict, args, log=print):
    """The preset with --device/--dtype/--threads applied; None (with a message) when CUDA is asked for but absent.

    Moving a preset to the CPU without --dtype runs it in fp32 (bf16 matmuls are slow or emulated on most CPUs).
    """
    preset = copy.deepcopy(presets[args.preset])
    if args.device:
        preset.device = args.device
        if preset.device == "cpu" and preset.dtype == torch.bfloat16 and not args.dtype:
            preset.dtype = torch.float32
    if args.dtype:
        preset.dtype = getattr(torch, args.dtype)
    if preset.device == "cuda" and not torch.cuda.is_available():
        log(f"CUDA is not available: skipping --preset {args.preset} on cuda (nothing measured).")
        return None
    threads = args.threads or preset.threads
    if preset.device == "cpu" and threads:
        torch.set_num_threads(threads)
    return preset
