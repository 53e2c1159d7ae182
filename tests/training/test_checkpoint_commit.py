"""A checkpoint's files commit together: a run killed at any step of writing one resumes to the weights
of a run that was never interrupted, and leaves no pending file behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fortify.config import TrainConfig
from fortify.data import Split
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.checkpoint import PENDING
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.2)
TENSOR_FILES = ("best.safetensors", "last.safetensors", "state.safetensors", "model.safetensors")
# validation accuracy by epoch: best at epoch 2, so best.safetensors is written in epochs 1 and 2 but
# not 3, and model.safetensors (epoch 2's) differs from last.safetensors (epoch 3's)
SCRIPTED_ACCURACY = {1: 0.5, 2: 0.7, 3: 0.6}

MakeTrainer = Callable[[Path], Trainer]


class Killed(BaseException):
    """Stands for SIGKILL or a preemption: nothing in fortify catches it."""


def _trainer(digits, run_dir: Path) -> Trainer:
    torch.manual_seed(123)  # the same initial weights for every trainer built here
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="standard", epochs=3, batch_size=32, lr=0.05, seed=5,
                         early_stopping=True, patience=2)
    trainer = Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config, threat=THREAT,
                      run_dir=run_dir, show_progress=False)
    trainer._validate = lambda val: (SCRIPTED_ACCURACY[trainer.state.epoch + 1], None)
    return trainer


def _dp_trainer(digits, run_dir: Path) -> Trainer:
    """A DP run: its finished directory drops the noise generators' states from state.safetensors."""
    from fortify.config import DPConfig
    from fortify.training.dp import DPTrainer

    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="standard", epochs=1, batch_size=32, lr=0.5, momentum=0.0,
                         weight_decay=0.0, early_stopping=True)
    return DPTrainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config,
                     dp=DPConfig(enabled=True, noise_multiplier=1.0, noise_seed=3), threat=THREAT,
                     run_dir=run_dir, show_progress=False)


def _data(digits) -> tuple[Split, Split]:
    return Split(digits.train.x[:64], digits.train.y[:64]), Split(digits.val.x[:16], digits.val.y[:16])


def _fit_recording_replaces(trainer: Trainer, data: tuple[Split, Split], *, resume: bool = False,
                            kill_after: int | None = None) -> list[str]:
    """Fit, noting the file name each os.replace into the run directory gives (each is one atomic step
    on disk); with ``kill_after``, die right after that many steps. Returns the names noted."""
    done: list[str] = []
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        if Path(target).parent == trainer.run_dir:
            done.append(Path(target).name)
            if len(done) == kill_after:
                raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        trainer.fit(*data, resume=resume)
    return done


def _kill_at_every_step(make_trainer: MakeTrainer, data: tuple[Split, Split], reference_dir: Path,
                        steps: list[str], tmp_path: Path) -> list[str]:
    """For each step of the uninterrupted run, a run killed right after it and resumed; what differs
    from the uninterrupted run's files, one line per step where something does."""
    reference = {name: load_file(str(reference_dir / name)) for name in TENSOR_FILES}
    reference_progress = _progress(reference_dir)
    failures = []
    for kill_after, step in enumerate(steps, start=1):
        run_dir = tmp_path / f"killed-{kill_after}"
        with pytest.raises(Killed):
            _fit_recording_replaces(make_trainer(run_dir), data, kill_after=kill_after)
        try:
            # resumed in a fresh trainer as `fortify train --resume` does: a run killed before its first
            # state.json starts afresh
            make_trainer(run_dir).fit(*data, resume=(run_dir / "state.json").is_file())
            problem = _difference(run_dir, reference, reference_progress)
        except Exception as err:  # noqa: BLE001 (each kill point is reported, not only the first)
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            failures.append(f"killed after step {kill_after} ({step}): {problem}")
    return failures


def _difference(run_dir: Path, reference: dict[str, dict[str, torch.Tensor]],
                reference_progress: dict) -> str | None:
    """What in ``run_dir`` differs from the uninterrupted run's files, or None."""
    left_pending = sorted(p.name for p in run_dir.glob(f"*{PENDING}"))
    if left_pending:
        return f"pending files left behind: {left_pending}"
    for name, tensors in reference.items():
        resumed = load_file(str(run_dir / name))
        if resumed.keys() != tensors.keys():
            return f"{name} holds other tensors: {sorted(resumed.keys() ^ tensors.keys())[:3]}"
        differing = [key for key in tensors if not torch.equal(tensors[key], resumed[key])]
        if differing:
            return f"{name} differs from the uninterrupted run's in {differing[:3]}"
    if _progress(run_dir) != reference_progress:
        return f"state.json's progress differs: {_progress(run_dir)} != {reference_progress}"
    return None


def _progress(run_dir: Path) -> dict:
    """state.json's progress without the timings, which differ from run to run."""
    state = json.loads((run_dir / "state.json").read_text())
    progress = dict(state["progress"])
    del progress["seconds"]
    progress["history"] = [{k: v for k, v in record.items() if k != "seconds"}
                           for record in progress["history"]]
    return {"finished": state["finished"], **progress}


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, _fit_recording_replaces(_trainer(digits, run_dir), _data(digits))


def test_every_step_of_a_commit_is_covered(uninterrupted):
    # the kill test below dies after each of these steps: each file written under its pending name,
    # state.json, and each pending file moved onto its own name, in every epoch and at the end
    _, steps = uninterrupted
    for name in TENSOR_FILES:
        assert name + PENDING in steps and name in steps, name
    assert steps.count("state.json") == 4  # three epochs and the finished run
    assert steps.count("best.safetensors") == 2  # epochs 1 and 2 improved, epoch 3 did not


@pytest.mark.slow
def test_a_run_killed_at_any_step_of_a_checkpoint_resumes_to_the_uninterrupted_weights(
        digits, tmp_path, uninterrupted):
    reference_dir, steps = uninterrupted
    failures = _kill_at_every_step(lambda run_dir: _trainer(digits, run_dir), _data(digits), reference_dir,
                                   steps, tmp_path)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_a_dp_run_killed_at_any_step_of_a_checkpoint_resumes_to_the_uninterrupted_weights(
        digits, tmp_path):
    # Prepare: DP drops its generators' states from state.safetensors when the run finishes
    pytest.importorskip("opacus")
    reference_dir = tmp_path / "uninterrupted"
    steps = _fit_recording_replaces(_dp_trainer(digits, reference_dir), _data(digits))
    # Execute
    failures = _kill_at_every_step(lambda run_dir: _dp_trainer(digits, run_dir), _data(digits),
                                   reference_dir, steps, tmp_path)
    # Assert
    assert not failures, "\n".join(failures)
