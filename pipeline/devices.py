"""How the network runs on this machine: the precision `auto` resolves to, and the CPU batch size
chosen by a short probe and remembered per machine.

Nothing here reads images or caches; `extract` asks, records the answers (with their reasons) in
the cache's provenance, and prints them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .files import write_atomically

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
# Candidate CPU batches for the probe. Measured on the 2-core development CPU (issue #16): ResNet50
# fp32 ran at 36 img/s with batch 8 and 23 img/s with batch 32; VGG16 prefers larger batches.
CPU_BATCH_CANDIDATES = (4, 8, 16, 32)
CPU_BATCH_DEFAULT = 16  # when there is nothing to go on (a run too short to be worth probing)
GPU_BATCH_DEFAULT = 256
PROBE_MIN_IMAGES = 200  # fewer images to extract than this: a probe would cost more than it saves
PROBE_BUDGET_SECONDS = 20.0  # larger batches that would take the probe past this are left out
BATCH_MEMORY_FILE = "batch_sizes.json"


@dataclass(frozen=True)
class Choice:
    """A setting as resolved for this run, and one line saying why (recorded and printed)."""

    value: object
    why: str


def user_cache_dir() -> str:
    """Where transfer remembers things about this machine: $TRANSFER_CACHE_DIR, else
    $XDG_CACHE_HOME/transfer, else ~/.cache/transfer."""
    if os.environ.get("TRANSFER_CACHE_DIR"):
        return os.environ["TRANSFER_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "transfer")


# --- precision ------------------------------------------------------------------------------------

def cpu_capabilities() -> dict:
    """The CPU's instruction sets as torch's cpuinfo sees them (`torch.cpu.get_capabilities`,
    torch >= 2.8); older torch: the two bf16 queries it has."""
    if hasattr(torch.cpu, "get_capabilities"):
        return dict(torch.cpu.get_capabilities())
    caps = {}
    for name, query in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported")):
        if hasattr(torch.cpu, query):
            caps[name] = bool(getattr(torch.cpu, query)())
    caps["amx_bf16"] = caps.pop("amx_tile", False)  # AMX-TILE ships with AMX-BF16 on every CPU so far
    return caps


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX-512 BF16, AMX-BF16 or Arm's BF16 extensions)
    and the installed torch's oneDNN uses it; with a one-line reason either way."""
    caps = cpu_capabilities()
    native = [name for name in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16") if caps.get(name)]
    if not native:
        return False, "this CPU has no native bf16 instructions (AVX-512 BF16, AMX or Arm BF16)"
    if not torch.backends.mkldnn.is_available():
        return False, f"this CPU has {', '.join(native)} but this torch build has no oneDNN"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, f"this CPU has {', '.join(native)} but oneDNN does not report bf16 support"
    return True, f"this CPU computes bf16 natively ({', '.join(native)}; oneDNN)"


def resolve_precision(requested: str | None, device: torch.device, earlier: str | None = None) -> Choice:
    """`auto` (or None) -> bf16 on CUDA and on CPUs that compute bf16 natively, fp32 elsewhere;
    an unfinished or finished run of the same extraction (`earlier`) keeps its own precision, so
    that rows of one cache never mix precisions. Anything else is taken as asked."""
    if requested not in (None, "auto"):
        return Choice(requested, "asked for")
    if earlier:
        return Choice(earlier, f"auto: kept from the earlier run of this extraction ({earlier})")
    if device.type == "cuda":
        return Choice("bf16", "auto: bf16 autocast on the GPU")
    native, why = cpu_bf16()
    return Choice("bf16" if native else "fp32", f"auto: {why}")


# --- the CPU batch size ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """What the batch probe measured: images/s per candidate batch, and its own cost."""

    best: int
    rates: dict[int, float]
    seconds: float


def probe_batch_size(forward: Callable[[int], None], candidates=CPU_BATCH_CANDIDATES,
                     budget: float = PROBE_BUDGET_SECONDS) -> Probe:
    """Time `forward(n)` (one forward pass over n synthetic images) for each candidate n: a warm-up
    pass each, smallest first (oneDNN builds its kernels per shape), then two timed passes each in
    alternating rounds (ascending, then descending), the faster kept: on a shared machine the
    speed drifts by 2x within minutes, and alternating spreads the drift over every candidate.
    A candidate whose passes would, at the fastest warm-up rate so far, end the probe after
    `budget` seconds is left out (with the larger ones). A smaller batch wins ties within 3%."""
    started = time.perf_counter()
    tried: list[int] = []
    guess = 0.0  # images per second, the best warm-up so far
    for n in candidates:
        if guess and time.perf_counter() - started + (n + 2 * (sum(tried) + n)) / guess > budget:
            break
        t = time.perf_counter()
        forward(n)
        guess = max(guess, n / (time.perf_counter() - t))
        tried.append(n)
    best = {n: float("inf") for n in tried}
    for order in (tried, tried[::-1]):
        for n in order:
            t = time.perf_counter()
            forward(n)
            best[n] = min(best[n], time.perf_counter() - t)
    rates = {n: n / best[n] for n in tried}
    top = max(rates.values())
    chosen = min(n for n, r in rates.items() if r >= 0.97 * top)
    return Probe(chosen, rates, time.perf_counter() - started)


def machine_key() -> str:
    """What makes one machine's batch choice differ from another's: CPU model, cores, threads, torch."""
    caps = cpu_capabilities()
    name = caps.get("cpu_name") or _cpu_model() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}; {cores} cores; {torch.get_num_threads()} threads; torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def remembered_batch(key: str) -> dict | None:
    """The probe result remembered under `key`, or None."""
    try:
        with open(os.path.join(user_cache_dir(), BATCH_MEMORY_FILE)) as f:
            entry = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("batch_size"), int) else None


