"""Trainer: resume equals an uninterrupted run, early stopping, schedules, objectives."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode

from fortify.config import TrainConfig
from fortify.data import Split
from fortify.errors import CheckpointError, ConfigError, DataError, UnknownNameError
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.checkpoint import load_tensors
from fortify.training.objectives import OBJECTIVES, ObjectiveOptions, build_objective
from fortify.training.schedules import SCHEDULES
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.2)


class Interrupted(Exception):
    pass


# tensor operations that read values back to the host: a sync with the device on a GPU
_HOST_READS = {"item", "tolist", "numpy", "cpu", "nonzero", "masked_select", "unique",
               "__bool__", "__float__", "__int__", "__index__"}


class _HostReads(TorchFunctionMode):
    """Counts the host reads (``_HOST_READS``, and indexing with a boolean mask) made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        self.count += name in _HOST_READS or masked
        return func(*args, **(kwargs or {}))


def _subset(digits, n):
    return Split(digits.train.x[:n], digits.train.y[:n]), Split(digits.val.x[:64], digits.val.y[:64])


def _trainer(digits, run_dir, objective="pgd", callbacks=(), **overrides):
    torch.manual_seed(123)  # the same initial weights for every trainer built here
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    settings = {"objective": objective, "epochs": 3, "batch_size": 32, "attack_steps": 3,
                "val_attack_steps": 3, "lr": 0.05, "eps_warmup_epochs": 1, "seed": 5, **overrides}
    if "eps_warmup_epochs" not in overrides and settings["epochs"] == 1:
        settings["eps_warmup_epochs"] = 0  # one epoch has none after a ramp (TrainConfig refuses it)
    config = TrainConfig(**settings)
    objective_fn = build_objective(objective, ObjectiveOptions(THREAT, attack_steps=3, seed=5))
    return model, Trainer(model, objective_fn, config, threat=THREAT, run_dir=run_dir,
                          callbacks=callbacks, show_progress=False)


@pytest.mark.parametrize("objective", OBJECTIVES.names())
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(digits, tmp_path, objective):
    # Prepare: the same settings twice; the second run is killed after epoch 2. Early stopping is off
    # and the last epoch's weights (last.safetensors) are compared: with early stopping a run that
    # learns nothing keeps epoch 1's weights, saved before the interruption, and the comparison
    # would say nothing about the resumed epoch
    train, val = _subset(digits, 256)
    _, trainer_a = _trainer(digits, tmp_path / "a", objective, early_stopping=False)

    def kill_after_two(record):
        if record.epoch == 2:
            raise Interrupted

    _, trainer_b = _trainer(digits, tmp_path / "b", objective, callbacks=[kill_after_two],
                            early_stopping=False)
    # Execute
    result_a = trainer_a.fit(train, val)
    with pytest.raises(Interrupted):
        trainer_b.fit(train, val)
    _, trainer_c = _trainer(digits, tmp_path / "b", objective, early_stopping=False)  # a fresh process
    result_c = trainer_c.fit(train, val, resume=True)
    # Assert
    last_a, last_c = (load_file(str(run / "last.safetensors")) for run in (tmp_path / "a", tmp_path / "b"))
    assert len(result_c.history) == 3 and last_a.keys() == last_c.keys()
    for name, weights in last_a.items():
        assert torch.equal(weights, last_c[name]), f"{name} differs after resume"
    assert [r.train_loss for r in result_a.history] == [r.train_loss for r in result_c.history]
    assert result_a.best_epoch == result_c.best_epoch


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_channels_last_run_resumes_to_the_uninterrupted_weights(digits, tmp_path, optimizer):
    # The checkpoint keeps the momentum (Adam's moments) contiguous while the conv weights train
    # channels_last; torch's fused optimiser steps would pair mismatched layouts element by element
    train, val = _subset(digits, 256)
    settings = {"objective": "standard", "optimizer": optimizer, "channels_last": True,
                "early_stopping": False}

    def kill_after_two(record):
        if record.epoch == 2:
            raise Interrupted

    state_strides: list[bool] = []

    def record_state_strides(_record):
        # during training, where the weights are channels_last (fit hands them back contiguous); the
        # second conv, since a one-channel weight's NCHW strides pass as channels_last
        conv = model_c[2].weight
        state_strides.append(conv.is_contiguous(memory_format=torch.channels_last) and all(
            value.dim() == 0 or value.stride() == conv.stride()
            for value in trainer_c.optimizer.state[conv].values()))

    _, trainer_a = _trainer(digits, tmp_path / "a", **settings)
    _, trainer_b = _trainer(digits, tmp_path / "b", callbacks=[kill_after_two], **settings)
    trainer_a.fit(train, val)
    with pytest.raises(Interrupted):
        trainer_b.fit(train, val)
    model_c, trainer_c = _trainer(digits, tmp_path / "b", callbacks=[record_state_strides], **settings)
    trainer_c.fit(train, val, resume=True)
    last_a, last_c = (load_file(str(run / "last.safetensors")) for run in (tmp_path / "a", tmp_path / "b"))
    for name, weights in last_a.items():
        assert torch.equal(weights, last_c[name]), f"{name} differs after resume"
    assert state_strides == [True]


def test_a_run_recorded_without_channels_last_resumes_under_the_default(digits, tmp_path):
    # A run started before channels_last became the CPU default recorded false; the layout changes
    # no result, so the same command (the setting unset) resumes it, now channels_last
    train, val = _subset(digits, 128)

    def kill_after_two(record):
        if record.epoch == 2:
            raise Interrupted

    _, trainer_b = _trainer(digits, tmp_path, callbacks=[kill_after_two], channels_last=False,
                            early_stopping=False)
    with pytest.raises(Interrupted):
        trainer_b.fit(train, val)
    _, trainer_c = _trainer(digits, tmp_path, early_stopping=False)
    result = trainer_c.fit(train, val, resume=True)
    assert trainer_c.channels_last and [r.epoch for r in result.history] == [1, 2, 3]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA generator needs a GPU"))])
def test_a_dropout_model_resumes_to_the_uninterrupted_weights(digits, tmp_path, device):
    # Prepare: dropout on a GPU draws from the device's own generator, which the CPU state does not hold
    train, val = _subset(digits, 256)

    def trainer(run_dir, callbacks=()):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5),
                              nn.Linear(64, 10)).to(device)
        config = TrainConfig(objective="standard", epochs=3, batch_size=32, lr=0.05, early_stopping=False)
        return Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config, threat=THREAT,
                       run_dir=run_dir, callbacks=callbacks, show_progress=False)

    def kill_after_two(record):
        if record.epoch == 2:
            raise Interrupted

    # Execute
    trainer(tmp_path / "a").fit(train, val)
    with pytest.raises(Interrupted):
        trainer(tmp_path / "b", [kill_after_two]).fit(train, val)
    torch.manual_seed(999)  # a fresh process would start from other generator states (CUDA's too)
    trainer(tmp_path / "b").fit(train, val, resume=True)
    # Assert
    last_a, last_b = (load_file(str(run / "last.safetensors")) for run in (tmp_path / "a", tmp_path / "b"))
    for name, weights in last_a.items():
        assert torch.equal(weights, last_b[name]), f"{name} differs after resume"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_optimizer_steps_like_the_plain_one(digits, optimizer):
    # Prepare: the Trainer (fused kernels on CPU) and torch's per-tensor optimizer on copies of one model
    model, trainer = _trainer(digits, None, "standard", optimizer=optimizer, weight_decay=0.05)
    reference = copy.deepcopy(model)
    settings = {"lr": 0.05, "weight_decay": 0.05, "foreach": False}
    plain = (torch.optim.Adam(reference.parameters(), **settings) if optimizer == "adam"
             else torch.optim.SGD(reference.parameters(), momentum=0.9, **settings))
    x, y = digits.train.x[:32], digits.train.y[:32]
    # Execute: three steps each, so that momentum and Adam's moments take part
    for _ in range(3):
        trainer._train_step(x, y)
        plain.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        plain.step()
    # Assert
    assert trainer.optimizer.param_groups[0]["fused"] is True
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # summation order differs


def test_resume_with_other_settings_is_refused(digits, tmp_path):
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, epochs=1)
    trainer.fit(train, val)
    _, other = _trainer(digits, tmp_path, epochs=1, lr=0.01)
    with pytest.raises(CheckpointError, match=r"settings differ .*train\.lr was 0\.05, now 0\.01"):
        other.fit(train, val, resume=True)


@pytest.mark.parametrize("objective, given, expected", [
    ("free", None, 0.02), ("pgd", None, 0.05), ("trades", None, 0.05), ("free", 0.05, 0.05)])
