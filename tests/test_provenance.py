"""Provenance: the commit recorded is fortify's own, never that of a repository it is installed in."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fortify.pipeline import _git_commit


def _repository(root: Path, package: Path) -> str:
    """A git repository at ``root`` holding an empty ``package`` directory, with one commit."""
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for command in (["init", "-q"], ["add", "-A"],
                    ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one"]):
        subprocess.run(["git", *command], cwd=root, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_a_package_installed_inside_another_repository_records_no_commit(tmp_path):
    # a virtualenv inside the user's project: git answered with the project's commit
    package = tmp_path / ".venv" / "lib" / "site-packages" / "fortify"
    _repository(tmp_path, package)
    assert _git_commit(package.resolve()) is None


def test_a_checkout_of_fortify_records_its_commit(tmp_path):
    commit = _repository(tmp_path, tmp_path / "src" / "fortify")
    assert _git_commit((tmp_path / "src" / "fortify").resolve()) == commit
