"""The report as a browser shows it: headless Chromium renders report.html to pixels and a DOM."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from fortify.report.html import write_report
from fortify.report.results import load_results

pytestmark = pytest.mark.slow
# .ci/run installs Debian's chromium and sets this, so that in CI a missing browser fails the test
REQUIRED = os.environ.get("FORTIFY_REQUIRE_CHROMIUM") == "1"
# flags for a sandbox without network or display (root, no GPU, no background connections)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if REQUIRED:
        pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def _browse(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)


def test_chromium_renders_the_report_with_its_numbers(run_dir, tmp_path):
    # Prepare
    results = load_results(run_dir)
    page = write_report(results, run_dir / "report.html")
    # Execute: a screenshot and the DOM after scripts and layout
    screenshot = tmp_path / "report.png"
    _browse(page, tmp_path / "profile", "--window-size=1200,2400", f"--screenshot={screenshot}")
    dom = _browse(page, tmp_path / "profile", "--dump-dom").stdout
    # Assert: the picture is not blank (real text and figures give many distinct pixel values)
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.05
    dark = (pixels[..., :3].mean(axis=2) < 0.5).mean()
    assert 0.005 < dark < 0.5, "the page is empty or a solid block"
    # the DOM the browser built holds the key numbers of results.json
    for name, model in results["models"].items():
        robustness = model["robustness"]
        assert f'data-model="{name}"' in dom
        for value in (robustness["clean_accuracy"], robustness["worst_case_accuracy"]):
            assert f"{100 * value:.1f}%" in dom
    assert dom.count("data:image/png;base64,") >= 10
