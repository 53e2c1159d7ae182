"""The training loop: optimiser, schedule, eps warm-up, early stopping, checkpoints and resume.

The objective decides what loss a batch gives; the Trainer owns everything around it. After every
epoch it checkpoints the weights, optimiser, RNG states and history, so a killed run resumed with
``resume=True`` reaches the same weights as one that was never interrupted. An epoch's files
(best/last/state.safetensors) and its state.json commit together (checkpoint.py): a kill at any point
of the writing resumes from that epoch or from the one before.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from fortify.attacks import PGD
from fortify.attacks.base import check_label_dtype, check_label_range
from fortify.config import TrainConfig, comparable_train_settings, listed, setting_differences
from fortify.data.base import Split
from fortify.errors import CheckpointError, ConfigError, DataError
from fortify.evaluation.precision import warn_if_slow_on_cpu
from fortify.models.layout import (
    flatten_gradient_hooks,
    has_4d_tensors,
    runs_channels_last,
    to_channels_last,
    to_contiguous,
)
from fortify.models.modes import probing
from fortify.models.onednn_linear import onednn_linear, onednn_linear_pays
from fortify.models.predictions import predicted_class
from fortify.threat import ThreatModel
from fortify.training import checkpoint as ckpt
from fortify.training.batches import BatchRecipe, count_outputs
from fortify.training.distributed import DistributedContext, LocalBatch, batch_seed
from fortify.training.ema import ModelEMA
from fortify.training.objectives import Objective
from fortify.training.schedules import SCHEDULES, schedule_progress
from fortify.training.step_graph import StepGraph, check_cuda_graph


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    eps: float
    train_loss: float
    val_clean_accuracy: float
    val_robust_accuracy: float | None
    seconds: float
    epsilon: float | None = None  # privacy spent so far, in DP training (fortify.training.dp)


@dataclass
class TrainResult:
    history: list[EpochRecord]
    best_epoch: int
    selection_metric: str  # what chose the kept weights: the validation metric, or "last epoch"
    stopped_early: bool
    seconds: float
    examples_seen: int
    # the epoch whose weights the model holds: the best one under early stopping, else the last (its
    # EMA average where train.ema is on); best_epoch stays the best on validation either way
    selected_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Progress:
    """What a checkpoint must restore besides weights, optimiser and RNG."""

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    since_best: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0


EpochCallback = Callable[[EpochRecord], None]


def _progress_from(saved: Any, run_dir: Path) -> _Progress:
    """The ``progress`` of state.json (its values checked by ``read_state_json``) as a ``_Progress``;
    CheckpointError when a key is missing or unknown, here or in an epoch record."""
    expected = {f.name for f in fields(_Progress)}
    if not isinstance(saved, dict) or set(saved) != expected:
        raise CheckpointError(f"cannot resume {run_dir}: the progress in {ckpt.STATE_JSON} must hold exactly "
                              f"{sorted(expected)}")
    records = {f.name for f in fields(EpochRecord)}
    required = {f.name for f in fields(EpochRecord) if f.default is MISSING}
    if not all(isinstance(r, dict) and required <= set(r) <= records for r in saved["history"]):
        raise CheckpointError(f"cannot resume {run_dir}: an epoch record in {ckpt.STATE_JSON} lacks a field "
                              "or holds an unknown one")
    nullable = (records - required) | {"val_robust_accuracy"}
    if not all(ckpt.is_finite_number(value) or (value is None and key in nullable)
               for r in saved["history"] for key, value in r.items()):
        raise CheckpointError(f"cannot resume {run_dir}: an epoch record in {ckpt.STATE_JSON} holds a value "
                              "that is not a number")
    return _Progress(**{**saved, "history": [EpochRecord(**r) for r in saved["history"]]})


# devices with fused SGD and Adam kernels in torch
_FUSED_DEVICES = ("cpu", "cuda")
# validation examples per attack batch; a validation split no larger is one batch, attacked from the
# validation attack's own seed (batch_seed keeps it for batch 0)
VALIDATION_BATCH = 256


def check_training_data(train: Split, threat: ThreatModel) -> None:
    """The checks an attack makes of each batch it is given (finite inputs in the box, integer labels
    from 0), made once for the whole training set: the objectives' attacks then skip them, which on a
    GPU saves a host sync per step. Augmentations and extra data stay in the box by construction."""
    threat.check_inputs(train.x)
    check_label_dtype(train.y)
    if len(train.y) and int(train.y.min()) < 0:
        raise DataError(f"training labels must be class indices 0..K-1, got {int(train.y.min())}")


def check_objective_fits(objective: Objective, config: TrainConfig, threat: ThreatModel) -> None:
    """ConfigError unless ``objective`` is the one ``config`` names, built for ``threat``'s norm and
    box: the Trainer hands the objective its eps (``set_eps``) but validates under its own threat
    model, and records ``config``'s objective name, so a mismatch would train one thing and report
    another."""
    if objective.name != config.objective:
        raise ConfigError(f"the objective is {objective.name!r} but train.objective says "
                          f"{config.objective!r}")
    options = getattr(objective, "options", None)
    built_for = getattr(options, "threat", None)
    if built_for is not None and (built_for.norm, built_for.bounds) != (threat.norm, threat.bounds):
        raise ConfigError(f"the objective was built for {built_for.describe()}, the Trainer validates under "
                          f"{threat.describe()}: build both from the same threat model")


def check_validation_inputs(val: Split, train: Split, threat: ThreatModel) -> None:
    """The validation inputs, checked as the training inputs are (finite, in the box) and against
    their shape per example, before the first epoch: else the first validation, an epoch in, would
    fail inside torch, or score inputs outside the box as if they were data."""
    if val.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"validation inputs have shape {tuple(val.x.shape[1:])} per example, the training "
                        f"inputs {tuple(train.x.shape[1:])}")
    threat.check_inputs(val.x)


def with_int64_labels(split: Split) -> Split:
    """``split`` with its integer labels as int64, the only integer type torch's cross-entropy takes."""
    return split if split.y.dtype == torch.long else Split(split.x, split.y.long())


