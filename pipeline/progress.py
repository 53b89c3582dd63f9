"""One progress protocol for every stage: extract, fit, export, predict, experiment, inspect.

The library never prints. Long work calls a `Progress`: `phase` starts a bar (and ends the one
before), `advance` moves it, `note` is one line for the user, `close` ends the last bar. The CLI
passes a `Bars` (tqdm on stderr); from Python, `progress=True` shows the same bars (tqdm.auto: widgets
in a notebook), `progress=False` or None shows nothing, and any object with these four methods works.
Every entry point (extract, merge_caches, fit, export, predict, evaluate, inspect, run_experiment,
list_backbones, bench_backbones) defaults to `progress="auto"`: bars when a person is watching
(`interactive()`: stderr is a terminal, or the code runs in a Jupyter kernel), nothing otherwise
(scripts with redirected output, tests, services); tests/test_progress.py checks every public one.
"""

from __future__ import annotations

import sys
from typing import Protocol

import tqdm
import tqdm.auto

from .errors import SettingError
from .files import terminal_text


class Progress(Protocol):
    """Receives a stage's progress."""

    def phase(self, name: str, total: int | None = None, unit: str = "it", done: int = 0) -> None:
        """A new bar: `total` steps of `unit` (None: unknown), `done` of them already done."""

    def advance(self, n: int = 1, status: str = "") -> None:
        """`n` more steps; `status`: a short text shown beside the bar (e.g. the current C)."""

    def note(self, text: str) -> None:
        """One line for the user (a choice made, a file skipped)."""

    def close(self) -> None:
        """End the last bar."""


class Silent:
    """Progress that shows nothing."""

    def phase(self, name, total=None, unit="it", done=0):
        pass

    def advance(self, n=1, status=""):
        pass

    def note(self, text):
        pass

    def close(self):
        pass


class Bars:
    """One tqdm bar per phase, with its rate, on stderr; notes printed above the bar.

    notebook: tqdm.auto's bars (widgets in Jupyter) instead of plain text bars."""

    def __init__(self, notebook: bool = False, file=None):
        self.notebook, self.file, self.bar = notebook, file, None

    def _tqdm(self):
        return tqdm.auto.tqdm if self.notebook else tqdm.tqdm

    def phase(self, name, total=None, unit="it", done=0):
        self.close()
        # A phase of one step is a line with its time, not a bar: "inspect: map [00:02]".
        shape = {"bar_format": "{desc} [{elapsed}]{postfix}"} if total == 1 else {}
        self.bar = self._tqdm()(total=total, initial=done, desc=name, unit=unit, dynamic_ncols=True, smoothing=0.1,
                                file=self.file or sys.stderr, **shape)

    def advance(self, n=1, status=""):
        if self.bar is None:
            return
        if status:
            self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(n)

    def note(self, text):
        self._tqdm().write(terminal_text(text), file=self.file or sys.stderr)  # controls, undecodable bytes escaped

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _StartAdvance:
    """A sink of the earlier protocol (start(total, already) and advance(n)) behind this one."""

    def __init__(self, sink):
        self.sink = sink

    def phase(self, name, total=None, unit="it", done=0):
        self.sink.start(total, done)

    def advance(self, n=1, status=""):
        self.sink.advance(n)

    def note(self, text):
        pass

    def close(self):
        pass


AUTO = "auto"  # the default of every entry point's `progress`: bars when interactive()


def interactive() -> bool:
    """Whether a person is probably watching: stderr is a terminal, or this is a Jupyter kernel
    (whose stderr is a pipe to the notebook, where tqdm.auto draws widgets)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stderr
        pass
    ipython = sys.modules.get("IPython")  # only when already imported: a kernel has imported it
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return getattr(shell, "kernel", None) is not None


def resolve(progress) -> Progress:
    """What a library call reports to: True -> Bars (tqdm.auto), "auto" -> Bars when interactive()
    else Silent, False/None -> Silent, or the object itself."""
    if isinstance(progress, str) and progress == AUTO:
        progress = interactive()
    if progress is None or progress is False:
        return Silent()
    if progress is True:
        return Bars(notebook=True)
    if all(hasattr(progress, m) for m in ("phase", "advance", "note", "close")):
        return progress
    if hasattr(progress, "start") and hasattr(progress, "advance"):
        return _StartAdvance(progress)
    raise SettingError(f"progress must be True, False, None, 'auto' or an object with phase/advance/note/close; "
                       f"got {type(progress).__name__}")
