"""Files the library writes: names shown to people, output folders, temporaries renamed into place.

One rule for names everywhere: a path is kept losslessly as bytes (`os.fsencode`) in data files,
and shown as UTF-8 text with undecodable bytes as \\xNN escapes (`display_path`) in messages,
reports and text outputs.
"""

from __future__ import annotations

import os
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


def write_atomically(write: Callable[[str], None], path: str) -> None:
    """Call write(temporary path), then rename it to `path`: `path` is whole or absent, never half."""
    tmp = f"{path}.writing-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