def test_an_unset_learning_rate_is_the_objectives_default(digits, objective, given, expected):
    # Free AT takes free_replays optimiser steps per batch, so it defaults to a lower rate than the rest
    train, val = _subset(digits, 32)
    _, trainer = _trainer(digits, None, objective, lr=given, epochs=1, schedule="constant")
    assert trainer.config.learning_rate == expected
    assert trainer.optimizer.param_groups[0]["lr"] == expected
    assert trainer.fit(train, val).history[0].lr == expected  # what the schedule scales


@pytest.mark.parametrize("objective, refusal", [("pgd", None), ("free", r"train\.lr was 0\.05, now 0\.02")])
def test_a_run_recorded_with_the_rate_given_resumes_where_the_default_is_that_rate(
        digits, tmp_path, objective, refusal):
    # Prepare: epoch 1 of 2 recorded with lr 0.05 written out, as runs were before lr could be unset
    train, val = _subset(digits, 64)

    def kill_after_one(record):
        raise Interrupted

    _, first = _trainer(digits, tmp_path, objective, lr=0.05, epochs=2, callbacks=[kill_after_one])
    with pytest.raises(Interrupted):
        first.fit(train, val)
    # Execute: resumed with lr unset
    _, resumed = _trainer(digits, tmp_path, objective, lr=None, epochs=2)
    # Assert: pgd's default is the recorded 0.05; free's (0.02) is another rate, named in the refusal
    if refusal is None:
        assert len(resumed.fit(train, val, resume=True).history) == 2
    else:
        with pytest.raises(CheckpointError, match=refusal):
            resumed.fit(train, val, resume=True)


@pytest.mark.parametrize("change, fragment", [
    ("threat", "threat model (recorded {'norm': 'linf', 'eps': 0.2"),
    ("objective", "objective (recorded 'pgd', now 'trades')"),
])
def test_resume_under_another_threat_model_or_objective_is_refused(digits, tmp_path, change, fragment):
    # Prepare: a finished epoch under linf 0.2 with pgd
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, epochs=2)
    trainer.fit(train, val)
    # Execute: the same settings, but another eps, or another objective named in the config too
    torch.manual_seed(123)
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    threat = ThreatModel("linf", 0.1) if change == "threat" else THREAT
    name = "trades" if change == "objective" else "pgd"
    config = TrainConfig(objective=name, epochs=2, batch_size=32, attack_steps=3, val_attack_steps=3,
                         lr=0.05, eps_warmup_epochs=1, seed=5)
    other = Trainer(model, build_objective(name, ObjectiveOptions(threat, attack_steps=3, seed=5)), config,
                    threat=threat, run_dir=tmp_path, show_progress=False)
    # Assert: refused; the train settings alone (compared before) are equal but for the objective
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        other.fit(train, val, resume=True)


@pytest.mark.parametrize("mismatch, fragment", [
    ("name", "the objective is 'trades' but train.objective says 'pgd'"),
    ("norm", "the objective was built for l2 eps=0.5 box=[0, 1], the Trainer validates under linf"),
    ("box", "the objective was built for linf eps=0.2 box=[-1, 1]"),
])
def test_an_objective_built_for_another_method_or_threat_model_is_refused(digits, mismatch, fragment):
    # the Trainer hands the objective only its eps: its norm and box would stay the objective's while
    # validation ran under the Trainer's, and the config would record a method that did not run
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    built_for = {"name": THREAT, "norm": ThreatModel("l2", 0.5), "box": ThreatModel("linf", 0.2, (-1.0, 1.0))}
    name = "trades" if mismatch == "name" else "pgd"
    objective = build_objective(name, ObjectiveOptions(built_for[mismatch]))
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Trainer(model, objective, TrainConfig(objective="pgd", epochs=1), threat=THREAT, show_progress=False)


def _batchnorm_model(two_d: bool) -> nn.Module:
    torch.manual_seed(0)
    if two_d:  # 8x8 maps: 64 values per channel even for one example
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(256, 3))
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("two_d, n_train, refused", [
    (False, 65, True),  # a last batch of 1: one value per channel, which batch norm cannot train on
    (False, 66, False),
    (True, 65, False),  # one example still gives 64 values per channel
])
def test_a_last_batch_the_model_cannot_train_on_is_refused_before_training(tmp_path, two_d, n_train, refused):
    # it used to fail inside torch's batch norm at the last step of the first epoch (from every rank
    # under torchrun, where a share of one comes sooner)
    x = torch.rand(n_train, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (n_train,), generator=torch.Generator().manual_seed(1))
    model = _batchnorm_model(two_d)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)),
                      TrainConfig(objective="standard", epochs=1, batch_size=64), threat=THREAT,
                      run_dir=tmp_path / "run", show_progress=False)
    if not refused:
        trainer.fit(Split(x, y), Split(x[:8], y[:8]))
        return
    with pytest.raises(ConfigError, match="leaves a last batch of 1 of 65 training examples, fewer than 2"):
        trainer.fit(Split(x, y), Split(x[:8], y[:8]))
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the probe changed nothing


@pytest.mark.parametrize("n_train, refused", [(66, True), (67, True), (68, False)])
def test_under_two_processes_each_share_of_the_last_batch_needs_two_examples(n_train, refused):
    # dealt over 2 ranks, a last batch of 2 or 3 leaves a rank one example
    trainer = Trainer(_batchnorm_model(False), build_objective("standard", ObjectiveOptions(THREAT)),
                      TrainConfig(objective="standard", epochs=1, batch_size=64), threat=THREAT,
                      show_progress=False)
    trainer.distributed = type("TwoRanks", (), {"world_size": 2})()  # the arithmetic alone, no group
    probe = torch.rand(1, 1, 8, 8)
    if refused:
        message = f"a last batch of {n_train - 64} of {n_train} training examples over 2 processes, a share"
        with pytest.raises(ConfigError, match=message):
            trainer._check_smallest_share(n_train, probe)
    else:
        trainer._check_smallest_share(n_train, probe)


def test_extra_data_counts_towards_the_last_batch(tmp_path):
    # batch size 10, half of it extra (5 real + 5 extra): 6 real examples leave a last batch of 1 real
    # and 1 extra example, which batch norm trains on; the check counted the real one alone and refused
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32),
             y=np.arange(20) % 3)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    config = TrainConfig(objective="standard", epochs=1, batch_size=10, extra_data=str(extra),
                         extra_fraction=0.5, channels_last=False, early_stopping=False)
    trainer = Trainer(_batchnorm_model(False), build_objective("standard", ObjectiveOptions(THREAT)), config,
                      threat=THREAT, show_progress=False)
    assert trainer.batch_recipe.plan.extra_for(1) == 1
    trainer.fit(Split(x, y), Split(x[:4], y[:4]))


def test_a_model_without_parameters_is_refused():
    with pytest.raises(ConfigError, match="the model has no parameters to train"):
        Trainer(nn.Flatten(), build_objective("standard", ObjectiveOptions(THREAT)),
                TrainConfig(objective="standard", epochs=1), threat=THREAT, show_progress=False)


@pytest.mark.parametrize("edit, fragment", [
    (lambda x: x.flatten(1), "validation inputs have shape (64,) per example, the training inputs (1, 8, 8)"),
    (lambda x: x * 255, "outside the declared box [0, 1]"),
    (lambda x: torch.where(x > 0.5, torch.nan, x), "NaN"),
])
def test_validation_inputs_are_checked_before_training(digits, tmp_path, edit, fragment):
    # each used to train a whole epoch first: a traceback from inside torch at the first validation,
    # or (standard) validation accuracies of 0 from which the best epoch was chosen
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path / "run", "standard", epochs=1)
    with pytest.raises(DataError, match=re.escape(fragment)):
        trainer.fit(train, Split(edit(val.x), val.y))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective", ["standard", "pgd", "trades", "mart"])
def test_integer_labels_of_any_width_train_as_int64_labels_do(digits, objective):
    # int32 labels passed the label checks and then failed inside torch's cross-entropy
    train, val = _subset(digits, 64)
    weights = []
    for dtype in (torch.int64, torch.int32):
        model, trainer = _trainer(digits, None, objective, epochs=1)
        trainer.fit(Split(train.x, train.y.to(dtype)), Split(val.x, val.y.to(dtype)))
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


@pytest.mark.parametrize(("edit", "message"), [
    (lambda state: state.pop("sha256"), "records no hash of last.safetensors or state.safetensors"),
    (lambda state: state["sha256"].pop("state.safetensors"), "records no hash of state.safetensors"),
    (lambda state: state["progress"].update(surprise=1), "progress in state.json must hold exactly"),
    (lambda state: state.pop("progress"), "progress in state.json must hold exactly"),
    (lambda state: state["progress"]["history"][0].pop("lr"), "an epoch record in state.json lacks"),
    (lambda state: state["progress"]["history"][0].update(val_clean_accuracy="0.4"), "not a number"),
    (lambda state: state.pop("optimizer"), "optimizer state in state.json is missing or damaged"),
    (lambda state: state["optimizer"].update(param_groups=[]), "saved training state does not fit"),
    # each was a TypeError from inside torch, some only at the first step after resuming
    (lambda state: state["optimizer"].update(param_groups=[1]), "'optimizer' must hold 'param_groups'"),
    (lambda state: state["optimizer"]["param_groups"][0].update(momentum="a"), "'optimizer' must hold"),
    (lambda state: state["optimizer"]["param_groups"][0].update(params=["x"]), "'optimizer' must hold"),
    (lambda state: state["optimizer"]["param_groups"][0].update(params=[0, 0]), "'optimizer' must hold"),
    (lambda state: state["optimizer"].update(scalars={"0": {"step": "x"}}), "'optimizer' must hold"),
    (lambda state: state["progress"]["history"][0].update(epoch=7.5), "must hold epochs 1..1 in order"),
    # NaN loses every comparison: no later epoch would count as better, and a stale best would be kept
    (lambda state: state["progress"].update(best_metric=float("nan")), "finite number or -Infinity"),
])
def test_resume_refuses_a_state_json_it_cannot_trust(digits, tmp_path, edit, message):
    # without a recorded hash the weights loaded unchecked (another model's would do); an unknown or
    # missing progress key was a TypeError or KeyError
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, objective="standard", epochs=1)
    trainer.fit(train, val)
    state = json.loads((tmp_path / "state.json").read_text())
    edit(state)
    (tmp_path / "state.json").write_text(json.dumps(state))
    _, again = _trainer(digits, tmp_path, objective="standard", epochs=1)
    with pytest.raises(CheckpointError, match=message):
        again.fit(train, val, resume=True)


@pytest.mark.parametrize("objective", ["standard", "free", "pgd"])
@pytest.mark.parametrize("split, fragment", [
    ("train", "training labels range over [0, 10] but the model has 10 classes"),
    ("val", "validation labels range over [0, 10] but the model has 10 classes"),
    ("empty val", "the validation split is empty"),
])
def test_labels_past_the_models_classes_and_an_empty_validation_split_are_refused_before_training(
        digits, tmp_path, objective, split, fragment):
    # Prepare: clean objectives used to fail inside cross-entropy (IndexError) for a training label of
    # 10, and an empty validation split only after the last epoch, leaving a state.json it refused
    train, val = _subset(digits, 64)
    if split == "train":
        train = Split(train.x, torch.where(train.y == 3, 10, train.y))
    elif split == "val":
        val = Split(val.x, torch.where(val.y == 3, 10, val.y))
    else:
        val = Split(val.x[:0], val.y[:0])
    _, trainer = _trainer(digits, tmp_path / "run", objective, epochs=1)
    # Execute / Assert: refused before anything is written
    with pytest.raises(DataError, match=re.escape(fragment)):
        trainer.fit(train, val)
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_take_the_inputs_is_refused_before_training(digits, tmp_path):
    # a pooling window larger than the 8x8 digits: torch's own error, named with the input shape
    train, val = _subset(digits, 64)
    model = nn.Sequential(nn.MaxPool2d(16), nn.Flatten(), nn.Linear(1, digits.num_classes))
    config = TrainConfig(objective="standard", epochs=1, batch_size=32, seed=5)
    trainer = Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config, threat=THREAT,
                      run_dir=tmp_path / "run", show_progress=False)
    with pytest.raises(ConfigError, match=re.escape("the model cannot take inputs of shape (1, 8, 8)")):
        trainer.fit(train, val)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_generator_state_of_another_device(digits, tmp_path):
    # a run started on a GPU keeps CUDA generator states (16 bytes); a CPU generator takes 5056
    from fortify.training import checkpoint as ckpt

    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, objective="fgsm-rs", epochs=1)
    trainer.fit(train, val)
    tensors = load_tensors(tmp_path / "state.safetensors", "train-state")
    tensors["rng.objective"] = torch.zeros(16, dtype=torch.uint8)
    state = json.loads((tmp_path / "state.json").read_text())
    state["sha256"]["state.safetensors"] = ckpt.save_tensors(tmp_path / "state.safetensors", tensors,
                                                             kind="train-state")
    (tmp_path / "state.json").write_text(json.dumps(state))
    _, again = _trainer(digits, tmp_path, objective="fgsm-rs", epochs=1)
    with pytest.raises(CheckpointError, match="does not fit this run .*on the device it was started on"):
        again.fit(train, val, resume=True)


