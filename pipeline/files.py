"""Files the library writes: names shown to people, temporaries renamed into place, run folders.

One rule for names everywhere: a path is kept losslessly as bytes (`os.fsencode`) in data files,
and shown as UTF-8 text with undecodable bytes as \\xNN escapes (`display_path`) in messages,
reports and text outputs.

One policy for run folders (fit, experiment, inspect, from the CLI and from Python alike): a
destination is checked before any work (it must not exist, or be an empty folder); `out="auto"`
reserves `reports/<name>-<time>[-N]` at once; a folder is written under a temporary name and
renamed when complete, so a folder named like a run is a whole run; a failure leaves nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import shutil
from typing import Callable

from .errors import InputFileError


def display_path(path: str | bytes | os.PathLike) -> str:
    """A file name as UTF-8 text; undecodable bytes are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def size_text(n: float) -> str:
    """A file size for people: 512 B, 13.9 MB, 1.2 GB."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def make_folder_for(path: str) -> None:
    """Create the folder a file will be written into (every command does), or say why not."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputFileError(f"cannot create the output folder {display_path(folder)}: {e.strerror or e}") from None


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def temporary_name(path: str) -> str:
    """Where `path` is written before it is renamed into place: `path.writing-PID`."""
    return f"{path.rstrip(os.sep)}.writing-{os.getpid()}"


def remove_stale_temporaries(path: str) -> None:
    """Delete `path.writing-PID` files or folders left by processes that died (kill -9, power loss)."""
    for leftover in glob.glob(glob.escape(path.rstrip(os.sep)) + ".writing-*"):
        pid = leftover.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                remove_quietly(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def write_atomically(write: Callable[[str], None], path: str) -> None:
    """Call write(temporary path), then rename it to `path`: `path` is whole or absent, never half."""
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


# --- run folders ----------------------------------------------------------------------------------

RUNS_ROOT = "reports"
AUTO = "auto"  # out="auto": a new folder under RUNS_ROOT


def reserve_folder(base: str) -> str:
    """Create `base` (or `base-2`, `base-3`, ... when taken) empty and return it; mkdir is atomic,
    so runs started in the same second (or in parallel) never pick the same one."""
    make_folder_for(base)
    for n in range(1, 10_000):
        candidate = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise InputFileError(f"no free folder name next to {display_path(base)}")


def default_run_dir(name: str, root: str = RUNS_ROOT) -> str:
    """A new, empty folder `root/<name>-<time>[-N]`, reserved now (name: e.g. the cache's file stem)."""
    return reserve_folder(os.path.join(root, f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))


def release_if_empty(folder: str) -> None:
    """Remove a reserved folder that a failed or interrupted run left empty."""
    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (the run was written) or already gone


def check_new_folder(out_dir: str) -> None:
    """Refuse, before any work, a destination that exists and is not an empty folder."""
    if not out_dir:
        raise InputFileError("the output folder name is empty; give a folder name (--out)")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise InputFileError(f"{display_path(out_dir)} already exists and is not empty; choose another --out")


@contextlib.contextmanager
def run_folder(out: str | os.PathLike | None, name: str):
    """The run folder policy around one run: yields the folder the run will write (None: nothing
    to write). out=AUTO reserves `reports/<name>-<time>`; a given folder is checked now, before any
    work. Whatever happens inside, a reserved folder left empty is removed."""
    if out is None:
        yield None
        return
    out = os.fspath(out)
    if out == AUTO:
        folder = default_run_dir(name)
    else:
        check_new_folder(out)
        folder = out
    try:
        yield folder
    finally:
        if out == AUTO:
            release_if_empty(folder)


@contextlib.contextmanager
def new_folder(out_dir: str):
    """Yields a temporary folder that becomes `out_dir` only if the block completes: a folder named
    like a run is always a whole run. Refuses to replace a non-empty folder."""
    check_new_folder(out_dir)
    make_folder_for(out_dir)
    remove_stale_temporaries(out_dir)
    tmp = temporary_name(out_dir)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
