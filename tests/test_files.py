"""pipeline/files.py: names shown to people, folders made, temporaries renamed into place or cleaned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.files import display_path, make_folder_for, remove_stale_temporaries, write_atomically


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_failed_write_leaves_nothing_and_a_good_one_leaves_only_the_file(tmp_path):
    target = tmp_path / "model.pt"

    def fails(path):
        open(path, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(fails, str(target))
    assert list(tmp_path.iterdir()) == []
    write_atomically(lambda p: open(p, "w").write("whole"), str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and target.read_text() == "whole"


def test_temporaries_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f"model.pt.writing-{dead}").write_text("left by kill -9")
    (tmp_path / f"run.writing-{dead}").mkdir()
    (tmp_path / f"run.writing-{dead}" / "metrics.json").write_text("{}")
    (tmp_path / f"model.pt.writing-{alive}").write_text("still being written")
    remove_stale_temporaries(str(tmp_path / "model.pt"))
    remove_stale_temporaries(str(tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model.pt.writing-{alive}"]


def test_names_and_folders(tmp_path):
    assert display_path(os.fsdecode(b"/x/caf\xe9")) == "/x/caf\\xe9"
    make_folder_for(str(tmp_path / "a" / "b" / "file.txt"))
    assert (tmp_path / "a" / "b").is_dir()


def test_text_from_outside_is_made_inert_for_terminals_markdown_and_csv():
    from pipeline.files import csv_cell, markdown_code, markdown_text, terminal_text

    hostile = "a\x1b[2J\x1b]0;t\x07\rb\u202e" + os.fsdecode(b"\xff")
    assert terminal_text(hostile) == "a\\x1b[2J\\x1b]0;t\\x07\\x0db\\u202e\\xff"
    assert terminal_text("two\nlines\tkept") == "two\nlines\tkept"
    assert markdown_text("<img src=x onerror=alert(1)> *b* | [l](u)") == (
        "&lt;img src=x onerror=alert\\(1\\)&gt; \\*b\\* \\| \\[l\\]\\(u\\)")
    assert markdown_text("a\nb\r c") == "a b c"  # one line: no new paragraph, heading or table row
    assert markdown_code("x_y.jpg") == "`x_y.jpg`" and markdown_code("a ``b`` c") == "``` a ``b`` c ```"
    assert [csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "'x", "ok", 1.5, None)] == [
        "'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "''x", "ok", 1.5, None]
    assert csv_cell(os.fsdecode(b"=caf\xe9")) == "'=caf\\xe9"


def test_what_is_not_a_regular_file_is_named(tmp_path):
    from pipeline.files import not_a_file

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "f").write_text("x")
    assert not_a_file(tmp_path / "f") is None
    assert not_a_file(tmp_path / "fifo") == "is a FIFO, not a regular file"
    assert not_a_file("/dev/zero") == "is a character device, not a regular file"
    assert not_a_file(tmp_path) == "is a folder" and not_a_file(tmp_path / "gone") == "does not exist"
