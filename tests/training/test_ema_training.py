"""Weight EMA inside the Trainer: a short run validates a trained model, not its initialisation, and
the checkpoint keeps the EMA's update counter (the step of its warm-up ramp)."""

from __future__ import annotations

import pytest
import torch

from fortify.config import TrainConfig
from fortify.data import Dataset
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.checkpoint import load_tensors, read_state_json
from fortify.training.ema import UPDATES_KEY
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.1)


def _fit(digits: Dataset, ema_decay: float | None, run_dir=None) -> tuple[Trainer, list[float]]:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="standard", epochs=3, batch_size=64, early_stopping=False,
                         ema_decay=ema_decay)
    trainer = Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config, threat=THREAT,
                      run_dir=run_dir, show_progress=False)
    history = trainer.fit(digits.train, digits.val).history
    return trainer, [record.val_clean_accuracy for record in history]


def test_a_short_run_with_ema_validates_about_as_well_as_without(digits):
    # Prepare / Execute: 60 steps, where a fixed decay of 0.999 would leave 0.94 of the average on
    # the random initial weights (validation accuracy 0.11 against 0.80)
    _, raw = _fit(digits, ema_decay=None)
    _, averaged = _fit(digits, ema_decay=0.999)
    # Assert: the warm-up ramp makes the average follow the training from the first epoch on
    assert raw[-1] > 0.6
    assert averaged == pytest.approx(raw, abs=0.05)


def test_the_checkpoint_keeps_the_ema_update_count(digits, tmp_path):
    # Execute
    trainer, _ = _fit(digits, ema_decay=0.999, run_dir=tmp_path)
    # Assert: one EMA update per optimiser step, saved beside the average
    steps = read_state_json(tmp_path)["progress"]["step"]
    saved = load_tensors(tmp_path / "state.safetensors", "train-state")
    assert steps == 60
    assert int(saved[UPDATES_KEY]) == trainer.ema.updates == steps
