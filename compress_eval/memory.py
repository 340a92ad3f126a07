"""Peak memory of this process, for manifests and benchmarks."""

from __future__ import annotations

import resource

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak host RSS, and peak allocated CUDA memory when ``device`` is a GPU."""
    peak = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        peak["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak
