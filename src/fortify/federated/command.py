"""What ``fortify federate`` does: resolve the run, simulate or submit it, print the rounds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fortify.federated.config import FederatedRun, load_federated_run
from fortify.federated.deployment import submit, wait_for_superlink, write_flower_app
from fortify.federated.progress import PROGRESS_JSON, read_progress
from fortify.federated.results import RESULT_FILE, FederatedResult, read_result
from fortify.federated.server import FederationError, validate_run
from fortify.federated.simulation import run_simulation
from fortify.pipeline import discarded_on_error, fresh_out_dir
from fortify.training import checkpoint as ckpt


def federate(config: Path | None, overrides: dict[str, Any], federation: dict[str, Any], *,
             out: Path | None, superlink: str | None = None, write_app: Path | None = None,
             workers: int | None = None, timeout: float = 10.0, verbose: bool = False,
             resume: bool = False) -> tuple[FederatedRun, FederatedResult | None]:
    """Simulate the run (default), submit it to a SuperLink, or only write its Flower app.

    With ``resume`` the run continues from the last round saved in ``out`` (a finished one is read
    back, not run again)."""
    name = overrides.get("data", {}).get("name", "digits")
    out_dir = fresh_out_dir(out, f"{name}-federated", resume, command="federate", marker=PROGRESS_JSON)
    run = load_federated_run(config, overrides, {**federation, "out": str(out_dir.resolve()),
                                                 "resume": resume})
    validate_run(run)
    if superlink is not None and write_app is None:
        wait_for_superlink(superlink, timeout=timeout)  # a wrong address fails before any file is written
    if write_app is not None:
        write_flower_app(write_app, run)
        return run, None
    if resume and _finished(out_dir, run):
        return run, read_result(out_dir)
    if superlink is None:
        return run, run_simulation(run, workers=workers, verbose=verbose)
    # a submission that fails before the ServerApp saves a round leaves --out as it was, so that the
    # same command runs again (the app folder alone would make it "not empty", yet no run to resume);
    # once a round is saved, everything stays for --resume
    with discarded_on_error(out_dir, checkpoint=PROGRESS_JSON):
        app_dir = write_flower_app(out_dir / "flower-app", run)
        output = submit(app_dir, superlink, timeout=timeout)
        if not (out_dir / RESULT_FILE).is_file():
            raise FederationError(_missing_result(out_dir, output))
    return run, read_result(out_dir)


# the last line of a Python error in flwr's streamed log, e.g. "FederationError: round 1: ..."
_ERROR_LINE = re.compile(r"\b[A-Za-z_]*(?:Error|Exception): .*\S")


def _missing_result(out_dir: Path, output: str) -> str:
    """Why a finished submission left no result: the ServerApp's error when flwr's log shows one
    (``flwr run`` exits 0 when the ServerApp raises), else the file system the two must share."""
    errors = _ERROR_LINE.findall(output)
    if errors:
        return f"the run on the SuperLink failed: {errors[-1]}"
    return (f"the run ended but {out_dir / RESULT_FILE} is missing; the SuperLink's ServerApp writes it, "
            "so it must share this file system")


def _finished(out: Path, run: FederatedRun) -> bool:
    """Whether ``out`` holds this run, finished; a finished run of other settings is an error."""
    if not (out / RESULT_FILE).is_file():
        return False
    read_progress(run)  # checks the settings
    return bool(ckpt.read_state_json(out).get("finished"))


def print_rounds(result: FederatedResult, console: Console) -> None:
    threat = result.threat
    fed = result.federation
    table = Table(title=f"{result.dataset}, {fed['clients']} clients, {fed['strategy']}, "
                        f"objective {result.objective}: test accuracy of the global model "
                        f"({threat['n_examples']} examples, PGD-{threat['steps']} {threat['norm']} "
                        f"eps={threat['eps']:.4g})")
    private = any("dp-epsilon-max" in m for m in result.train_metrics.values())
    for column in ("round", "clean", "robust", "seconds", *(["epsilon (worst client)"] if private else [])):
        table.add_column(column, justify="right")
    for record in result.rounds:
        spent = result.train_metrics.get(record.round, {}).get("dp-epsilon-max")
        table.add_row(str(record.round), f"{100 * record.clean_accuracy:.1f}%",
                      f"{100 * record.robust_accuracy:.1f}%", f"{record.seconds:.1f}",
                      *([f"{spent:.3g}" if spent is not None else "-"] if private else []))
    console.print(table)
    if private and result.rounds_cut_off:
        console.print(f"{result.rounds_cut_off} round(s) cut off by an interruption count in the epsilon: "
                      "their clients may have sent updates before the cut")