def remember_batch(key: str, probe: Probe) -> bool:
    """Store a probe result under `key` (atomically); False when the cache folder is not writable."""
    path = os.path.join(user_cache_dir(), BATCH_MEMORY_FILE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                memory = json.load(f)
            memory = memory if isinstance(memory, dict) else {}
        except (OSError, ValueError):
            memory = {}
        memory[key] = {"batch_size": probe.best, "images_per_second": {str(n): round(r, 2) for n, r in probe.rates.items()},
                       "probe_seconds": round(probe.seconds, 2), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(memory, f, indent=1, sort_keys=True)

        write_atomically(write, path)
    except OSError:
        return False
    return True


def choose_batch_size(requested: int | None, device: torch.device, what: str, pending: int,
                      forward: Callable[[int], None], earlier: int | None = None, probe_allowed: bool = True) -> Choice:
    """The batch size of this run, and why: as asked; else the earlier run's (a resume redoes whole
    batches at the same boundaries, so its features equal an uninterrupted run's); else 256 on a GPU;
    on the CPU, the remembered probe result for this machine and `what` (backbone, precision, input
    size), or a new probe when `pending` images make it worth its seconds (and `probe_allowed`)."""
    if requested is not None:
        return Choice(requested, "asked for")
    if earlier:
        return Choice(earlier, "kept from the earlier run of this extraction (same batch boundaries)")
    if device.type == "cuda":
        return Choice(GPU_BATCH_DEFAULT, "the GPU default")
    key = f"{machine_key()} | {what}"
    known = remembered_batch(key)
    if known:
        return Choice(known["batch_size"], f"probed earlier on this machine ({BATCH_MEMORY_FILE} in {user_cache_dir()})")
    if not probe_allowed or pending < PROBE_MIN_IMAGES:
        why = "under torchrun" if not probe_allowed else f"fewer than {PROBE_MIN_IMAGES} images to do"
        return Choice(CPU_BATCH_DEFAULT, f"the CPU default (not probed: {why})")
    probe = probe_batch_size(forward)
    rates = ", ".join(f"{n}: {r:.1f}" for n, r in probe.rates.items())
    kept = "remembered" if remember_batch(key, probe) else f"not remembered: {user_cache_dir()} is not writable"
    return Choice(probe.best, f"probed in {probe.seconds:.1f} s (img/s by batch: {rates}); {kept}")