def check_labels_fit_model(model: nn.Module, train: Split, val: Split) -> None:
    """DataError for an empty validation split or a label past the model's classes, before the first
    epoch: the first would fail at the end of training (no epoch scores, so none is best), the second
    inside torch's cross-entropy (and on a GPU as a device-side assert). One forward pass of one example."""
    if len(val) == 0:
        raise DataError("the validation split is empty: the Trainer validates after every epoch and "
                        "keeps the best; give it at least one example")
    classes = count_outputs(model, train.x[:1])
    check_label_range(train.y, classes, what="training labels")
    check_label_dtype(val.y, what="validation labels")
    check_label_range(val.y, classes, what="validation labels")


# the most of a GPU's free memory a training split may take to be kept there (Trainer._keep_on_gpu):
# the rest is for the model, its activations and the attack's
RESIDENT_SHARE = 0.25


def state_in_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Restride each tensor of ``optimizer``'s state (momentum, Adam's moments) to its parameter's
    layout, in place of the one it was loaded in.

    A checkpoint stores the state contiguous (NCHW), while channels_last training holds its conv
    weights channels_last. torch's fused and foreach optimiser kernels walk a parameter and its state
    as flat memory without comparing strides, so a mismatch would silently pair each weight with
    another weight's momentum after a resume.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if (isinstance(value, Tensor) and value.shape == parameter.shape
                        and value.stride() != parameter.stride()):
                    # empty_like keeps the parameter's strides (dense, non-overlapping tensors)
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def splits_on_device(splits: Sequence[Split], device: torch.device, *, free_bytes: int) -> list[Split]:
    """``splits`` moved to ``device`` when together they take at most RESIDENT_SHARE of ``free_bytes``,
    else as they are: all or none, since a batch joins examples of both (extra data)."""
    size = sum(split.x.nbytes + split.y.nbytes for split in splits)
    if size > RESIDENT_SHARE * free_bytes:
        return list(splits)
    return [Split(split.x.to(device), split.y.to(device)) for split in splits]


