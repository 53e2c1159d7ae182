"""``train.cuda_graph``: the whole training step recorded once as a CUDA graph and replayed.

The settings it refuses are checked everywhere; the recording itself needs a GPU (CI has none), where
graph-trained weights are compared with eagerly trained ones and a resumed run with an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fortify.config import DPConfig, TrainConfig
from fortify.data.base import host_to_device
from fortify.errors import ConfigError
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training import trainer as trainer_module
from fortify.training.dp import DPTrainer
from fortify.training.objectives import ObjectiveOptions, PGDObjective, build_objective
from fortify.training.step_graph import CAPTURABLE_OBJECTIVES, StepGraph, check_cuda_graph
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.2)
CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
OPTIONS = ObjectiveOptions(THREAT)
ALLOWED = {"objective": build_objective("pgd", OPTIONS), "optimizer": "sgd", "device": CUDA,
           "distributed": False, "ema": False, "compiled": False}


class StatefulPGD(PGDObjective):
    """Named "pgd" like the recorded class, but a subclass may keep state in Python between steps."""


class Interrupted(Exception):
    pass


def _mode_dependent_cnn() -> nn.Module:
    """Batch norm and dropout: the attack's eval-mode passes and the loss's training-mode ones differ
    (fgsm and TRADES take two clean passes), the running statistics move, dropout draws from torch's
    default CUDA generator."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _trainer(objective="fgsm-rs", device="cpu", run_dir=None, callbacks=(), model="small-cnn", **settings):
    torch.manual_seed(5)
    model = (build_model(model, (1, 8, 8), 10) if model == "small-cnn" else _mode_dependent_cnn()).to(device)
    settings = {"epochs": 2, "batch_size": 32, "seed": 3, "early_stopping": False, "attack_steps": 3,
                "schedule": "cyclic", "cuda_graph": True, **settings}
    config = TrainConfig(objective=objective, **settings)
    options = ObjectiveOptions(THREAT, attack_steps=3, seed=3, fgsm_ratio=0.5)
    return model, Trainer(model, build_objective(objective, options), config, threat=THREAT,
                          run_dir=run_dir, callbacks=callbacks, show_progress=False)


# -- refused settings (no GPU needed) ----------------------------------------------------------

def test_a_model_on_the_cpu_is_refused_before_training():
    with pytest.raises(ConfigError, match="needs a model on a CUDA device; this one is on cpu"):
        _trainer()


@pytest.mark.parametrize(("setting", "fragment"), [
    ({"distributed": True}, "data-parallel training"),
    ({"ema": True}, "train.ema_decay"),
    ({"compiled": True}, "train.compile"),
    ({"objective": build_objective("mart", OPTIONS)},
     "records the steps of standard, fgsm, fgsm-rs, pgd, trades; objective 'mart' "),
    ({"objective": build_objective("free", OPTIONS)}, "objective 'free' .* trains eagerly"),
    ({"objective": StatefulPGD(OPTIONS)}, r"objective 'pgd' \(StatefulPGD\) trains eagerly"),
    ({"optimizer": "rmsprop"}, "optimisers sgd, adam, not 'rmsprop'"),
])
def test_settings_whose_step_cannot_be_recorded_are_refused_by_name(setting, fragment):
    check_cuda_graph(**ALLOWED)  # the allowed settings pass
    with pytest.raises(ConfigError, match=fragment):
        check_cuda_graph(**{**ALLOWED, **setting})


def test_every_recordable_objective_is_a_registered_one():
    from fortify.training.objectives import OBJECTIVES

    assert set(CAPTURABLE_OBJECTIVES) <= set(OBJECTIVES.names())


def test_dp_training_refuses_it():
    model = build_model("small-cnn", (1, 8, 8), 10)
    config = TrainConfig(objective="standard", cuda_graph=True)
    with pytest.raises(ConfigError, match="train.cuda_graph cannot be combined with dp.enabled"):
        DPTrainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config,
                  dp=DPConfig(enabled=True, noise_multiplier=1.0), threat=THREAT, show_progress=False)


