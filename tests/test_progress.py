"""pipeline/progress.py: bars by default when a person watches, silence when not, any sink works."""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest

import pipeline
from pipeline import progress as progress_mod
from pipeline.errors import SettingError
from tests.conftest import LITE, blobs, make_cache, make_folder


class Recorder:
    """A custom sink: remembers every call."""

    def __init__(self):
        self.calls = []

    def phase(self, name, total=None, unit="it", done=0):
        self.calls.append(("phase", name, total))

    def advance(self, n=1, status=""):
        self.calls.append(("advance", n))

    def note(self, text):
        self.calls.append(("note", text))

    def close(self):
        self.calls.append(("close",))


def _arrays():
    X, y, classes = blobs(20, 2, 6)
    return X, y, classes, ["train", "val", "test", "train", "train"] * 8


def test_python_extract_with_progress_true_draws_a_tqdm_bar(tmp_path, capsys):
    images = make_folder(tmp_path / "images", {"a": 2, "b": 2})
    pipeline.extract(images, tmp_path / "c.h5", backbone=LITE[1], weights=LITE[3], batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "extract: 100%" in err and "4/4" in err and "img/s" in err, err


def test_the_default_shows_bars_only_when_interactive(monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "interactive", lambda: False)
    pipeline.fit(_arrays(), C=0.1)
    assert capsys.readouterr().err == ""  # a script with redirected output, a test, a service: nothing
    monkeypatch.setattr(progress_mod, "interactive", lambda: True)
    pipeline.fit(_arrays(), C=0.1)
    assert "fit on train" in capsys.readouterr().err  # a terminal or a notebook: the bars, by default
    pipeline.fit(_arrays(), C=0.1, progress=False)
    assert capsys.readouterr().err == ""  # False silences, whoever watches


def test_interactive_means_a_terminal_or_a_jupyter_kernel(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert not progress_mod.interactive()  # piped, and IPython without a kernel (a plain terminal shell)
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert progress_mod.interactive()
    monkeypatch.setattr(sys, "stderr", Stream(False))
    kernel = types.SimpleNamespace(kernel=object())  # ipykernel's shell has a kernel
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert progress_mod.interactive()
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, some services
    assert progress_mod.interactive()
    monkeypatch.delitem(sys.modules, "IPython")
    assert not progress_mod.interactive()


def test_resolve_takes_the_documented_values_and_refuses_others(monkeypatch):
    monkeypatch.setattr(progress_mod, "interactive", lambda: True)
    assert isinstance(progress_mod.resolve("auto"), progress_mod.Bars)
    assert isinstance(progress_mod.resolve(True), progress_mod.Bars)
    monkeypatch.setattr(progress_mod, "interactive", lambda: False)
    assert isinstance(progress_mod.resolve("auto"), progress_mod.Silent)
    assert isinstance(progress_mod.resolve(None), progress_mod.Silent)
    sink = Recorder()
    assert progress_mod.resolve(sink) is sink
    with pytest.raises(SettingError, match="progress must be True, False, None, 'auto'"):
        progress_mod.resolve("yes")


def test_inspect_and_a_written_fit_report_their_phases_to_a_custom_sink(tmp_path):
    X, y, classes = blobs(15, 2, 6)
    cache = make_cache(tmp_path / "c.h5", X, y, classes, ["train", "train", "val"] * 10)
    sink = Recorder()
    pipeline.inspect(cache, tmp_path / "inspected", progress=sink)
    phases = [c[1] for c in sink.calls if c[0] == "phase"]
    assert phases == ["inspect: leaks across splits", "inspect: duplicates", "inspect: suspect labels (5-fold)",
                      "inspect: map", "inspect: inspect.html (thumbnails) and map.png"]
    assert sink.calls[-1] == ("close",)
    sink = Recorder()
    pipeline.fit(cache, tmp_path / "run", C=0.1, progress=sink)
    phases = [c[1] for c in sink.calls if c[0] == "phase"]
    assert phases[-2:] == ["run folder: metrics, report.md, plots",
                           "run folder: report.html (leaks, suspect labels, thumbnails)"], phases
    assert np.isfinite(pipeline.read_cache(cache).features()).all()


def test_an_experiment_reports_its_runs_then_the_folder_in_order(tmp_path):
    X, y, classes = blobs(15, 2, 6)
    cache = make_cache(tmp_path / "c.h5", X, y, classes, ["train", "train", "val"] * 10)
    request = pipeline.ExperimentRequest.from_text([str(cache)], ["C=0.01,0.1,1"], jobs=1, out=str(tmp_path / "e"))
    sink = Recorder()
    pipeline.run_experiment(request, progress=sink)
    assert sink.calls == [("phase", "experiment", 3), ("advance", 1), ("advance", 1), ("advance", 1), ("close",),
                          ("phase", "writing results.csv, summary.md and the plots", 1), ("advance", 1), ("close",)]
    assert (tmp_path / "e" / "results.csv").is_file()
    sink = Recorder()  # nothing written: the runs' bar alone
    pipeline.run_experiment(pipeline.ExperimentRequest.from_text([str(cache)], ["C=0.1"], jobs=1), progress=sink)
    assert sink.calls == [("phase", "experiment", 1), ("advance", 1), ("close",)]


def _takes_progress(function) -> bool:
    return "progress" in inspect.signature(function).parameters


# Public calls that take no progress: quick (a file's header, a module listing) or a class's constructor.
QUICK = {"read_cache", "write_cache", "load_model", "list_layers"}


def test_every_public_call_that_reports_progress_defaults_to_auto():
    """Each public function (and each public method of a public class) with a `progress` parameter
    defaults to "auto", so that it resolves like every other entry point; one without it is named
    in QUICK, so that a new long call cannot be added silent."""
    checked = []
    for name in pipeline.__all__:
        value = getattr(pipeline, name)
        if inspect.isclass(value):
            for method_name, method in vars(value).items():
                function = getattr(method, "__func__", method)
                if not method_name.startswith("_") and inspect.isfunction(function) and _takes_progress(function):
                    checked.append(f"{name}.{method_name}")
                    assert inspect.signature(function).parameters["progress"].default == "auto", f"{name}.{method_name}"
        elif inspect.isfunction(value):
            if _takes_progress(value):
                checked.append(name)
                assert inspect.signature(value).parameters["progress"].default == "auto", name
            else:
                assert name in QUICK, f"pipeline.{name} takes no progress argument and is not listed as quick"
    assert {"extract", "fit", "export", "predict", "inspect", "run_experiment", "evaluate", "merge_caches",
            "list_backbones", "bench_backbones"} <= set(checked), checked