class Trainer:
    """Trains ``model`` with ``objective`` under ``config``; checkpoints into ``run_dir``."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainConfig,
        *,
        threat: ThreatModel,
        run_dir: Path | None = None,
        callbacks: Sequence[EpochCallback] = (),
        show_progress: bool = True,
        distributed: DistributedContext | None = None,
        extra_data: Split | None = None,
    ) -> None:
        if next(model.parameters(), None) is None:
            raise ConfigError("the model has no parameters to train")
        check_objective_fits(objective, config, threat)
        self.model = model
        self.channels_last = self._wants_channels_last(config, model, distributed)
        if self.channels_last and distributed is not None:  # before DDP records the weights' strides;
            to_channels_last(model)  # else fit converts them (batches.py the inputs)
        self.distributed = distributed  # data-parallel under torchrun (fortify.training.distributed)
        # passes whose loss the optimiser follows go through DDP; attacks and validation use the model
        self.train_model = distributed.wrap(model) if distributed is not None else model
        if config.compile:
            mode = "default" if config.compile is True else config.compile
            self.train_model = torch.compile(self.train_model, mode=mode)
        self.objective = objective
        self.config = config
        self.threat = threat
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        self.onednn_linear = self.ONEDNN_LINEAR and not config.compile and onednn_linear_pays(self.device)
        if config.amp and not torch.amp.is_autocast_available(self.device.type):
            raise ConfigError(f"train.amp needs autocast, which device {self.device} lacks; "
                              "train without amp")
        if config.amp:
            warn_if_slow_on_cpu("bf16", self.device, "train.amp")
        if config.cuda_graph:
            check_cuda_graph(objective=objective, optimizer=config.optimizer, device=self.device,
                             distributed=distributed is not None, ema=config.ema_decay is not None,
                             compiled=bool(config.compile))
        self._step_graph: StepGraph | None = None  # while fit runs, under train.cuda_graph
        self.optimizer = self._build_optimizer()
        self.schedule = SCHEDULES.get(config.schedule)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.state = _Progress()
        self._staged: list[str] = []  # tensor files written under their pending names, to commit
        self.batch_recipe = BatchRecipe(config, fill=threat.bounds[0], extra=extra_data)
        self.ema = None if config.ema_decay is None else ModelEMA(model, config.ema_decay)
        if self.ema is not None:
            ema = self.ema
            # a hook on the optimiser itself also fires when a wrapper (Opacus' DP optimiser) steps it
            self.optimizer.register_step_post_hook(lambda *_: ema.update())

    # -- public --------------------------------------------------------------------------------

    def fit(self, train: Split, val: Split, *, resume: bool = False) -> TrainResult:
        check_training_data(train, self.threat)
        check_labels_fit_model(self.model, train, val)
        check_validation_inputs(val, train, self.threat)
        train, val = with_int64_labels(train), with_int64_labels(val)
        # two examples: a view that merges the batch axis with another passes on one alone
        self._settle_layout(train.x[:2])
        self._check_smallest_share(len(train), train.x[:1])
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore()
        else:
            self._seed_generators()
        self.batch_recipe.bind(train, self.model, self.threat.bounds)
        train = self._keep_on_gpu(train)
        steps_per_epoch = self.batch_recipe.steps_per_epoch(len(train))
        with self._training_layout(), self._recorded_steps(), self._progress() as bar:
            epochs_task = bar.add_task("epochs", total=self.config.epochs,
                                       completed=self.state.epoch)
            # checked before each epoch: a resumed run that had already stopped early trains no further
            while self.state.epoch < self.config.epochs and not self._should_stop():
                record = self._run_epoch(train, val, steps_per_epoch, bar)
                self._select(record)
                self.state.epoch += 1
                self._save_checkpoint()
                bar.update(epochs_task, advance=1)
                for callback in self.callbacks:
                    callback(record)
        # early stopping only when it skipped epochs: patience running out on the last epoch skips none
        stopped_early = self.state.epoch < self.config.epochs
        self._finish()
        selected = self.state.best_epoch if self.config.early_stopping else self.state.epoch
        selected_by = self.selection_metric if self.config.early_stopping else "last epoch"
        return TrainResult(self.state.history, self.state.best_epoch, selected_by,
                           stopped_early, self.state.seconds,
                           examples_seen=self.state.epoch * len(train), selected_epoch=selected)

    def record_file(self, name: str, path: Path) -> None:
        """Keep ``path``'s SHA-256 in state.json beside the checkpoints' (the model card, say), so that
        loading can tell when it was edited."""
        self._hashes[name] = ckpt.sha256(path)

    @property
    def selection_metric(self) -> str:
        return "val_robust_accuracy" if self.objective.adversarial else "val_clean_accuracy"

    def _check_smallest_share(self, n_train: int, probe: Tensor) -> None:
        """ConfigError before the first epoch when a step could pass a single example (the last batch,
        or under torchrun a rank's share of it, or the stand-in of a rank that gets none) and the model
        cannot train on one: batch norm with one value per channel raises in training mode, from
        every rank, an epoch in. Probed with one training-mode pass that changes nothing."""
        ranks = 1 if self.distributed is None else self.distributed.world_size
        real = self.batch_recipe.real_batch_size
        last = n_train % real or real  # real examples in the last batch
        if self.config.extra_data is not None:  # mixed in before the batch is dealt out to the ranks
            last += self.batch_recipe.plan.extra_for(last)
        if last // ranks >= 2:
            return
        try:
            with probing(self.model, training=True, device=self.device):
                self.model(probe.to(self.device))
        except ValueError as err:  # torch's batch norm: "Expected more than 1 value per channel"
            where = f" over {ranks} processes, a share of" if ranks > 1 else ","
            raise ConfigError(f"the model cannot train on a single example ({err}), and a batch size of "
                              f"{self.config.batch_size} leaves a last batch of {last} of {n_train} training "
                              f"examples{where} fewer than 2; choose a batch size that leaves at least "
                              f"{2 * ranks}") from err

    # -- memory layout -------------------------------------------------------------------------

    # train.channels_last unset: whether this trainer may choose channels_last itself (DP does not)
    AUTO_CHANNELS_LAST = True
    # whether its linear layers may run on oneDNN where that pays (fortify.models.onednn_linear)
    ONEDNN_LINEAR = True

    def _wants_channels_last(self, config: TrainConfig, model: nn.Module,
                             distributed: DistributedContext | None) -> bool:
        """``train.channels_last`` when set; unset, on for CPU training in one process of a model
        with 4-D weights, where oneDNN's channels_last convolutions and pooling were measured faster
        (docs/PERFORMANCE.md). ``fit`` checks first that the model runs so."""
        if config.channels_last is not None:
            return config.channels_last
        device = next(model.parameters()).device
        return (self.AUTO_CHANNELS_LAST and device.type == "cpu" and distributed is None
                and has_4d_tensors(model))

    def _settle_layout(self, probe: Tensor) -> None:
        """Check that the model runs on ``probe`` with channels_last weights: when the setting asked
        for them, a ConfigError if not; when it was unset, train in the default layout instead."""
        if self.channels_last and not runs_channels_last(self.model, probe.to(self.device), training=True):
            to_contiguous(self.model)
            if self.config.channels_last and has_4d_tensors(self.model):
                raise ConfigError("the model does not run with channels_last weights (it reshapes "
                                  "activations with Tensor.view, say); set train.channels_last: false")
            self.channels_last = False
        self.batch_recipe.channels_last = self.channels_last

    @contextlib.contextmanager
    def _training_layout(self) -> Iterator[None]:
        """For the duration of ``fit``: the linear layers on oneDNN when ``self.onednn_linear``, and
        channels_last weights (again, on a second ``fit``) with the ``nn.Flatten`` gradient hooks when
        ``self.channels_last``. Afterwards the model is as it was, its weights in the default layout
        with the values they trained to, so that a caller saves or copies them as any other model's.
        The optimiser's state follows the weights both ways."""
        with onednn_linear(self.model) if self.onednn_linear else contextlib.nullcontext():
            if not self.channels_last:
                yield
                return
            to_channels_last(self.model)
            try:
                state_in_parameter_layout(self.optimizer)
                with flatten_gradient_hooks(self.model):
                    yield
            finally:
                to_contiguous(self.model)
                state_in_parameter_layout(self.optimizer)

    @contextlib.contextmanager
    def _recorded_steps(self) -> Iterator[None]:
        """Under ``train.cuda_graph``, for the duration of ``fit``: the step recorded as a CUDA graph
        (fortify.training.step_graph), inside the training layout, whose weights it records by
        address. Released afterwards with the memory it holds."""
        if not self.config.cuda_graph:
            yield
            return
        # a full batch holds batch_size examples, extra data included (BatchRecipe)
        self._step_graph = StepGraph(self._train_step, batch_size=self.config.batch_size,
                                     optimizer=self.optimizer, device=self.device,
                                     generators=[self.objective.generator(self.device)])
        try:
            yield
        finally:
            self._step_graph = None
            # gradients the recorded backward pass made live in the graph's memory and would keep it
            self.optimizer.zero_grad(set_to_none=True)

    # -- one epoch -----------------------------------------------------------------------------

    def _run_epoch(self, train: Split, val: Split, steps_per_epoch: int, bar: Progress
                   ) -> EpochRecord:
        start = time.perf_counter()
        self.model.train()
        total_steps = steps_per_epoch * self.config.epochs
        loss_sum, seen = torch.zeros((), device=self.device), 0
        batches = bar.add_task(f"epoch {self.state.epoch + 1}", total=steps_per_epoch)
        for batch in self._local_batches(train):
            lr = self._set_lr(self.state.step, total_steps)
            eps = self._warm_eps(self.state.step / steps_per_epoch)
            x, y = batch.x.to(self.device), batch.y.to(self.device)
            if self._step_graph is not None and eps == self.threat.eps:  # recorded once eps is final
                loss = self._step_graph(x, y)
            else:
                loss = self._train_step(x, y, batch.weight)
            loss_sum.add_(loss.detach(), alpha=batch.count)  # no host sync inside the loop
            seen += batch.count  # extra_data examples included: the mean is over what was trained on
            self.state.step += 1
            if self.show_progress:
                bar.update(batches, advance=1)
        bar.remove_task(batches)
        if self.distributed is not None:
            loss_sum = self.distributed.sum(loss_sum)
            seen = int(self.distributed.sum(torch.tensor(seen, device=self.device)))
        if not torch.isfinite(loss_sum):  # checked once per epoch: no host sync per batch
            raise ConfigError(f"training loss became {float(loss_sum)} in epoch {self.state.epoch + 1}; "
                              "lower the learning rate or check the data")
        self._sync_buffers()
        clean, robust = self._validate(val)
        self.state.seconds += time.perf_counter() - start
        return EpochRecord(epoch=self.state.epoch + 1, lr=lr, eps=eps,
                           train_loss=float(loss_sum) / max(seen, 1), val_clean_accuracy=clean,
                           val_robust_accuracy=robust, seconds=time.perf_counter() - start)

    def _keep_on_gpu(self, train: Split) -> Split:
        """The training split (and the extra data) on the training device when that is a GPU with room
        for them; else as they are.

        On a GPU, batches cut from host memory cost a host-side gather, augmentation on the CPU and a
        copy per step; cut on the device they cost a few kernels. The batches are the same: the
        shuffle and the augmentations draw from CPU generators wherever the data lie.
        """
        if self.device.type != "cuda":
            return train
        extra = self.batch_recipe.extra
        free, _ = torch.cuda.mem_get_info(self.device)
        moved = splits_on_device([train] if extra is None else [train, extra], self.device, free_bytes=free)
        if extra is not None:
            self.batch_recipe.extra = moved[1]
        return moved[0]

    def _local_batches(self, train: Split) -> Iterator[LocalBatch]:
        """The shuffled batches, or under torchrun this rank's share of each global batch."""
        batches = self.batch_recipe.apply(
            train.batches(self.batch_recipe.real_batch_size, generator=self.shuffle))
        if self.distributed is None:
            return (LocalBatch(x, y, count=x.shape[0], weight=1.0) for x, y in batches)
        self.distributed.reseed(self.objective, self.config.seed, self.state.epoch)
        # a perturbation carried from batch to batch (Free AT's) belongs to one rank's shares, and only
        # rank 0's would be checkpointed: under torchrun it starts afresh each epoch, so that a resumed
        # run (checkpoints fall between epochs) carries what an uninterrupted one does
        reset = getattr(self.objective, "reset_carried_state", None)
        if reset is not None:
            reset()
        return self.distributed.local_batches(batches)

    def _train_step(self, x: Tensor, y: Tensor, weight: float = 1.0) -> Tensor:
        """One batch: the objective's replays (Free AT's m, else one), each an optimiser step; the
        loss returned is their mean, as Free AT's reference code logs it."""
        total = None
        for _ in range(self.objective.replays):
            # bf16 needs no loss scaling; the attack inside the objective runs under autocast too
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
                loss = self.objective(self.train_model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            # weight: this rank's share of the global batch; alone it is 1 and costs no extra op
            (loss if weight == 1.0 else loss * weight).backward()
            self.objective.after_backward(self.model)
            if self.config.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            # detached: a loss kept alive keeps its autograd graph, whose gradient accumulators would
            # then run on the stream they were made on when StepGraph steps on a side stream
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None, "an objective replays each batch at least once"
        return total if self.objective.replays == 1 else total / self.objective.replays

    def _set_lr(self, step: int, total_steps: int) -> float:
        progress = schedule_progress(self.config.schedule, step, total_steps)
        lr = self.config.learning_rate * self.schedule(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _warm_eps(self, epoch_progress: float) -> float:
        """Linear eps ramp over the first ``eps_warmup_epochs`` epochs; the objective also hears how
        far training has come (every training loop calls this once per step)."""
        warm = self.config.eps_warmup_epochs
        fraction = 1.0 if warm == 0 else min(1.0, (epoch_progress + 1e-9) / warm)
        eps = self.threat.eps * max(fraction, 1e-3)
        self.objective.set_eps(eps)
        self.objective.set_progress(epoch_progress)
        return eps

    def _sync_buffers(self) -> None:
        """Under torchrun, rank 0's BatchNorm statistics (the model's and the EMA's) on every rank.

        Training updates each rank's statistics from its own shares; synced once an epoch, every rank
        validates the model that rank 0 checkpoints, and a resumed run, whose ranks all load rank 0's
        checkpoint, goes on from the statistics an uninterrupted run holds.
        """
        if self.distributed is None:
            return
        shadow = {} if self.ema is None else self.ema.shadow  # non-persistent buffers are not averaged
        averaged = [shadow[name] for name, _ in self.model.named_buffers() if name in shadow]
        self.distributed.broadcast_buffers(self.model, *averaged)

    def _validate(self, val: Split) -> tuple[float, float | None]:
        """Clean and PGD accuracy on the validation split (robust only for adversarial runs)."""
        with self.evaluated_weights():
            return self._validate_current(val)

    def evaluated_weights(self) -> contextlib.AbstractContextManager[Any]:
        """The weights validation, selection and model.safetensors use: the EMA's when it is on."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext(self.model)

    def _validate_current(self, val: Split) -> tuple[float, float | None]:
        """Validation in batches of ``VALIDATION_BATCH``, each attacked from its own seed (as
        ``evaluate`` does), so that under torchrun, where each rank takes whole batches and the counts
        are summed, every example meets the random start it meets in one process. An example wrong
        clean never counts as robust, whatever the attack's point scores."""
        self.model.eval()
        x, y = val.x.to(self.device), val.y.to(self.device)
        attack = PGD(self.threat, steps=self.config.val_attack_steps, early_stop=True, probe=True,
                     seed=self.config.seed) if self.objective.adversarial else None
        clean = torch.zeros((), dtype=torch.long, device=self.device)
        robust = torch.zeros_like(clean)
        for number, start in enumerate(range(0, len(val), VALIDATION_BATCH)):
            if self.distributed is not None and not self.distributed.owns(number):
                continue
            xb, yb = x[start:start + VALIDATION_BATCH], y[start:start + VALIDATION_BATCH]
            with torch.inference_mode():
                right = predicted_class(self.model(xb)) == yb
                clean += right.sum()
            if attack is not None:
                generator = torch.Generator(device=self.device).manual_seed(batch_seed(attack.seed, number))
                with torch.no_grad():
                    x_adv = attack(self.model, xb, yb, generator=generator)
                    # robust: right clean and under attack (docs/METRICS.md), as evaluate counts it
                    robust += (right & (predicted_class(self.model(x_adv)) == yb)).sum()
        self.model.train()
        return (self._share_correct(clean, len(val)),
                self._share_correct(robust, len(val)) if attack is not None else None)

    def _share_correct(self, count: Tensor, total: int) -> float:
        if self.distributed is not None:
            count = self.distributed.sum(count)
        return float(count.float() / total)  # in float32, as a mean over one process would be

    # -- selection and early stopping ----------------------------------------------------------

    def _select(self, record: EpochRecord) -> None:
        self.state.history.append(record)
        value = getattr(record, self.selection_metric)
        if value > self.state.best_metric:
            self.state.best_metric = value
            self.state.best_epoch = record.epoch
            self.state.since_best = 0
            with self.evaluated_weights():
                self._keep_best()
        elif not self._warming_up(record):
            self.state.since_best += 1

    def _warming_up(self, record: EpochRecord) -> bool:
        """Whether ``record``'s epoch lay in the eps warm-up of a run selected on robust accuracy.
        Patience counts from the end of the warm-up: until then training attacks with a smaller eps
        than validation does, and a warm-up as long as the patience stopped runs before they trained
        at the eps they are judged at."""
        return (self.selection_metric == "val_robust_accuracy"
                and record.epoch <= self.config.eps_warmup_epochs)

    def _keep_best(self) -> None:
        if self._writes_files:  # committed with the epoch's checkpoint, which holds this selection
            self._stage_weights("best.safetensors")
        else:
            self._best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _should_stop(self) -> bool:
        return self.config.early_stopping and self.state.since_best >= self.config.patience

    def _finish(self) -> None:
        """Leave the model at its selected weights and write model.safetensors."""
        if self.config.early_stopping:
            if self.run_dir is not None:  # every rank: the epoch's barrier follows rank 0's write
                # only rank 0 records the hash of each best.safetensors it writes; the other ranks
                # still hold the one state.json named when they resumed
                expected = self._hashes.get("best.safetensors") if self._writes_files else None
                ckpt.load_weights(self.run_dir / "best.safetensors", self.model, expected)
            elif getattr(self, "_best_weights", None) is not None:
                self.model.load_state_dict(self._best_weights)
        elif self.ema is not None:
            self.ema.copy_to()
        if self._writes_files:
            self._stage_weights("model.safetensors")
            self._write_state_json(finished=True)

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def _hashes(self) -> dict[str, str]:
        if not hasattr(self, "_hash_table"):
            self._hash_table: dict[str, str] = {}
        return self._hash_table

    @property
    def _writes_files(self) -> bool:
        """Only rank 0 of a data-parallel run writes; the other ranks keep the best weights in memory."""
        return self.run_dir is not None and (self.distributed is None or self.distributed.is_main)

    def _save_checkpoint(self) -> None:
        if self._writes_files:
            self._write_checkpoint()
        if self.distributed is not None:
            self.distributed.barrier()  # so that a rank dying next cannot cut rank 0's write short

    def _write_checkpoint(self) -> None:
        assert self.run_dir is not None
        optim_tensors, optim_meta = ckpt.split_optimizer_state(self.optimizer.state_dict())
        rng = {"rng.torch": torch.get_rng_state(), "rng.shuffle": self.shuffle.get_state()}
        if self.device.type == "cuda":  # dropout on the GPU draws from the device's own generator
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        objective_rng = self.objective.rng_state()
        if objective_rng is not None:
            rng["rng.objective"] = objective_rng
        extra_state = getattr(self.objective, "extra_state", None)  # e.g. Free AT's perturbation
        if extra_state is not None:
            rng.update({f"objective.{k}": v for k, v in extra_state().items()})
        rng.update(self.batch_recipe.rng_state())
        rng.update(self._extra_rng_state())
        if self.ema is not None:
            rng.update(self.ema.state_dict())
        self._stage_tensors("state.safetensors", {**optim_tensors, **rng}, kind="train-state")
        self._stage_weights("last.safetensors")
        self._optim_meta = optim_meta
        self._write_state_json(finished=False)

    def _stage_weights(self, name: str) -> None:
        self._stage_tensors(name, dict(self.model.state_dict()), kind="weights")

    def _stage_tensors(self, name: str, tensors: dict[str, Tensor], *, kind: str) -> None:
        """Write checkpoint file ``name`` under its pending name; the next state.json commits it."""
        assert self.run_dir is not None
        self._hashes[name] = ckpt.stage_tensors(self.run_dir / name, tensors, kind)
        if name not in self._staged:  # staged again before the commit: the newer version replaced it
            self._staged.append(name)

    def _seed_generators(self) -> None:
        """A fresh run's global generator (dropout masks, say), from the training seed."""
        torch.manual_seed(self.config.seed)

    def _extra_rng_state(self) -> dict[str, Tensor]:
        """Generator states a subclass keeps in the checkpoint beside the Trainer's (DP's)."""
        return {}

    def _load_extra_rng_state(self, tensors: dict[str, Tensor]) -> None:
        """Take back what ``_extra_rng_state`` saved."""

    def _write_state_json(self, *, finished: bool) -> None:
        """Commit the checkpoint: state.json, then the files staged since the last commit."""
        assert self.run_dir is not None
        progress = asdict(self.state)
        ckpt.commit_state_json(self.run_dir, {
            "finished": finished,
            "progress": progress,
            "optimizer": getattr(self, "_optim_meta", None),
            "config": self.config.model_dump(mode="json"),
            "threat": self.threat.to_dict(),
            "objective": self.objective.name,
            "sha256": dict(self._hashes),
        }, staged=self._staged)
        self._staged = []

    def _restore(self) -> None:
        if self.run_dir is None:
            raise ConfigError("resume needs a run directory")
        state = ckpt.read_state_json(self.run_dir)
        saved = state.get("config")
        differing = (setting_differences(comparable_train_settings(saved),
                                         comparable_train_settings(self.config.model_dump(mode="json")),
                                         "train.")
                     if isinstance(saved, dict) else ["no training settings recorded"])
        if state.get("threat") != self.threat.to_dict():
            differing.append(f"threat model (recorded {state.get('threat')}, now {self.threat.to_dict()})")
        if state.get("objective") != self.objective.name:
            differing.append(f"objective (recorded {state.get('objective')!r}, now {self.objective.name!r})")
        if differing:
            raise CheckpointError(f"cannot resume {self.run_dir}: its training settings differ from the "
                                  f"ones given now ({listed(differing)})")
        self._settle_interrupted_commit()
        hashes = state.get("sha256", {})
        unrecorded = [name for name in ("last.safetensors", "state.safetensors") if name not in hashes]
        if unrecorded:  # without its hash a replaced file would load unchecked
            raise CheckpointError(f"cannot resume {self.run_dir}: {ckpt.STATE_JSON} records no hash of "
                                  f"{' or '.join(unrecorded)}")
        ckpt.load_weights(self.run_dir / "last.safetensors", self.model, hashes["last.safetensors"])
        tensors = ckpt.load_tensors(self.run_dir / "state.safetensors", "train-state",
                                    hashes["state.safetensors"])
        optimizer_meta = state.get("optimizer")
        try:
            self._load_training_state(tensors, optimizer_meta)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            # a state of another shape (optimizer groups, a generator of another device: CUDA's state
            # is 16 bytes, the CPU's 5056) would otherwise stop the run with a traceback
            raise CheckpointError(f"cannot resume {self.run_dir}: its saved training state does not fit "
                                  f"this run ({type(err).__name__}: {err}); start it afresh elsewhere, "
                                  "or on the device it was started on") from err
        self.state = _progress_from(state.get("progress"), self.run_dir)
        # files recorded since this trainer was built (config.yaml, the model card: rewritten by a
        # resumed run, whose eval or speed settings may differ) keep their new hashes
        for name, digest in hashes.items():
            self._hashes.setdefault(name, digest)
        self._optim_meta = optimizer_meta

    def _load_training_state(self, tensors: dict[str, Tensor], optimizer_meta: Any) -> None:
        """Optimiser, generators, EMA and the objective's own state, from a checkpoint's tensors."""
        self.optimizer.load_state_dict(ckpt.join_optimizer_state(tensors, optimizer_meta))
        state_in_parameter_layout(self.optimizer)
        if "rng.torch" in tensors:  # a finished DP run drops it with its other secret draws
            torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.shuffle.set_state(tensors["rng.shuffle"])
        self.batch_recipe.set_rng_state(tensors)
        self._load_extra_rng_state(tensors)
        if self.ema is not None:
            self.ema.load_state_dict({k: v.to(self.device) for k, v in tensors.items()
                                      if k.startswith("ema.")})
        if "rng.objective" in tensors:
            self.objective.set_rng_state(tensors["rng.objective"], self.device)
        load_extra = getattr(self.objective, "load_extra_state", None)
        if load_extra is not None:
            load_extra({k.removeprefix("objective."): v.to(self.device)
                        for k, v in tensors.items() if k.startswith("objective.")})

    def _settle_interrupted_commit(self) -> None:
        """Complete or undo a commit a kill cut short (checkpoint.py); under torchrun rank 0, the
        writer, does it while the others wait, so that none reads a file being moved."""
        assert self.run_dir is not None
        if self._writes_files:
            ckpt.settle_interrupted_commit(self.run_dir)
        if self.distributed is not None:
            self.distributed.barrier()

    # -- construction --------------------------------------------------------------------------

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        # one fused kernel per parameter instead of a handful of element-wise ops (CPU and CUDA)
        fused = all(p.device.type in _FUSED_DEVICES and p.dtype.is_floating_point for p in params)
        if self.config.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.config.learning_rate,
                                    weight_decay=self.config.weight_decay, fused=fused or None)
        return torch.optim.SGD(params, lr=self.config.learning_rate, momentum=self.config.momentum,
                               weight_decay=self.config.weight_decay, fused=fused or None)

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Progress]:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), disable=not self.show_progress, transient=True)
        with bar:
            yield bar