def test_host_to_device_keeps_the_values_and_leaves_cpu_tensors_alone():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert host_to_device(order, torch.device("cpu")) is order
    if torch.cuda.is_available():
        moved = host_to_device(order, CUDA)
        assert moved.is_cuda and torch.equal(moved.cpu(), order)


# -- on a GPU ----------------------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch):
    """The StepGraphs the Trainer builds, to check that steps were replayed. cuDNN's deterministic
    kernels: its default ones sum in a varying order, and two eager TRADES runs of 16 steps then end
    2.6e-4 apart; deterministic, a replayed run trains the eager run's weights to the last bit."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    built: list[StepGraph] = []

    class Recorded(StepGraph):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(trainer_module, "StepGraph", Recorded)
    return built


@needs_cuda
@pytest.mark.parametrize(("objective", "settings"), [
    ("standard", {}),
    ("fgsm", {}),
    ("fgsm-rs", {}),
    ("fgsm-rs", {"optimizer": "adam", "lr": 0.002, "grad_clip": 1.0}),
    ("fgsm-rs", {"eps_warmup_epochs": 1}),  # the first epoch ramps eps and runs eagerly
    ("fgsm-rs", {"amp": True, "channels_last": True}),  # the GPU recipe's settings
    ("pgd", {"augment": {"crop_padding": 1, "flip": True}}),
    ("trades", {}),
    ("standard", {"model": "mode-dependent"}),
    ("fgsm", {"model": "mode-dependent"}),
    ("trades", {"model": "mode-dependent"}),
    ("fgsm-rs", {"examples": 100}),  # 3 full batches and one of 4 an epoch: the 4th is not recorded
])
def test_replayed_steps_train_what_eager_steps_train(digits, recorded, objective, settings):
    # Prepare: 250 examples unless said, so each epoch ends on a smaller batch that runs eagerly
    settings = dict(settings)
    n = settings.pop("examples", 250)
    train, val = digits.train.head(n), digits.val.head(64)
    graphs, graph_trainer = _trainer(objective, "cuda", **settings)
    eager, eager_trainer = _trainer(objective, "cuda", **{**settings, "cuda_graph": False})
    # Execute
    graph_trainer.fit(train, val)
    eager_trainer.fit(train, val)
    # Assert: full batches were replayed, drew new random starts and followed the learning-rate schedule
    (graph,) = recorded
    full = n // 32  # full batches an epoch
    eager_full = full if "eps_warmup_epochs" in settings else 0  # those of the ramped epoch
    assert graph.replays == 2 * full - eager_full - StepGraph.WARMUP_STEPS
    for (name, a), b in zip(eager.state_dict().items(), graphs.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {(a - b).abs().max()} apart"
    assert graph_trainer._step_graph is None  # released with its memory when fit returned
    assert all(p.grad is None for p in graphs.parameters())  # nor do its gradients keep that memory


@needs_cuda
def test_a_replayed_run_resumes_to_the_uninterrupted_weights(digits, tmp_path, recorded):
    # Prepare: the objective's generator advances with every replay, and checkpoints hold its state
    train, val = digits.train.head(256), digits.val.head(64)

    def kill_after_one(record):
        if record.epoch == 1:
            raise Interrupted

    # Execute
    _trainer("fgsm-rs", "cuda", tmp_path / "a", epochs=2)[1].fit(train, val)
    with pytest.raises(Interrupted):
        _trainer("fgsm-rs", "cuda", tmp_path / "b", [kill_after_one], epochs=2)[1].fit(train, val)
    torch.manual_seed(999)
    _trainer("fgsm-rs", "cuda", tmp_path / "b", epochs=2)[1].fit(train, val, resume=True)
    # Assert
    last_a, last_b = (load_file(str(run / "last.safetensors")) for run in (tmp_path / "a", tmp_path / "b"))
    assert len(recorded) == 3 and all(graph.replays > 0 for graph in recorded)
    for name, weights in last_a.items():
        assert torch.equal(weights, last_b[name]), f"{name} differs after resume"


@needs_cuda
def test_a_step_that_waits_on_the_gpu_is_refused_with_the_first_error(digits):
    # last in this file, and after test_device_data.py: a recording that fails part-way left torch's
    # CUDA generators unusable for the graphs torch.compile recorded later in the process (on an H100,
    # with Inductor's cache empty: "Offset increment outside graph capture encountered unexpectedly")
    _, trainer = _trainer("fgsm-rs", "cuda")

    class Syncing(type(trainer.objective)):
        def __call__(self, model, x, y):
            loss = super().__call__(model, x, y)
            float(loss)  # a host synchronisation, which a recording cannot hold
            return loss

    trainer.objective.__class__ = Syncing
    with pytest.raises(ConfigError, match="not be recorded as a CUDA graph .*capturing.* fresh process"):
        trainer.fit(digits.train.head(256), digits.val.head(64))


# -- the bookkeeping around the graph, on CPU with torch.cuda's graph calls stood in for -------

class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: recording keeps the step as a closure over the tensors it
    was recorded with, the learning-rate tensor included, and a replay runs that closure, so that as
    with a real graph a replay reads the rate from that tensor and the batch from the recorded inputs."""

    recording: list[_FakeGraph] = []

    def __init__(self):
        self.generators, self.recorded = [], None

    def register_generator_state(self, generator):
        self.generators.append(generator)

    def replay(self):
        self.recorded()


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    @contextlib.contextmanager
    def graph(fake):
        _FakeGraph.recording.append(fake)
        try:
            yield
        finally:
            _FakeGraph.recording.pop()

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, value in {"CUDAGraph": _FakeGraph, "graph": graph, "Stream": lambda device=None: stream,
                        "current_stream": lambda device=None: stream, "synchronize": lambda device=None: None,
                        "stream": lambda s: contextlib.nullcontext(),
                        "device": lambda d: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)


