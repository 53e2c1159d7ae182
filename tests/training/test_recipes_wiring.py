"""Augmentation, EMA, extra data and the speed switches, wired into the Trainer and the config."""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fortify.config import RunConfig, TrainConfig, load_config
from fortify.data import Dataset, Split
from fortify.errors import ConfigError, DataError
from fortify.models import build_model, layout
from fortify.pipeline import prepare
from fortify.threat import ThreatModel
from fortify.training.checkpoint import load_tensors
from fortify.training.extra_data import BatchPlan
from fortify.training.objectives import Objective, ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.2)
EXTRA_PIXEL = 0.3  # not a multiple of 1/16, so no digits image holds it: it marks extra examples
EXTRA_LABEL = 7


class Interrupted(Exception):
    pass


class RecordingObjective(Objective):
    """Clean training that keeps every batch it is given."""

    def __init__(self) -> None:
        super().__init__(ObjectiveOptions(THREAT))
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, model, x, y):
        self.batches.append((x.detach().clone(), y.clone()))
        return super().__call__(model, x, y)


def _small(digits: Dataset, n: int) -> tuple[Split, Split]:
    return Split(digits.train.x[:n], digits.train.y[:n]), Split(digits.val.x[:32], digits.val.y[:32])


def _extra_file(tmp_path: Path, n: int = 40, shape: tuple[int, ...] = (1, 8, 8), label: int = EXTRA_LABEL
                ) -> Path:
    path = tmp_path / "extra.npz"
    np.savez(path, x=np.full((n, *shape), EXTRA_PIXEL, dtype=np.float32),
             y=np.full(n, label, dtype=np.int64))
    return path


def _trainer(digits, run_dir, *, objective="fgsm-rs", model_name="small-cnn", callbacks=(), model=None,
             **settings):
    torch.manual_seed(11)
    if model is None:
        model = build_model(model_name, digits.input_shape, digits.num_classes)
    config = TrainConfig(**{"objective": objective, "epochs": 3, "batch_size": 32, "attack_steps": 1,
                            "val_attack_steps": 1, "seed": 3, "early_stopping": False, **settings})
    built = build_objective(objective, ObjectiveOptions(THREAT, attack_steps=1, seed=3))
    return model, Trainer(model, built, config, threat=THREAT, run_dir=run_dir, callbacks=callbacks,
                          show_progress=False)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# -- augmentation + EMA + extra data: resume ---------------------------------------------------

def test_resume_with_augmentation_ema_and_extra_data_equals_an_uninterrupted_run(digits, tmp_path):
    # Prepare: every random step of the batch recipe on, the second run killed after epoch 2
    train, val = _small(digits, 96)
    settings = {"augment": {"crop_padding": 1, "flip": True, "cutout_size": 2}, "ema_decay": 0.9,
                "extra_data": _extra_file(tmp_path), "extra_fraction": 0.25}

    def kill_after_two(record):
        if record.epoch == 2:
            raise Interrupted

    model_a, trainer_a = _trainer(digits, tmp_path / "a", **settings)
    _, trainer_b = _trainer(digits, tmp_path / "b", callbacks=[kill_after_two], **settings)
    # Execute
    result_a = trainer_a.fit(train, val)
    with pytest.raises(Interrupted):
        trainer_b.fit(train, val)
    model_c, trainer_c = _trainer(digits, tmp_path / "b", **settings)
    result_c = trainer_c.fit(train, val, resume=True)
    # Assert: the evaluated (EMA) weights, the EMA state and the raw weights all match bit for bit
    _assert_same_weights(model_a.state_dict(), model_c.state_dict())
    _assert_same_weights(trainer_a.ema.shadow, trainer_c.ema.shadow)
    for file in ("last.safetensors", "model.safetensors"):
        _assert_same_weights(load_tensors(tmp_path / "a" / file, "weights"),
                             load_tensors(tmp_path / "b" / file, "weights"))
    assert [r.train_loss for r in result_a.history] == [r.train_loss for r in result_c.history]
    assert [r.val_robust_accuracy for r in result_a.history] == [r.val_robust_accuracy
                                                                 for r in result_c.history]


# -- EMA: the evaluated and saved weights --------------------------------------------------------

def _accuracy(model, split: Split) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(split.x).argmax(1) == split.y).float().mean())


@pytest.mark.parametrize("early_stopping", [False, True])
def test_ema_decay_one_keeps_the_initial_weights_and_they_are_what_is_validated_and_saved(
        digits, tmp_path, early_stopping):
    # Prepare: decay 1 without the warm-up ramp never moves the average, so the EMA weights are the
    # initial ones exactly
    train, val = _small(digits, 64)
    model, trainer = _trainer(digits, tmp_path, objective="standard", epochs=2, ema_decay=1.0,
                              early_stopping=early_stopping)
    trainer.ema.warmup = False
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    result = trainer.fit(train, val)
    # Assert: validation saw the initial model, model.safetensors holds it, training did move on
    assert all(r.val_clean_accuracy == pytest.approx(_accuracy(model, val), abs=1e-6)
               for r in result.history)
    _assert_same_weights(initial, load_tensors(tmp_path / "model.safetensors", "weights"))
    _assert_same_weights(initial, model.state_dict())
    last = load_tensors(tmp_path / "last.safetensors", "weights")
    assert any(not torch.equal(initial[k], last[k]) for k in initial)


def _ramped(decay: float, updates_done: int) -> float:
    """The EMA's decay after ``updates_done`` updates: its warm-up ramp, capped at ``decay``."""
    return min(decay, (1 + updates_done) / (10 + updates_done))


def test_saved_model_is_the_ema_of_every_optimiser_step(digits, tmp_path):
    # Prepare: record the weights after each optimiser step to average them by hand
    train, val = _small(digits, 64)
    model, trainer = _trainer(digits, tmp_path, objective="standard", epochs=2, ema_decay=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    steps = [0]

    def average_by_hand(*_):
        decay = _ramped(0.5, steps[0])
        steps[0] += 1
        for name, value in model.state_dict().items():
            floating = value.is_floating_point()
            expected[name] = decay * expected[name] + (1 - decay) * value if floating else value.clone()

    trainer.optimizer.register_step_post_hook(average_by_hand)
    # Execute
    trainer.fit(train, val)
    # Assert: model.safetensors is that average, not the last iterate
    saved = load_tensors(tmp_path / "model.safetensors", "weights")
    last = load_tensors(tmp_path / "last.safetensors", "weights")
    for name in saved:
        assert torch.allclose(saved[name], expected[name], atol=1e-6, rtol=0), name
    assert any(not torch.allclose(saved[k], last[k], atol=1e-4)
               for k in saved if saved[k].is_floating_point())


def test_ema_under_dp_averages_the_noisy_steps_and_is_what_dp_training_saves(digits, tmp_path):
    # Prepare: DP-SGD on a small MLP; a second hook averages the weights by hand after each step
    pytest.importorskip("opacus")
    from fortify.config import DPConfig
    from fortify.training.dp import DPTrainer

    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="standard", epochs=1, batch_size=64, lr=0.5, momentum=0.0,
                         early_stopping=False, ema_decay=0.5)
    trainer = DPTrainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config,
                        dp=DPConfig(enabled=True, noise_multiplier=1.0), threat=THREAT, run_dir=tmp_path,
                        show_progress=False)
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps = [0]

    def average_by_hand(*_):
        decay = _ramped(0.5, steps[0])
        steps[0] += 1
        for name, value in trainer.model.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * value

    trainer.optimizer.register_step_post_hook(average_by_hand)
    # Execute
    trainer.fit(*_small(digits, 256))
    # Assert
    saved = load_tensors(tmp_path / "model.safetensors", "weights")
    for name in saved:
        assert torch.allclose(saved[name], expected[name], atol=1e-6, rtol=0), name


# -- extra data and augmentation: what each batch holds -------------------------------------------