def test_early_stopping_stops_and_restores_the_best_epoch(digits, tmp_path):
    train, val = _subset(digits, 128)
    # lr so small that nothing improves after the first epoch's validation
    model, trainer = _trainer(digits, tmp_path, objective="standard", epochs=20, patience=2,
                              lr=1e-9, optimizer="adam")
    result = trainer.fit(train, val)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2
    selected = load_tensors(tmp_path / "model.safetensors", "weights")
    best_file = load_tensors(tmp_path / "best.safetensors", "weights")
    assert all(torch.equal(selected[k], best_file[k]) for k in selected)


def test_resuming_a_run_that_stopped_early_trains_no_further(digits, tmp_path):
    # the loop checked early stopping only after an epoch: a resumed run trained one more
    train, val = _subset(digits, 128)
    _, trainer = _trainer(digits, tmp_path, objective="standard", epochs=20, patience=2,
                          lr=1e-9, optimizer="adam")
    first = trainer.fit(train, val)
    selected = load_tensors(tmp_path / "model.safetensors", "weights")
    _, again = _trainer(digits, tmp_path, objective="standard", epochs=20, patience=2,
                        lr=1e-9, optimizer="adam")
    resumed = again.fit(train, val, resume=True)
    assert first.stopped_early and resumed.stopped_early
    assert len(resumed.history) == len(first.history)
    reloaded = load_tensors(tmp_path / "model.safetensors", "weights")
    assert all(torch.equal(selected[k], reloaded[k]) for k in selected)


