"""Run the same apps as a real deployment: a SuperLink, SuperNodes, and ``flwr run``.

``write_flower_app`` writes a Flower app directory whose ``pyproject.toml`` points at
``fortify.federated.apps`` and carries the run's settings as Flower run config. ``submit`` checks
that the SuperLink answers (a clear error after ``timeout`` seconds, never a hang) and starts the
run with Flower's own ``flwr run`` against a connection named ``fortify``. The SuperLink and the
SuperNodes are Flower's ``flower-superlink`` and ``flower-supernode`` (see docs/FEDERATED.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w

from fortify.errors import ConfigError, MissingDependencyError
from fortify.federated.config import FederatedRun
from fortify.federated.server import FederationError

CONNECTION = "fortify"
APP_NAME = "fortify-federated"
_ADDRESS = re.compile(r"^[\w.\-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


def write_flower_app(directory: Path, run: FederatedRun) -> Path:
    """A Flower app directory for ``run``; ``flwr run DIRECTORY`` builds it into a FAB."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": APP_NAME, "version": "1.0.0", "license": "Apache-2.0",
                    "description": "fortify federated adversarial training", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fortify",
            "components": {"serverapp": "fortify.federated.apps:server_app",
                           "clientapp": "fortify.federated.apps:client_app"},
            "config": run.to_run_config()}}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory


def check_address(address: str) -> str:
    if not _ADDRESS.match(address):
        raise ConfigError(f"SuperLink address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9093)")
    port = int(address.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise ConfigError(f"SuperLink address {address!r} has port {port}; ports run from 1 to 65535")
    return address


def wait_for_superlink(address: str, *, timeout: float = 10.0) -> None:
    """Return once the SuperLink at ``address`` answers its health check; raise after ``timeout``."""
    check_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://{address}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            port = address.rsplit(":", 1)[1]
            raise FederationError(f"no SuperLink answered at {address} within {timeout:g} s; start one "
                                  f"with `flower-superlink --insecure --port {port}` or pass the right "
                                  "--superlink address")
        time.sleep(0.2)


def flower_home(address: str, directory: Path) -> Path:
    """A Flower configuration directory with one insecure connection, ``fortify``, to ``address``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION,
                            CONNECTION: {"address": check_address(address), "insecure": True}}}
    (directory / "config.toml").write_text(tomli_w.dumps(config))
    return directory


def flwr_executable() -> str:
    found = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if found is None:
        raise MissingDependencyError("the `flwr` command is missing: pip install 'fortify[federated]'")
    return found


def submit(app_dir: Path, address: str, *, timeout: float = 10.0, stream: bool = True) -> str:
    """Start the app in ``app_dir`` on the SuperLink at ``address`` with ``flwr run``.

    With ``stream`` the call follows the run's log until the run ends. Returns flwr's output.
    """
    wait_for_superlink(address, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="fortify-flwr-") as home:
        env = {**os.environ, "FLWR_HOME": str(flower_home(address, Path(home)))}
        command = [flwr_executable(), "run", str(app_dir), CONNECTION] + (["--stream"] if stream else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FederationError(f"`flwr run` failed (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout
