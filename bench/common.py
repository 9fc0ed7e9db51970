"""Shared benchmark helpers: is the machine quiet, and what are its limits measured right now.

Benchmarks report results as fractions of limits measured in the same run (see shared PERFORMANCE.md), since
the machine is shared and another busy process can cut throughput many times over.
"""

from __future__ import annotations

import os
import time

import torch


def machine_state() -> str:
    """One line: load average against the core count, and whether that counts as quiet."""
    load1, _, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    quiet = load1 < 0.25 * cores
    return (
        f"load average {load1:.2f} on {cores} cores: {'quiet' if quiet else 'NOT quiet (figures understate)'}"
    )


def gemm_gflops(dtype=torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Measured 2-thread GEMM throughput in GFLOP/s (median of `repeats`), the compute limit for this run."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
