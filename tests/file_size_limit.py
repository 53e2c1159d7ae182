"""Running Python as on a full disk: under a file-size limit every write past it fails (EFBIG), as
writes do when the disk fills, and the signal that would otherwise kill the process is ignored."""

from __future__ import annotations

import subprocess
import sys

_PREAMBLE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""

# the fortify command line, its arguments taken from the process's own
FORTIFY_CLI = """
from fortify.cli import main
sys.argv = ["fortify", *sys.argv[1:]]
main()
"""

SUPPORTED = sys.platform != "win32"


def run_with_file_size_limit(code: str, *args: object, limit: int) -> subprocess.CompletedProcess[str]:
    """``code`` run in a new interpreter with ``args`` as its arguments, under a limit of ``limit``
    bytes per file."""
    script = _PREAMBLE.format(limit=limit) + code
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=300)
