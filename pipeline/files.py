"""Files the library writes: names shown to people, output folders, temporaries renamed into place.

One rule for names everywhere: a path is kept losslessly as bytes (`os.fsencode`) in data files,
and shown as UTF-8 text with undecodable bytes as \\xNN escapes (`display_path`) in messages,
reports and text outputs.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Callable

from .errors import InputFileError


def display_path(path: str | bytes | os.PathLike) -> str:
    """A file name as UTF-8 text; undecodable bytes are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