class _WrongPocket(nn.Module):
    """Two classes over two features: class 1 within about 0.01 of the centre (0.5, 0.5), class 0
    everywhere else. A validation example at the centre labelled 0 is wrong clean, and every point a
    PGD step or its random start reaches in an L-inf ball of 0.2 lies outside the pocket, right."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        margin = self.scale * (300 * (x.flatten(1) - 0.5).pow(2).sum(1) - 0.03)
        return torch.stack([margin, -margin], 1)


def test_validation_counts_as_robust_only_the_examples_right_clean_and_under_attack():
    # Prepare: every validation example is wrong clean, yet PGD's iterates around it are all right;
    # training at a vanishing rate leaves the model as it is
    gen = torch.Generator().manual_seed(0)
    train = Split(torch.rand(8, 2, generator=gen), torch.zeros(8, dtype=torch.long))
    val = Split(torch.full((16, 2), 0.5), torch.zeros(16, dtype=torch.long))
    config = TrainConfig(objective="pgd", epochs=1, batch_size=8, lr=1e-9, early_stopping=False,
                         val_attack_steps=3)
    trainer = Trainer(_WrongPocket(), build_objective("pgd", ObjectiveOptions(THREAT, attack_steps=1)),
                      config, threat=THREAT, show_progress=False)
    # Execute
    record = trainer.fit(train, val).history[0]
    # Assert: robust accuracy counts an example robust only where it is right clean and under attack
    # (docs/METRICS.md), so it never exceeds clean accuracy; early stopping selects on it
    assert record.val_clean_accuracy == 0.0
    assert record.val_robust_accuracy == 0.0


def _script_validation(trainer, accuracies):
    """Validation gives ``accuracies[i]`` (clean) after epoch i + 1, so that selection is known ahead."""
    trainer._validate = lambda val: (accuracies[trainer.state.epoch], None)


def test_patience_running_out_on_the_last_epoch_is_not_stopping_early(digits, tmp_path):
    # Prepare: best at epoch 1, then two epochs without improvement: patience 2 runs out on epoch 3 of 3,
    # which skips no epoch (stopped_early was True, here and when the finished run was resumed)
    train, val = _subset(digits, 64)
    settings = {"objective": "standard", "epochs": 3, "patience": 2}
    _, trainer = _trainer(digits, tmp_path, **settings)
    _script_validation(trainer, [0.9, 0.8, 0.8])
    _, resumed = _trainer(digits, tmp_path, **settings)
    # Execute
    result = trainer.fit(train, val)
    after_resume = resumed.fit(train, val, resume=True)
    # Assert
    assert len(result.history) == 3 and result.best_epoch == 1
    assert not result.stopped_early
    assert len(after_resume.history) == 3 and not after_resume.stopped_early


def test_a_run_that_skips_epochs_stopped_early(digits, tmp_path):
    # Prepare: patience 2 runs out on epoch 3 of 4; epoch 4's better accuracy is never reached
    train, val = _subset(digits, 64)
    settings = {"objective": "standard", "epochs": 4, "patience": 2}
    _, trainer = _trainer(digits, tmp_path, **settings)
    _script_validation(trainer, [0.9, 0.8, 0.8, 0.95])
    _, resumed = _trainer(digits, tmp_path, **settings)
    # Execute
    result = trainer.fit(train, val)
    after_resume = resumed.fit(train, val, resume=True)
    # Assert
    assert len(result.history) == 3 and result.best_epoch == 1
    assert result.stopped_early
    assert len(after_resume.history) == 3 and after_resume.stopped_early


def test_patience_counts_from_the_end_of_the_eps_warm_up(digits, tmp_path):
    # Prepare: robust accuracy best after epoch 1 and lower through a warm-up of 3 epochs; patience 2
    # would run out on epoch 3, in the warm-up; epoch 5, at full eps, is the best
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, objective="fgsm", epochs=5, patience=2, eps_warmup_epochs=3)
    robust = [0.5, 0.4, 0.4, 0.4, 0.6]
    trainer._validate = lambda val: (0.9, robust[trainer.state.epoch])
    # Execute
    result = trainer.fit(train, val)
    # Assert: the warm-up epochs do not use up patience; epoch 4 does, and epoch 5 is reached
    assert len(result.history) == 5 and not result.stopped_early
    assert result.best_epoch == 5


def test_patience_runs_out_after_the_eps_warm_up(digits, tmp_path):
    # Prepare: the same warm-up; after it two epochs without improvement use up patience 2
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, objective="fgsm", epochs=6, patience=2, eps_warmup_epochs=2)
    robust = [0.5, 0.4, 0.4, 0.4, 0.9, 0.9]
    trainer._validate = lambda val: (0.9, robust[trainer.state.epoch])
    # Execute
    result = trainer.fit(train, val)
    # Assert: epochs 3 and 4 count, so the run stops there with epoch 1 selected
    assert len(result.history) == 4 and result.stopped_early
    assert result.best_epoch == 1


@pytest.mark.parametrize("early_stopping", [True, False])
def test_the_result_names_the_epoch_whose_weights_the_model_holds(digits, tmp_path, early_stopping):
    # Prepare: validation best after epoch 1, worse after; without early stopping the last epoch is kept
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path, objective="standard", epochs=3, patience=5,
                          early_stopping=early_stopping)
    _script_validation(trainer, [0.9, 0.8, 0.7])
    # Execute
    result = trainer.fit(train, val)
    # Assert: best_epoch is the best on validation either way; selected_epoch is the one saved as the model
    kept = load_tensors(tmp_path / "model.safetensors", "weights")
    source_file = "best.safetensors" if early_stopping else "last.safetensors"
    source = load_tensors(tmp_path / source_file, "weights")
    assert result.best_epoch == 1
    assert result.selected_epoch == (1 if early_stopping else 3)
    assert result.selection_metric == ("val_clean_accuracy" if early_stopping else "last epoch")
    assert all(torch.equal(kept[k], source[k]) for k in kept)


def test_pgd_training_beats_standard_training_under_attack(standard_model, robust_model, digits):
    from fortify.attacks import PGD

    x, y = digits.test.x, digits.test.y
    attack = PGD(THREAT, steps=10)

    def robust_accuracy(model):
        return float((model(attack(model, x, y)).argmax(1) == y).float().mean())

    assert robust_accuracy(robust_model) >= robust_accuracy(standard_model) + 0.3


def test_eps_warm_up_ramps_linearly(digits, tmp_path):
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, None, epochs=3, eps_warmup_epochs=2, batch_size=64)
    result = trainer.fit(train, val)
    # one batch per epoch: the last batch of epoch e (0-based) runs at progress e, eps = eps*e/2
    assert [round(r.eps / THREAT.eps, 3) for r in result.history] == [0.001, 0.5, 1.0]


def test_schedules():
    assert SCHEDULES.get("constant")(0.7) == 1.0
    assert [SCHEDULES.get("piecewise")(p) for p in (0.1, 0.6, 0.9)] == [1.0, 0.1, 0.01]
    assert math.isclose(SCHEDULES.get("cosine")(0.5), 0.5)
    cyclic = SCHEDULES.get("cyclic")
    assert cyclic(0.0) == 0.0 and math.isclose(cyclic(0.4), 1.0) and math.isclose(cyclic(1.0), 0.0)


def test_cyclic_schedule_moves_the_weights_from_the_first_step(digits):
    # Prepare: 3 epochs of 2 batches; record the learning rate of every optimiser step
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, None, "standard", schedule="cyclic", eps_warmup_epochs=0)
    rates = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: rates.append(trainer.optimizer.param_groups[0]["lr"]) \
        or original_step(*a, **k)
    # Execute
    trainer.fit(train, val)
    # Assert: read at the end of each step (Wong et al.'s (i + 1) / n): up to the peak at 40%, down to 0
    cyclic = SCHEDULES.get("cyclic")
    assert rates == pytest.approx([0.05 * cyclic((i + 1) / 6) for i in range(6)])
    assert rates[0] > 0 and rates[-1] == 0.0


class _ConstantLogits(torch.nn.Module):
    """Logits of zero whatever the input and weights: the loss is ln(classes) on every example."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)

    def forward(self, x):
        return 0 * self.linear(x.flatten(1))


