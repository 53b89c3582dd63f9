"""pipeline/reports/pages.py: report.html in a fit run folder, checked as data and in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    cache, facts = planted
    run = tmp_path_factory.mktemp("pages") / "run"
    result = run_cli("fit", cache, "--out", run, "--no-export")
    assert result.code == 0, result.err
    return run, facts


def test_the_page_shows_errors_leaks_and_suspects_of_the_fit(planted_run):
    run, facts = planted_run
    page = (run / "report.html").read_text()
    assert "report.html" in (run / "report.md").read_text()
    leaks = page[page.index('id="leaks"'):page.index('id="suspects"')]
    assert "Leaks across splits: 6 near-identical pairs" in leaks
    assert all(name in leaks for name in facts["exact"] + facts["changed"])
    assert leaks.count("identical bytes") == 3
    assert re.search(r"without the 6 test images that have a near-copy in train\+val \(n = 153\)", page)
    suspects = page[page.index('id="suspects"'):page.index('id="map"')]
    assert sum(name.split("/")[-1] in suspects for name in facts["moved"]) >= 3
    for anchor in re.findall(r'href="#(cell-\d-\d)"', page):  # every linked confusion cell has its section
        assert f'id="{anchor}"' in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_the_page_renders_in_a_real_browser(planted_run, tmp_path):
    run, facts = planted_run
    url = (run / "report.html").as_uri()
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = subprocess.run([*base, "--window-size=1400,3000", f"--screenshot={tmp_path / 'page.png'}", url],
                          capture_output=True, text=True, timeout=120)
    assert (tmp_path / "page.png").stat().st_size > 50_000, shot.stderr[-2000:]
    dom = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [l for l in dom.stderr.splitlines() if "CONSOLE" in l], dom.stderr  # no console errors
    html = dom.stdout
    images = re.findall(r'<img [^>]*src="data:image/(jpeg|png);base64,', html)
    assert len(images) >= 6 * 2 + 3 + 2  # the planted pairs, suspects, the C sweep and the map
    assert all(name in html for name in facts["exact"] + facts["changed"])
