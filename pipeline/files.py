"""Files the library writes: names shown to people, temporaries renamed into place, run folders.

One rule for names everywhere: a path is kept losslessly as bytes (`os.fsencode`) in data files,
and shown as UTF-8 text with undecodable bytes as \\xNN escapes (`display_path`) in messages,
reports and text outputs.

Text that came from outside (file, folder and class names, manifest labels) is made inert where it
is written: `terminal_text` for a terminal (control characters escaped), `markdown_text` and
`markdown_code` for Markdown files (no HTML, no markup), `csv_cell` for CSV files (no formulas).

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
import re
import shutil
import stat
from typing import Callable

from .errors import InputFileError, SettingError


def display_path(path: str | bytes | os.PathLike) -> str:
    """A file name as UTF-8 text; undecodable bytes are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(text) -> str:
    """Any text as valid UTF-8 text: surrogates (undecodable bytes of a name) shown as \\xNN."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# C0 and C1 control characters but newline and tab, DEL, and the bidirectional overrides and
# isolates ("Trojan Source"): what can move the cursor, clear the screen, retitle the window or
# reorder what is shown. Each is shown as its Python escape (\x1b, \u202e).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def quoted(name) -> str:
    """A name in quotes inside a message: 'caf\\xe9' (repr would show the surrogate, '\\udce9')."""
    return f"'{_utf8(name)}'"


def terminal_text(text) -> str:
    """Text safe to print on a terminal: control characters (ESC, BEL, CR, ...) shown escaped as
    \\x1b, \\x07, \\x0d, and undecodable bytes as \\xNN, the way `display_path` shows them.
    Newlines and tabs stay."""
    return _CONTROL.sub(_escape, _utf8(text))


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def markdown_text(text) -> str:
    """Any text as inert Markdown on one line: no HTML (`<`, `>`, `&`, `"` as entities), no markup
    (Markdown's punctuation backslash-escaped, so also a table cell), controls escaped."""
    text = terminal_text(" ".join(_utf8(text).split()))
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)
    return "".join(_HTML.get(c, c) for c in text)


def markdown_code(text) -> str:
    """Any text as one Markdown code span, shown literally: fenced by more backticks than it holds
    (CommonMark's rule), on one line. Not inside a table (a `|` there ends the cell)."""
    text = terminal_text(" ".join(_utf8(text).split()))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


# A spreadsheet takes a cell that starts with one of these for a formula (OWASP's list), and a
# leading ' for "text": such a cell gets one more ' in front, which spreadsheets do not show.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value):
    """A value for a CSV file that spreadsheets will not run: text starting with = + - @ tab CR
    (or ') gets a leading ' (lossless: drop one leading ' from a text cell to get it back); text
    is valid UTF-8 (undecodable bytes as \\xNN). Numbers and None are returned as they are."""
    if not isinstance(value, str):
        return value
    value = _utf8(value)
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_row(values) -> list:
    """`csv_cell` of each value: a row for csv.writer."""
    return [csv_cell(v) for v in values]


def check_path_given(path, what: str) -> None:
    """Refuse an empty path (`--out ''`) before any work: it would name the current folder."""
    if path is not None and not os.fspath(path):
        raise SettingError(f"{what} is empty; give a file or folder name")


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a regular file ("does not exist", "is a folder", "is a FIFO, not
    a regular file"), or None when it is one (symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a dangling symlink" if os.path.islink(path) else "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return "is a folder" if stat.S_ISDIR(mode) else f"is a {file_kind(mode)}, not a regular file"


def file_kind(mode: int) -> str:
    """What a non-regular file is, by its st_mode: FIFO, socket, character device, block device."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


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