def test_train_loss_is_the_mean_over_every_example_trained_on_extra_data_included(tmp_path):
    # Prepare: 12 real examples in batches of 6 real + 2 extra
    gen = torch.Generator().manual_seed(0)
    train = Split(torch.rand(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen))
    np.savez(tmp_path / "extra.npz", x=np.full((5, 4), 0.5, dtype=np.float32), y=np.zeros(5, dtype=np.int64))
    config = TrainConfig(objective="standard", epochs=1, batch_size=8, extra_data=tmp_path / "extra.npz",
                         extra_fraction=0.25, early_stopping=False)
    trainer = Trainer(_ConstantLogits(4, 3), build_objective("standard", ObjectiveOptions(THREAT)), config,
                      threat=THREAT, show_progress=False)
    # Execute
    result = trainer.fit(train, train)
    # Assert: the mean loss per example seen (16 of them), not a sum over 16 divided by 12
    assert result.history[0].train_loss == pytest.approx(math.log(3))


def test_fgsm_objective_mixes_clean_and_adversarial_losses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    threat = ThreatModel("linf", 0.1)
    mixed = build_objective("fgsm", ObjectiveOptions(threat, fgsm_ratio=0.25))(model, x, y)
    from fortify.attacks import FGSM

    x_adv = FGSM(threat)(model, x, y)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(mixed, 0.75 * ce(model(x), y) + 0.25 * ce(model(x_adv), y))


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        OBJECTIVES.get("madry")
    assert str(err.value).endswith("valid names: " + ", ".join(OBJECTIVES.names()))
    assert {"standard", "fgsm", "fgsm-rs", "pgd"} <= set(OBJECTIVES.names())


@pytest.mark.parametrize("objective", OBJECTIVES.names())
def test_training_steps_read_nothing_back_from_the_device(digits, objective):
    def host_reads(n_train):
        _, trainer = _trainer(digits, None, objective, epochs=1, batch_size=16, early_stopping=False)
        # validation's PGD leaves its loop once every example is fooled, a check per step that
        # depends on the model trained: the two runs' models differ, so it is left out here
        trainer._validate = lambda val: (0.5, 0.5)
        with _HostReads() as reads:
            trainer.fit(*_subset(digits, n_train))
        return reads.count

    # 2 steps or 6: the same reads (the data check and the epoch's loss), none per step
    assert host_reads(32) == host_reads(96)


def test_training_data_outside_the_box_is_refused_before_anything_is_written(digits, tmp_path):
    train, val = _subset(digits, 64)
    _, trainer = _trainer(digits, tmp_path / "run", "fgsm-rs")
    with pytest.raises(DataError, match="outside the declared box"):
        trainer.fit(Split(train.x * 1.5, train.y), val)
    with pytest.raises(DataError, match="class indices"):
        trainer.fit(Split(train.x, train.y - 1), val)
    assert not (tmp_path / "run").exists()
