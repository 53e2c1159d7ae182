"""The whole training step recorded once as a CUDA graph and replayed (``train.cuda_graph``).

On a GPU a small model's step waits on the host launching kernels: PreAct ResNet-18's fgsm-rs step at
batch 128 makes about 530 launches and its kernels keep the GPU busy about a quarter of the time
(docs/PERFORMANCE.md). ``torch.compile(mode="reduce-overhead")`` removes the launches too, but its
compilation took longer than the rest of a 15-epoch run. A graph of the eager step, with the attack,
the backward pass and the optimiser step in it, needs no compilation: it is recorded once, on a full
batch of the run, and replayed with one launch per step.

What a replay repeats is fixed at recording: the kernels, the tensors' addresses and every Python
number the step read. So

- each batch is copied into the recorded input tensors, and a batch of another shape (an epoch's
  last, smaller one) runs eagerly;
- the learning rate, which changes every step, reaches the optimiser as a one-element tensor on the
  GPU that is refilled before each replay (torch's fused SGD and Adam read it from there);
- the objective's random starts come from its generator, registered with the graph, so that each
  replay draws new numbers and the generator's saved state moves on as eager steps move it;
- the steps before recording run eagerly on a side stream, as torch's documentation asks, so that
  lazy initialisation (the optimiser's state, library handles) happens outside the graph.

The Trainer decides which runs may use it (``check_cuda_graph``): one process, no DP, an objective
whose step has no host synchronisation and no state carried in Python between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fortify.errors import ConfigError
from fortify.training.objectives import FastFGSMObjective, FGSMObjective, Objective, PGDObjective
from fortify.training.trades import TradesObjective

# the objectives whose step was recorded and checked against eager training on a GPU
# (tests/training/test_step_graph.py): no host synchronisation, no state kept in Python across steps.
# By class, not by name: wrappers and other objectives share these names.
CAPTURABLE_CLASSES = (Objective, FGSMObjective, FastFGSMObjective, PGDObjective, TradesObjective)
CAPTURABLE_OBJECTIVES = tuple(cls.name for cls in CAPTURABLE_CLASSES)
CAPTURABLE_OPTIMIZERS = ("sgd", "adam")


def check_cuda_graph(*, objective: Objective, optimizer: str, device: torch.device, distributed: bool,
                     ema: bool, compiled: bool) -> None:
    """ConfigError unless the training step can be recorded as a CUDA graph (DP-SGD refuses it in
    ``check_dp_batch_settings``)."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph records the training step as a CUDA graph and needs a "
                          f"model on a CUDA device; this one is on {device.type}")
    refused = [reason for reason, applies in (
        ("data-parallel training (torchrun)", distributed),
        ("train.ema_decay (the average's decay changes from step to step)", ema),
        ("train.compile (choose one: compile: reduce-overhead replays graphs of its own)", compiled),
    ) if applies]
    if refused:
        raise ConfigError(f"train.cuda_graph does not go with {'; '.join(refused)}")
    if type(objective) not in CAPTURABLE_CLASSES:
        raise ConfigError(f"train.cuda_graph records the steps of {', '.join(CAPTURABLE_OBJECTIVES)}; "
                          f"objective {objective.name!r} ({type(objective).__name__}) trains eagerly "
                          "(set train.cuda_graph: false)")
    if optimizer not in CAPTURABLE_OPTIMIZERS:
        raise ConfigError(f"train.cuda_graph works with the optimisers {', '.join(CAPTURABLE_OPTIMIZERS)}, "
                          f"not {optimizer!r}")


class StepGraph:
    """``step(x, y) -> loss`` replayed from a CUDA graph for full batches of ``batch_size`` examples;
    smaller ones run eagerly (and are never the one recorded).

    ``step`` must update ``optimizer``, whose learning rates the caller sets as Python numbers before
    each call, as for eager steps. ``generators``: the CUDA generators ``step`` draws from besides
    torch's default one.
    """

    # eager steps on a side stream before recording (torch's documentation uses three)
    WARMUP_STEPS = 3

    def __init__(self, step: Callable[[Tensor, Tensor], Tensor], *, batch_size: int,
                 optimizer: torch.optim.Optimizer, generators: Sequence[torch.Generator],
                 device: torch.device) -> None:
        self.step = step
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.generators = list(generators)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed = 0
        self.replays = 0
        self._side = torch.cuda.Stream(device)
        self._lrs: list[Tensor] = []
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._loss: Tensor | None = None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[0] != self.batch_size:
            return self.step(x, y)
        # the graph's streams and memory belong to the model's GPU, which need not be the current one
        with torch.cuda.device(self.device):
            if self.graph is None and self.warmed < self.WARMUP_STEPS:
                self.warmed += 1
                return self._on_side_stream(x, y)
            if self.graph is None:
                self._record(x, y)
            if not self._fits(x, y):
                return self.step(x, y)
            self._refill_lrs()
            self._x.copy_(x)
            self._y.copy_(y)
            self.graph.replay()
            self.replays += 1
            return self._loss

    def _fits(self, x: Tensor, y: Tensor) -> bool:
        return (x.shape == self._x.shape and x.stride() == self._x.stride() and x.dtype == self._x.dtype
                and y.shape == self._y.shape and y.dtype == self._y.dtype)

    def _on_side_stream(self, x: Tensor, y: Tensor) -> Tensor:
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            loss = self.step(x, y)
        current.wait_stream(self._side)
        return loss

    def _record(self, x: Tensor, y: Tensor) -> None:
        """Record one step on copies of ``x`` and ``y``; recording runs nothing, the replay that
        follows runs the step."""
        self._x, self._y = x.clone(), y.clone()  # clone keeps x's strides (channels_last)
        self._lrs = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
                     for group in self.optimizer.param_groups]
        saved = [dict(group) for group in self.optimizer.param_groups]
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize(self.device)
        try:
            for group, lr in zip(self.optimizer.param_groups, self._lrs):
                group["lr"] = lr  # the recorded optimiser step reads the rate from the GPU
                if "capturable" in group:  # Adam refuses to be recorded without; fused, it reads
                    group["capturable"] = True  # nothing else from it
            with torch.cuda.graph(graph):
                self._loss = self.step(self._x, self._y)
        except RuntimeError as err:  # torch.AcceleratorError: a host sync, an unregistered generator
            raise ConfigError(f"train.cuda_graph: the training step could not be recorded as a CUDA "
                              f"graph ({_first_error(err)}); train without it, in a fresh process: torch's "
                              "CUDA generators may not record graphs again in this one") from err
        finally:
            for group, before in zip(self.optimizer.param_groups, saved):
                # eager steps and checkpoints see the settings as they were: the rate a Python number
                group.update({key: before[key] for key in ("lr", "capturable") if key in before})
        self.graph = graph

    def _refill_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            lr.fill_(group["lr"])


def _first_error(err: BaseException) -> str:
    """The first line of the error that started a chain: a failed recording ends in torch's "failed
    due to a previous error during capture", raised while the first one was handled."""
    while err.__context__ is not None:
        err = err.__context__
    return str(err).splitlines()[0] if str(err) else type(err).__name__
