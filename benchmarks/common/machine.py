"""The machine a result was measured on, and the peak memory of a training run.

Every results file carries a machine record (CPU, torch threads, library versions, load average at the start) so
that a number can be read against where it was measured. Two shapes exist because files of both are already
written and quoted in RESULTS.md: `machine_info` (quality.py, selection_value.py: UTC date, load average as floats,
library versions) and `speed_machine_info` (speed.py, speed_vlm.py: ISO local time, /proc/loadavg as strings).

`PeakMemory` measures a whole training run (quality.py's "peak MiB" and "+MiB" columns): CUDA max allocated, or
on CPU the process's peak resident set size (``VmHWM`` after a ``clear_refs`` reset, after ``gc.collect()`` and
``malloc_trim(0)``), falling back to the process-lifetime ``ru_maxrss`` (marked so in ``how``).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import resource
from pathlib import Path
from typing import Optional

import torch

MiB = 1024 * 1024


def machine_info(device: torch.device) -> dict:
    """The translation benchmarks' machine record (quality.py, selection_value.py)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    for mod in ("transformers", "peft", "sacrebleu"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def speed_machine_info(device: str) -> dict:
    """The step-time benchmarks' machine record (``device`` as a string: "cpu" or "cuda")."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    try:
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or the process's peak RSS (VmHWM after a reset) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.how = ""
        self.peak_mib = float("nan")
        self.before_mib = float("nan")

    @staticmethod
    def _status(key: str) -> Optional[float]:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            pass
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mib = torch.cuda.memory_allocated(self.device) / MiB
            self.how = "torch.cuda.max_memory_allocated"
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS starts from live data
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.how = "peak RSS (VmHWM after clear_refs reset)"
        except OSError:
            self.how = "process-lifetime ru_maxrss (no clear_refs)"
        self.before_mib = self._status("VmRSS") or float("nan")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MiB
        elif self.how.startswith("peak RSS"):
            self.peak_mib = self._status("VmHWM") or float("nan")
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB
        return False