def test_batches_hold_the_extra_fraction_and_every_real_example_once_flipped_or_not(digits, tmp_path):
    # Prepare: 100 real examples, batches of 20 with a quarter extra, flips on
    train, val = _small(digits, 100)
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="standard", epochs=1, batch_size=20, augment={"flip": True},
                         extra_data=_extra_file(tmp_path), extra_fraction=0.25, early_stopping=False)
    spy = RecordingObjective()
    # Execute
    Trainer(model, spy, config, threat=THREAT, show_progress=False).fit(train, val)
    # Assert: 15 real + 5 extra per full batch; the last batch of 10 real ones gets round(10/3) = 3
    is_extra = [(x == EXTRA_PIXEL).flatten(1).all(1) for x, _ in spy.batches]
    assert [int(e.sum()) for e in is_extra] == [5] * 6 + [3]
    assert [len(x) for x, _ in spy.batches] == [20] * 6 + [13]
    assert all((y[e] == EXTRA_LABEL).all() for (_, y), e in zip(spy.batches, is_extra))
    real = torch.cat([x[~e] for (x, _), e in zip(spy.batches, is_extra)])
    labels = torch.cat([y[~e] for (_, y), e in zip(spy.batches, is_extra)])
    flipped = _count_mirrored_checking_each_example_appears_once(real, labels, train)
    assert 0 < flipped < len(train)  # flips happened, not to every example


def _count_mirrored_checking_each_example_appears_once(seen: torch.Tensor, labels: torch.Tensor,
                                                       train: Split) -> int:
    counts = torch.zeros(len(train), dtype=torch.long)
    flipped = 0
    for x, y in zip(seen, labels):
        same = (train.x == x).flatten(1).all(1) & (train.y == y)
        mirror = (train.x.flip(-1) == x).flatten(1).all(1) & (train.y == y)
        hit = torch.nonzero(same | mirror).flatten()
        assert len(hit) >= 1, "a trained example is neither a training image nor its mirror"
        counts[hit[0]] += 1
        flipped += int(bool(mirror[hit[0]]) and not bool(same[hit[0]]))
    assert (counts == 1).all(), "every real example must appear exactly once per epoch"
    return flipped


@pytest.mark.parametrize(("batch_size", "fraction", "plan"), [(64, 0.3, (45, 19)), (10, 0.5, (5, 5)),
                                                              (32, 0.0, (32, 0))])
def test_batch_plan_rounds_the_extra_share(batch_size, fraction, plan):
    assert BatchPlan.for_batch(batch_size, fraction) == BatchPlan(*plan)


def test_a_fraction_that_leaves_no_real_example_is_refused():
    with pytest.raises(ConfigError, match="leaves no real example"):
        BatchPlan.for_batch(2, 0.8)


# -- extra data and recipe settings: clear errors before anything runs --------------------------

def _config(tmp_path: Path, **train) -> RunConfig:
    return load_config(None, {"train": {"epochs": 1, **train}})


@pytest.mark.parametrize(("make_file", "match"), [
    (lambda p: p / "missing.npz", "does not exist"),
    (lambda p: _extra_file(p, shape=(1, 7, 7)), r"shape \(1, 7, 7\).*\(1, 8, 8\)"),
    (lambda p: _extra_file(p, label=12), r"labels range over \[12, 12\]"),
    (lambda p: (p / "bad.npz").write_text("not an archive") and p / "bad.npz", "is not a .npz archive"),
])
def test_bad_extra_data_is_a_clear_data_error(tmp_path, make_file, match):
    path = make_file(tmp_path)
    with pytest.raises(DataError, match=match):
        prepare(_config(tmp_path, extra_data=str(path), extra_fraction=0.3), device="cpu")


def test_extra_data_is_read_in_the_layout_its_file_declares(tmp_path):
    from fortify.training.extra_data import load_extra_data

    # Prepare: 8-band 16x32 images stored channels last, a shape that cannot tell its layout itself
    x = np.random.default_rng(0).random((6, 16, 32, 8)).astype(np.float32)
    path = tmp_path / "extra.npz"
    np.savez(path, x=x, y=np.zeros(6, dtype=np.int64), layout=np.array("NHWC"))
    # Execute
    extra = load_extra_data(path, input_shape=(8, 16, 32), bounds=(0.0, 1.0), num_classes=2)
    # Assert: the file's layout was read (it was ignored, and the file refused as ambiguous)
    assert torch.equal(extra.x, torch.from_numpy(x).permute(0, 3, 1, 2))


