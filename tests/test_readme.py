"""README.md: every command and Python block in it runs as written, on small generated photos."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, make_folder, run_cli

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PROGRAMS = ("transfer", "make", "pip")


def _blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def _commands() -> list[list[str]]:
    """Every command line of the README's shell blocks (a block whose first line starts with a
    program), comments dropped."""
    found = []
    for lang, body in _blocks():
        lines = [line for line in body.splitlines() if line.strip()]
        if lang or not lines or lines[0].split()[0] not in PROGRAMS:
            continue  # a picture or a file tree
        for line in lines:
            words = shlex.split(line, comments=True)
            assert words and words[0] in PROGRAMS, f"README: {line!r} is in a command block but is no command"
            found.append(words)
    return found


def test_the_readme_is_short_and_every_command_in_it_is_run_by_a_test():
    assert len(README.read_text().splitlines()) <= 200
    commands = _commands()
    makefile = (ROOT / "Makefile").read_text()
    for words in commands:
        if words[0] == "make":  # `make test` runs this suite; its targets must exist
            assert re.search(rf"^{words[1]}:", makefile, re.M), words
    assert [w for w in commands if w[0] == "pip"] == [["pip", "install", "-e", "."]]  # the install test's
    tour = [w for w in commands if w[0] == "transfer"]
    assert len(tour) >= 8 and ["transfer", "--version"] in tour
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\(docs/([\w.-]+\.md)", README.read_text()))
    assert docs == linked, f"README's index misses {docs - linked}, links absent {linked - docs}"


@pytest.mark.slow
def test_the_readme_tour_and_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    """On generated photos: the tour's commands in order, then the Python blocks in the same folder
    (the first finds its cache already extracted by the tour, as a reader going on would)."""
    make_folder(tmp_path / "photos", {"ants": 4, "bees": 4}, splits=("train", "val", "test"), ext=".jpg")
    for photo in (tmp_path / "photos").rglob("*.jpg"):  # classes a network can tell apart, as a reader's are
        pixels = np.asarray(Image.open(photo), dtype=np.float32)
        pixels[..., 0 if photo.parent.name == "ants" else 2] += 80
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(photo)
    (tmp_path / "new_photos").mkdir()
    for f in sorted((tmp_path / "photos" / "test" / "bees").iterdir())[:2]:
        (tmp_path / "new_photos" / f.name).write_bytes(f.read_bytes())
    for words in _commands():
        if words[0] == "transfer":
            result = run_cli(*words[1:], cwd=tmp_path)
            assert result.code == 0, f"{shlex.join(words)}\n{result.out}\n{result.err}"
    assert (tmp_path / "reports" / "photos" / "model.pt").is_file()
    assert (tmp_path / "reports" / "inspect" / "inspect.html").is_file()
    assert (tmp_path / "reports" / "experiment" / "results.csv").is_file()
    python = [body for lang, body in _blocks() if lang == "python"]
    assert len(python) == 2
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for body in python:
        exec(compile(body, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "new_photos/" in out and "top-1" in out and (tmp_path / "models" / "photos" / "model.pt").is_file()
    assert "model files skipped:" in out and "records no backbone" in out
    assert (tmp_path / "reports" / "mine" / "head.pt").is_file() and not (tmp_path / "reports" / "mine" / "model.pt").exists()


def _environment_with_torch(root: Path) -> Path:
    """A new virtual environment in which everything this package needs is already installed (torch
    above all), but not this package: a .pth file points at a folder of links to this environment's
    site-packages, less transfer's own entries (pip would try to uninstall those)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True, timeout=120)
    here = Path(sysconfig.get_paths()["purelib"])
    shelf = root / "installed"
    shelf.mkdir()
    for entry in here.iterdir():
        if "transfer" not in entry.name.lower() and not entry.name.endswith(".pth"):
            (shelf / entry.name).symlink_to(entry)
    python = root / "env" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "existing-environment.pth").write_text(f"{shelf}\n")
    return python


@pytest.mark.slow
def test_pip_install_into_an_environment_that_has_torch_keeps_it(tmp_path):
    """The README's `pip install -e .` into an environment with torch: offline here (--no-index,
    and the environment's own setuptools), so nothing can be fetched and torch cannot be replaced."""
    python = _environment_with_torch(tmp_path)
    before = subprocess.run([python, "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True,
                            check=True).stdout
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}  # pip's "0" means: no isolation
    install = subprocess.run([python, "-m", "pip", "install", "-e", "."], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert "Successfully installed transfer-" in install.stdout and "torch" not in install.stdout.split(
        "Successfully installed")[1]
    version = subprocess.run([tmp_path / "env" / "bin" / "transfer", "--version"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("transfer "), version.stderr
    after = subprocess.run([python, "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True,
                           check=True).stdout
    assert after == before  # the torch that was there, not a new copy
