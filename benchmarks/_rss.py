"""Peak resident memory of a command and all its child processes, sampled while it runs."""

from __future__ import annotations

import subprocess
import time

import psutil


def peak_rss(command: list[str], interval: float = 0.02, **popen) -> tuple[int, float, subprocess.CompletedProcess]:
    """Run `command`; return (peak summed RSS of its process tree in bytes, seconds, result)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(interval)
    out, err = proc.communicate()
    result = subprocess.CompletedProcess(command, proc.returncode, out, err)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return peak, time.perf_counter() - started, result
