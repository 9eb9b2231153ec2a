"""Device choice, free-memory queries for the default memory budget, and peak-memory measurement.

Peak memory on CPU is measured by sampling the process's resident set size (``/proc/self/statm``) from a
background thread: ``resource.getrusage`` only reports the lifetime maximum of the process, which cannot be reset
between measurements. Sampling can miss a spike shorter than the sampling interval (1 ms by default); large
allocations in a VAE live for whole convolutions, far longer than that.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch

from vaekit.errors import BadInputError

# Fraction of the free memory the default budget takes, leaving room for the rest of the process and others.
DEFAULT_BUDGET_FRACTION = 0.7
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """True where Apple's Metal backend can run."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def choose_device(override: torch.device | str | None = None) -> torch.device:
    """The device to run on: ``override`` when given, else CUDA, then MPS, then CPU."""
    if isinstance(override, torch.device):
        return override
    if override is None or override == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(override)
    except RuntimeError:
        raise BadInputError(f"unknown device {override!r}; use one of {', '.join(DEVICE_KINDS)} (or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("device cuda requested but no CUDA GPU is available")
    if dev.type == "mps" and not mps_available():
        raise BadInputError("device mps requested but Metal is not available")
    return dev


def proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a Linux /proc file (``MemAvailable`` of /proc/meminfo, ``VmHWM`` of /proc/self/status) in
    bytes, or None where the file or the field is missing."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_available_bytes() -> int:
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown platform: assume a modest 8 GiB


def free_memory(device: torch.device | str) -> int:
    """Bytes currently free for tensors on ``device`` (CUDA: driver's free memory; CPU: MemAvailable)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        # Memory cached by PyTorch's allocator is free for our tensors too.
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return _cpu_available_bytes()


def default_budget(device: torch.device | str) -> int:
    """The memory budget used when the user sets none: a fixed fraction of the free memory."""
    return int(free_memory(device) * DEFAULT_BUDGET_FRACTION)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime maximum (bytes on macOS, KiB elsewhere)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-size high-water mark (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    """The kernel's resident-size high-water mark (``VmHWM``) in bytes, or None where /proc has none."""
    return proc_bytes("/proc/self/status", "VmHWM")


class PeakMemory:
    """Context manager measuring the peak memory a block adds on ``device``, in bytes (``.peak``).

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU: the highest resident set size
    above the resident size at entry. On Linux that is the kernel's own high-water mark (reset at entry), so even a
    brief temporary counts; a sampling thread covers other systems and blocks nested in one another.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self._base = 0
        self._max = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._hwm = _reset_rss_peak()
            self._base = self._max = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._max = max(self._max, _rss_bytes())
        kernel_peak = _rss_peak_bytes() if self._hwm else None
        if kernel_peak is not None:
            self._max = max(self._max, kernel_peak)
        self.peak = int(self._max - self._base)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (for timing); a no-op on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
