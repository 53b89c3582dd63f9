"""Every `auto` about where and how work runs, resolved in one place: this process's place in a
torchrun job (rank, world size), the device, the precision, and the CPU batch size chosen by a
short probe and remembered per machine.

Nothing here reads images or caches; the stages ask, record the answers (with their reasons) and
report them. torch is imported only by the functions that need it: the process's place is read by
torch-free code too (the CLI, scikit-learn fits in experiment workers).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from .errors import TransferError
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


def _torch():
    import torch  # imported on first use: see the module docstring

    return torch


# --- this process's place in a torchrun job -------------------------------------------------------

@dataclass(frozen=True)
class Place:
    """This process's place in a torchrun job: rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def leads(self) -> bool:
        """Rank 0: the process that writes shared outputs and reports progress."""
        return self.rank == 0


def this_process() -> Place:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Place()
    try:
        return Place(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                     int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except (KeyError, ValueError):
        raise TransferError("WORLD_SIZE is set but RANK is not; start several processes with torchrun") from None


@contextlib.contextmanager
def session():
    """This process's Place; under torchrun, a gloo process group lives for the block (created
    here unless the caller made one). The features travel through files, so gloo suffices."""
    place = this_process()
    if place.world_size <= 1:
        yield place
        return
    tdist = _torch().distributed
    owner = not tdist.is_initialized()
    if owner:
        # Generous timeout: ranks meet only at the end of an extraction, and may finish hours apart.
        tdist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    try:
        yield place
    finally:
        if owner and tdist.is_initialized():
            tdist.destroy_process_group()


def gather(place: Place, value) -> list:
    """Every rank's `value`, in rank order (a collective: every rank must call it)."""
    if place.world_size == 1:
        return [value]
    gathered = [None] * place.world_size
    try:
        _torch().distributed.all_gather_object(gathered, value)
    except RuntimeError:  # gloo: a peer went away
        raise TransferError("another rank failed while the ranks agreed on their settings (see its own error)") from None
    return gathered


DEVICE_CHOICES = "auto, cpu or cuda[:N]"


def resolve_device(requested: str = "auto", place: Place | None = None):
    """auto -> the GPU when torch sees one, else the CPU; under torchrun, `auto` and `cuda` mean
    each rank's own GPU (cuda:LOCAL_RANK). Returns a torch.device."""
    torch = _torch()
    place = place or this_process()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise TransferError(f"--device {requested} asked for, but torch sees no CUDA GPU; use --device cpu")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise TransferError(f"unknown device {requested!r}; expected {DEVICE_CHOICES}")
    if requested == "cuda" and place.world_size > 1:
        requested = f"cuda:{place.local_rank}"
    return torch.device(requested)


# --- precision ------------------------------------------------------------------------------------

def cpu_capabilities() -> dict:
    """The CPU's instruction sets as torch's cpuinfo sees them (`torch.cpu.get_capabilities`,
    torch >= 2.8); older torch: the two bf16 queries it has."""
    torch = _torch()
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
    missing = onednn_bf16_missing()
    if missing:
        return False, f"this CPU has {', '.join(native)} but {missing}"
    return True, f"this CPU computes bf16 natively ({', '.join(native)}; oneDNN)"


def onednn_bf16_missing() -> str:
    """Why the installed torch's oneDNN does not compute bf16 on this CPU; "" when it does."""
    torch = _torch()
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN does not report bf16 support"
    return ""


def resolve_precision(requested: str | None, device, earlier: str | None = None) -> Choice:
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
    torch = _torch()
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


def choose_batch_size(requested: int | None, device, what: str, pending: int,
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
