"""Process memory readings shared by the benchmarks (Linux /proc and getrusage)."""

from __future__ import annotations

import resource


def rss_kb(field: str) -> int:
    """A /proc/self/status field in kB: 'VmRSS' (resident now) or 'VmHWM' (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (so a later peak measures one phase)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def max_rss_mb() -> float:
    """Peak resident set of this process since it started, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
