"""The same apps as a real deployment: a SuperLink and two SuperNodes as separate processes on
loopback, the run submitted by ``fortify federate --superlink``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fortify.cli import app
from fortify.federated.deployment import wait_for_superlink
from fortify.federated.server import FederationError

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A SuperLink plus two SuperNodes (partitions 0 and 1 of 2); yields the SuperLink address."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "FLWR_HOME": str(tmp_path / "flwr-home")}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = [_start([str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
                         "--disable-runtime-dependency-installation"], logs / "superlink.log", env)]
    for partition in range(2):
        processes.append(_start(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", address,
             "--port", str(_free_port()), "--node-config", f"partition-id={partition} num-partitions=2"],
            logs / f"supernode-{partition}.log", env))
    try:
        wait_for_superlink(address, timeout=120)  # a loaded CI machine starts it slowly
        yield address, logs
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(directory.glob("*.log")))


@pytest.mark.slow
def test_two_supernodes_over_loopback_improve_the_global_model(deployment, tmp_path):
    address, logs = deployment
    out = tmp_path / "fed"
    result = CliRunner().invoke(app, [
        "federate", "--superlink", address, "--clients", "2", "--rounds", "2", "--local-epochs", "2",
        "--model", "mlp", "--eval-examples", "200", "--eval-steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output + _logs(logs)
    record = json.loads((out / "federated.json").read_text())
    clean = [r["clean_accuracy"] for r in record["rounds"]]
    assert len(clean) == 3
    assert clean[-1] > clean[0] + 0.2, clean
    assert (out / "flower-app" / "pyproject.toml").is_file()


def test_an_unreachable_superlink_is_a_clear_error_not_a_hang():
    address = f"127.0.0.1:{_free_port()}"  # nothing listens here
    with pytest.raises(FederationError, match=rf"no SuperLink answered at {address} within 0.5 s"):
        wait_for_superlink(address, timeout=0.5)


@pytest.mark.parametrize("address, fragment", [
    ("bogus", "is not HOST:PORT"),
    ("127.0.0.1:99999", "has port 99999; ports run from 1 to 65535"),
    ("127.0.0.1:0", "has port 0"),
])
def test_a_wrong_superlink_address_fails_before_any_file_is_written(tmp_path, address, fragment):
    out = tmp_path / "fed"
    result = CliRunner().invoke(app, ["federate", "--dataset", "digits", "--rounds", "1", "--clients", "2",
                                      "--out", str(out), "--superlink", address])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and isinstance(result.exception, SystemExit)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