def test_extra_data_outside_the_box_is_refused(tmp_path):
    path = tmp_path / "bright.npz"
    np.savez(path, x=np.full((4, 1, 8, 8), 2.0, dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="'x'"):
        prepare(_config(tmp_path, extra_data=str(path), extra_fraction=0.3), device="cpu")


@pytest.mark.parametrize("train", [{"extra_fraction": 0.3}, {"extra_data": "x.npz"}])
def test_extra_data_and_fraction_go_together(tmp_path, train):
    with pytest.raises(ConfigError, match="extra_data and extra_fraction go together"):
        _config(tmp_path, **train)


@pytest.mark.parametrize(("train", "message"), [
    # accepted before: the run ended short of the threat's eps and early stopping never counted
    ({"objective": "pgd", "epochs": 3, "eps_warmup_epochs": 3}, r"eps_warmup_epochs \(3\) must be below"),
    ({"objective": "pgd", "epochs": 3, "eps_warmup_epochs": 10}, r"eps_warmup_epochs \(10\) must be"),
    # accepted before: an awp-pgd run identical to pgd, recorded as awp-pgd
    ({"objective": "awp-pgd", "epochs": 3, "awp_warmup_epochs": 3}, r"awp-pgd would never perturb"),
])
def test_a_warm_up_as_long_as_the_run_is_refused(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"train": train})
    # one epoch less of warm-up than the run has is a run that ends at the threat's eps
    shorter = {**train, **{key: 2 for key in train if key.endswith("warmup_epochs")}}
    assert load_config(None, {"train": shorter}).train.epochs == 3


