"""The allocator setting: after keep_freed_memory, a large tensor allocated again reuses pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fortify import allocator
from fortify.errors import ConfigError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Touches a 64 MiB tensor 20 times and prints the page faults of the last ten. Above 32 MiB glibc
# maps every block afresh by default (16,384 faults each); with the thresholds raised the heap keeps it
# once it has settled, which took up to seven rounds on glibc 2.36 (e.g. 16,384 faults in rounds 2, 4,
# 5 and 6, none from round 8 on).
_FAULTS = """
import resource, sys, torch
from fortify import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def touch():
    torch.ones(16 * 2**20).sum()
for _ in range(10):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                          check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    pages = 16 * 2**20 * 4 // 4096
    assert default >= 10 * pages  # every round faults every page
    assert kept <= 2 * pages  # at most two of the ten rounds (none in every run seen)


def test_the_environment_variable_declines_it_with_0_and_refuses_other_values(monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.delenv(allocator.SETTING_VARIABLE, raising=False)
    assert allocator.keep_freed_memory_unless_declined() is True and calls == [True]
    monkeypatch.setenv(allocator.SETTING_VARIABLE, "1")
    assert allocator.keep_freed_memory_unless_declined() is True and calls == [True, True]
    monkeypatch.setenv(allocator.SETTING_VARIABLE, "0")
    assert allocator.keep_freed_memory_unless_declined() is False and calls == [True, True]
    for typo in ("off", "", "true"):
        monkeypatch.setenv(allocator.SETTING_VARIABLE, typo)
        with pytest.raises(ConfigError, match="must be 1 .* or 0"):
            allocator.keep_freed_memory_unless_declined()
    assert calls == [True, True]


def test_a_c_library_other_than_glibc_is_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


def test_the_command_line_keeps_freed_memory_before_any_command(monkeypatch):
    from fortify import cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory_unless_declined", lambda: calls.append("kept") or True)
    monkeypatch.setattr(sys, "argv", ["fortify", "--help"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 0 and calls == ["kept"]


def test_the_command_line_refuses_a_misspelt_setting_in_one_line(monkeypatch, capsys):
    from fortify import cli

    monkeypatch.setenv(allocator.SETTING_VARIABLE, "yes")
    monkeypatch.setattr(sys, "argv", ["fortify", "--help"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "FORTIFY_KEEP_FREED_MEMORY must be 1" in err and "Traceback" not in err