def _linear_step(model, optimizer, rates_seen):
    def run(x, y, lr):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"], before = lr, group["lr"]
            rates_seen.append(lr)
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = before
        return loss.detach()

    def step(x, y):
        group = optimizer.param_groups[0]
        if _FakeGraph.recording:  # recorded, not run: a replay reads the rate tensor recorded here
            rate = group["lr"]
            assert isinstance(rate, torch.Tensor) and group["capturable"] is True
            _FakeGraph.recording[-1].recorded = lambda: run(x, y, float(rate))
            return torch.zeros(())
        return run(x, y, group["lr"])

    return step


def test_full_batches_warm_up_then_replay_at_each_steps_rate_and_others_run_eagerly(fake_cuda_graphs):
    # Prepare: the same 10 steps (batches of 4, every third one of 3) eagerly and through StepGraph
    torch.manual_seed(0)
    sizes = [4, 4, 3, 4, 4, 4, 3, 4, 4, 4]
    batches = [(torch.randn(n, 5), torch.randn(n, 2)) for n in sizes]
    rates = [(k + 1) / 128 for k in range(len(sizes))]  # changes every step; exact in float32

    def train(use_graph):
        torch.manual_seed(1)
        model = nn.Linear(5, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=rates[0])  # Adam: the capturable flag
        seen: list[float] = []
        step = _linear_step(model, optimizer, seen)
        graph = StepGraph(step, batch_size=4, optimizer=optimizer, generators=[torch.Generator()],
                          device=torch.device("cpu")) if use_graph else None
        for (x, y), lr in zip(batches, rates):
            optimizer.param_groups[0]["lr"] = lr  # the Trainer sets each step's rate as a number
            (graph or step)(x, y)
            group = optimizer.param_groups[0]
            assert isinstance(group["lr"], float) and group["capturable"] is False  # as they were
        return model, seen, graph

    # Execute
    eager, eager_rates, _ = train(False)
    replayed, replay_rates, graph = train(True)
    # Assert: three full batches warmed up, the fourth was recorded and replayed with the rest; the
    # batches of 3 ran eagerly and were not recorded; every step used its own rate
    assert graph.warmed == StepGraph.WARMUP_STEPS and graph.replays == sizes.count(4) - StepGraph.WARMUP_STEPS
    assert graph._x.shape[0] == 4 and len(graph.graph.generators) == 1
    assert replay_rates == eager_rates == rates
    for a, b in zip(eager.parameters(), replayed.parameters()):
        assert torch.equal(a, b)