def test_recipe_switches_dp_cannot_honour_are_refused_by_name(tmp_path):
    config = load_config(None, {"train": {"augment": {"flip": True}, "channels_last": True},
                                "dp": {"enabled": True, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"train\.augment, train\.channels_last cannot be combined"):
        prepare(config, device="cpu")


def test_augmentation_of_tabular_data_is_refused(tmp_path):
    config = load_config(None, {"data": {"name": "breast-cancer"}, "train": {"augment": {"crop_padding": 2}}})
    with pytest.raises(ConfigError, match="needs image data"):
        prepare(config, device="cpu")


@pytest.mark.parametrize("setting", ["crop_padding", "cutout_size"])
def test_augmentation_larger_than_the_image_is_refused_by_name(setting):
    # digits are 8x8: a padding of 100000 pixels tried to allocate terabytes
    config = load_config(None, {"train": {"augment": {setting: 9}}})
    with pytest.raises(ConfigError, match=rf"train\.augment\.{setting}=9 exceeds the images' shorter side "
                                          r"\(8 pixels"):
        prepare(config, device="cpu")


def test_a_fraction_that_leaves_a_split_empty_is_refused_by_name():
    for data, fragment in (({"val_fraction": 0.0002}, r"val_fraction=0\.0002 of 1797 examples leaves no"),
                           ({"test_fraction": 0}, r"test_fraction=0\.0 of 1797 examples leaves no test"),
                           ({"val_fraction": 0.6, "test_fraction": 0.3999}, "leave no training example")):
        with pytest.raises(ConfigError, match=fragment):
            prepare(load_config(None, {"data": data}), device="cpu")


# -- speed switches -------------------------------------------------------------------------------

CHANNELS_LAST_TOLERANCE = 1e-4  # docs/RECIPES.md: other conv kernels, other rounding


def _conv_layouts(model: nn.Module, seen: list[bool]):
    """An epoch callback recording whether every 4-D weight of ``model`` is channels_last."""
    def record(_record) -> None:
        # strides compared: a weight with one input channel passes is_contiguous in both layouts
        convs = [p for p in model.parameters() if p.dim() == 4]
        seen.append(bool(convs) and all(
            p.stride() == torch.empty_like(p, memory_format=torch.channels_last).stride() for p in convs))
    return record


def test_channels_last_gives_the_same_weights_within_tolerance(digits, tmp_path):
    train, val = _small(digits, 64)
    model_a, trainer_a = _trainer(digits, None, epochs=1, channels_last=False)
    layouts: list[bool] = []
    torch.manual_seed(11)
    model_b = build_model("small-cnn", digits.input_shape, digits.num_classes)
    model_b, trainer_b = _trainer(digits, None, epochs=1, channels_last=True,
                                  callbacks=[_conv_layouts(model_b, layouts)], model=model_b)
    result_a, result_b = trainer_a.fit(train, val), trainer_b.fit(train, val)
    assert layouts == [True]  # trained channels_last ...
    assert all(p.is_contiguous() for p in model_b.parameters())  # ... handed back in the default layout
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.allclose(a, b, atol=CHANNELS_LAST_TOLERANCE, rtol=0), name
    assert result_a.history[0].train_loss == pytest.approx(result_b.history[0].train_loss, abs=1e-4)


class _ViewHead(nn.Module):
    """A conv net that flattens with Tensor.view, which fails on channels_last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


class _BatchMergingView(_ViewHead):
    """A view that merges the batch axis with the channels (a per-map spatial softmax): it runs on
    one channels_last example, whose batch axis of size 1 the stride check ignores, not on two."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        n, c, height, width = h.shape
        maps = torch.softmax(h.view(n * c, height * width), dim=1)
        return self.fc(maps.reshape(n, -1))


class _TrainingModeView(_ViewHead):
    """A view on the path that training mode alone takes, past an evaluation-mode probe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1) if self.training else h.reshape(h.shape[0], -1))


_MODELS = {"view": _ViewHead, "batch-merging view": _BatchMergingView,
           "training-mode view": _TrainingModeView}


@pytest.mark.parametrize(("model_name", "expected"), [("small-cnn", True), ("mlp", False), ("view", False),
                                                      ("batch-merging view", False),
                                                      ("training-mode view", False)])
def test_unset_channels_last_trains_so_on_cpu_where_the_model_runs_so(digits, model_name, expected):
    # unset: channels_last for a model with 4-D weights that runs that way; an MLP has none, and a
    # model that reshapes with view trains in the default layout instead of failing
    train, val = _small(digits, 64)
    torch.manual_seed(11)
    model = (_MODELS[model_name]() if model_name in _MODELS
             else build_model(model_name, digits.input_shape, digits.num_classes))
    layouts: list[bool] = []
    model, trainer = _trainer(digits, None, objective="standard", epochs=1, model=model,
                              callbacks=[_conv_layouts(model, layouts)])
    assert trainer.config.channels_last is None
    result = trainer.fit(train, val)
    assert layouts == [expected] and trainer.channels_last is expected
    assert all(p.is_contiguous() for p in model.parameters())
    assert math.isfinite(result.history[0].train_loss)


def test_channels_last_asked_for_a_model_that_cannot_is_refused_before_training(digits, tmp_path):
    train, val = _small(digits, 64)
    torch.manual_seed(11)
    model, trainer = _trainer(digits, tmp_path / "run", objective="standard", epochs=1, model=_ViewHead(),
                              channels_last=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"does not run with channels_last.*train\.channels_last: false"):
        trainer.fit(train, val)
    _assert_same_weights(before, model.state_dict())
    assert not list((tmp_path / "run").glob("*.safetensors"))


def test_unset_channels_last_stays_off_under_torchrun():
    # DDP records the weights' strides when it wraps them; only an explicit setting changes them there
    model = build_model("small-cnn", (1, 8, 8), 10)
    config = TrainConfig(objective="standard")
    assert Trainer._wants_channels_last(Trainer, config, model, None)
    assert not Trainer._wants_channels_last(Trainer, config, model, object())  # type: ignore[arg-type]
    assert Trainer._wants_channels_last(Trainer, config.model_copy(update={"channels_last": True}), model,
                                        object())  # type: ignore[arg-type]


def test_channels_last_training_hands_the_flatten_gradient_back_channels_last(digits, monkeypatch):
    # the gradient that reaches the max-pool before nn.Flatten, as the layout's hook returns it
    returned: list[bool] = []
    convert = layout._to_channels_last_gradient

    def watched(grad: torch.Tensor) -> torch.Tensor:
        out = convert(grad)
        returned.append(out.is_contiguous(memory_format=torch.channels_last))
        return out

    monkeypatch.setattr(layout, "_to_channels_last_gradient", watched)
    train, val = _small(digits, 64)
    for channels in (False, True):
        model, trainer = _trainer(digits, None, objective="standard", epochs=1, channels_last=channels)
        trainer.fit(train, val)
        flatten = next(m for m in model.modules() if isinstance(m, nn.Flatten))
        assert not flatten._forward_pre_hooks  # the hook lives for the duration of fit only
        steps = 0 if not channels else 64 // 32
        assert len(returned) == steps and all(returned)  # one conversion per training step


def test_channels_last_training_leaves_a_conv3d_weight_as_it_is():
    # Module.to(memory_format=channels_last) raises on the 5-D weight; only 4-D tensors convert
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4 * 4, 3))
    config = TrainConfig(objective="standard", epochs=1, batch_size=8, seed=0, early_stopping=False,
                         channels_last=True)
    data = Split(torch.rand(16, 1, 4, 4, 4), torch.arange(16) % 3)
    trainer = Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config, threat=THREAT,
                      show_progress=False)
    result = trainer.fit(data, data)
    assert model[0].weight.is_contiguous() and math.isfinite(result.history[0].train_loss)


def _assert_compiled_training_matches_eager_training(digits, objective: str) -> None:
    train, val = _small(digits, 64)
    model_a, trainer_a = _trainer(digits, None, objective=objective, model_name="mlp", epochs=1)
    model_b, trainer_b = _trainer(digits, None, objective=objective, model_name="mlp", epochs=1, compile=True)
    trainer_a.fit(train, val)
    trainer_b.fit(train, val)
    assert trainer_b.train_model is not model_b  # the training passes went through the compiled module
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name


@pytest.mark.parametrize("objective", ["fgsm-rs", "awp-pgd"])
def test_compiled_training_matches_eager_training_on_a_tiny_mlp(digits, monkeypatch, objective):
    # Inductor needs a C++ build per graph; aot_eager runs the same Dynamo capture and AOTAutograd
    # graphs without code generation. AWP perturbs a copy of the compiled module and adds the
    # difference to the weights by parameter name
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _assert_compiled_training_matches_eager_training(digits, objective)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor builds C++ kernels on the CPU")
def test_awp_training_compiled_by_inductor_matches_eager_training(digits):
    # the default backend, with its generated kernels: about 15 s on 2 cores without a warm cache
    _assert_compiled_training_matches_eager_training(digits, "awp-pgd")


@pytest.mark.parametrize(("setting", "mode"), [(True, "default"), ("reduce-overhead", "reduce-overhead"),
                                               ("max-autotune", "max-autotune")])
def test_train_compile_passes_its_mode_to_torch_compile(digits, monkeypatch, setting, mode):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, *, mode: modes.append(mode) or module)
    _trainer(digits, None, model_name="mlp", epochs=1, compile=setting)
    assert modes == [mode]


def test_an_unknown_compile_mode_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="reduce-overhead"):
        TrainConfig(compile="fastest")


def _record_conv_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_amp_trains_under_bf16_on_cpu_and_validates_in_fp32(digits):
    train, val = _small(digits, 64)
    model, trainer = _trainer(digits, None, amp=True)
    seen = _record_conv_dtypes(model)
    # one fgsm-rs step: the attack's pass and the training pass both run under autocast
    loss = trainer._train_step(train.x[:32], train.y[:32])
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    seen.clear()
    trainer._validate(val)
    assert seen and set(seen) == {torch.float32}  # validation keeps fp32 numbers


def test_amp_training_reaches_the_fp32_accuracy(digits):
    results = {}
    for amp in (False, True):
        _, trainer = _trainer(digits, None, objective="standard", epochs=6, batch_size=64, amp=amp)
        results[amp] = trainer.fit(digits.train, digits.val).history[-1].val_clean_accuracy
    assert results[False] > 0.85  # the setting learns at all
    assert abs(results[True] - results[False]) <= 0.03, results


def test_amp_on_a_device_without_autocast_is_refused(digits, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ConfigError, match="train.amp needs autocast, which device cpu lacks"):
        _trainer(digits, None, amp=True)
