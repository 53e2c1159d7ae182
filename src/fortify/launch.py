"""The `fortify` command's entry point.

Importing the command line loads torch, which takes seconds; a Ctrl-C in that time ends the command
as quietly as one later does (``fortify.cli`` reports interrupts once it runs).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from fortify.cli import main as run_command
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    run_command()
