"""One rank of the data-parallel tests; torchrun starts two of these (see test_distributed.py).

``python -m torch.distributed.run --nproc-per-node 2 _ddp_worker.py TASK OUT`` with TASK
``train-eval-crash`` (DDP training with a record of which rank wrote files, a sharded evaluation and
a sharded robust validation, AWP training, then an adversarial run whose rank 1 dies after epoch 1)
or ``resume`` (resume that run, then run it again uninterrupted for reference). Two launches in all:
each costs seconds of CPU to start. The adversarial run's model has BatchNorm and the run keeps its best epoch
(early stopping), so resuming exercises the statistics each rank holds and the best checkpoint each
rank reloads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.attacks import PGD, Square
from fortify.config import TrainConfig
from fortify.data import load_dataset
from fortify.data.base import Split
from fortify.evaluation import evaluate
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training import checkpoint as ckpt
from fortify.training import distributed
from fortify.training import trainer as trainer_module
from fortify.training.methods import MethodOptions
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.1)
N_TRAIN = 1217  # 19 batches of 64, then 1 example: fewer than the 2 ranks
N_TEST = 90


@functools.cache
def data() -> tuple[Split, Split, Split]:
    dataset = load_dataset("digits")
    return dataset.train.head(N_TRAIN), dataset.val, dataset.test.head(N_TEST)


def new_mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 10)


def new_batch_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def train_config(objective: str, early_stopping: bool = False) -> TrainConfig:
    return TrainConfig(objective=objective, epochs=3, batch_size=64, early_stopping=early_stopping,
                       attack_steps=3, val_attack_steps=3)


def attacks() -> list[Any]:
    return [PGD(THREAT, steps=5, random_start=True, seed=1), Square(THREAT, n_queries=20, seed=2)]


def fit(objective: str, run_dir: Path | None, ctx: distributed.DistributedContext | None, *,
        resume: bool = False, callbacks: tuple[Any, ...] = ()) -> nn.Module:
    train, val, _ = data()
    model = new_mlp()
    config = train_config(objective)
    return _fit(model, config, train, val, run_dir, ctx, resume, callbacks)


def fit_batch_norm(run_dir: Path, ctx: distributed.DistributedContext, *, resume: bool = False,
                   callbacks: tuple[Any, ...] = ()) -> nn.Module:
    """fgsm-rs with early stopping on the BatchNorm model; 1,216 examples, so that no rank's slice
    is a single example (BatchNorm cannot train on one)."""
    train, val, _ = data()
    return _fit(new_batch_norm_mlp(), train_config("fgsm-rs", early_stopping=True), train.head(1216), val,
                run_dir, ctx, resume, callbacks)


def _fit(model: nn.Module, config: TrainConfig, train: Split, val: Split, run_dir: Path | None,
         ctx: distributed.DistributedContext | None, resume: bool, callbacks: tuple[Any, ...]) -> nn.Module:
    objective = config.objective
    trainer = Trainer(model, build_objective(objective, ObjectiveOptions(THREAT, attack_steps=3)),
                      config, threat=THREAT, run_dir=run_dir, show_progress=False,
                      distributed=ctx, callbacks=callbacks)
    trainer.fit(train, val, resume=resume)
    return model


def shifted_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Adversarial points that depend on each example alone, whichever rank and batch it is in."""
    return (x + 0.05).clamp(0, 1)


def fit_awp(run_dir: Path | None, ctx: distributed.DistributedContext | None, *,
            gamma: float = 0.02) -> nn.Module:
    """awp-pgd over 127 examples: each epoch a global batch of 64, then a short one of 63 (shares of 32
    and 31 on 2 ranks). The points are fixed (``shifted_points``), not crafted from each rank's
    random starts, so that only AWP's weight perturbation can tell 2 ranks from one process."""
    train, val, _ = data()
    objective = build_objective("awp-pgd", MethodOptions(THREAT, attack_steps=3, awp_gamma=gamma))
    objective.craft = shifted_points  # type: ignore[method-assign]
    model = new_mlp()
    trainer = Trainer(model, objective, train_config("awp-pgd"), threat=THREAT, run_dir=run_dir,
                      show_progress=False, distributed=ctx)
    trainer.fit(train.head(127), val)
    return model


class Interrupted(Exception):
    """Raised on every rank at once, so that the group stays usable for the next run."""


def interrupt_after_first_epoch(record: Any) -> None:
    if record.epoch == 1:
        raise Interrupted


def fit_free(run_dir: Path, ctx: distributed.DistributedContext, *, resume: bool = False,
             callbacks: tuple[Any, ...] = ()) -> nn.Module:
    """Free AT, whose perturbation each rank carries from batch to batch."""
    train, val, _ = data()
    return _fit(new_mlp(), train_config("free"), train, val, run_dir, ctx, resume, callbacks)


def free_interrupted_resumed_and_whole(ctx: distributed.DistributedContext, out: Path) -> None:
    with contextlib.suppress(Interrupted):
        fit_free(out / "free-resumed", ctx, callbacks=(interrupt_after_first_epoch,))
    fit_free(out / "free-resumed", ctx, resume=True)
    fit_free(out / "free-full", ctx)


def record_writes(log: list[str]) -> None:
    """Note every checkpoint write this process makes."""
    for name in ("save_weights", "save_tensors", "write_state_json"):
        original = getattr(ckpt, name)

        def noted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            log.append(_name)
            return _original(*args, **kwargs)

        setattr(ckpt, name, noted)


def train_eval(ctx: distributed.DistributedContext, out: Path) -> None:
    writes: list[str] = []
    record_writes(writes)
    model = fit("standard", out / "standard", ctx)
    (out / f"writes-rank{ctx.rank}.json").write_text(json.dumps(writes))
    _, _, test = data()
    report = evaluate(model.eval(), test.x, test.y, attacks(), THREAT, batch_size=16,
                      eps_grid=[0.05, 0.1], shard=ctx)
    if ctx.is_main:
        (out / "sharded.json").write_text(json.dumps(report.to_dict()))
    clean, robust = validation_trainer(model, ctx)._validate(data()[1])
    if ctx.is_main:
        (out / "validation.json").write_text(json.dumps({"clean": clean, "robust": robust}))


def validation_trainer(model: nn.Module, ctx: distributed.DistributedContext | None) -> Trainer:
    """A pgd Trainer around ``model`` whose validation splits the 180 validation examples into batches
    of 64: three, so that under 2 ranks each rank attacks a batch of its own."""
    trainer_module.VALIDATION_BATCH = 64
    return Trainer(model, build_objective("pgd", ObjectiveOptions(THREAT, attack_steps=3)),
                   train_config("pgd"), threat=THREAT, run_dir=None, show_progress=False, distributed=ctx)


def crash_after_first_epoch(ctx: distributed.DistributedContext) -> Any:
    def callback(record: Any) -> None:
        if record.epoch == 1 and ctx.rank == 1:
            os._exit(3)  # a rank dying: no cleanup, no exception

    return callback


def main(task: str, out: Path) -> None:
    torch.set_num_threads(1)
    ctx = distributed.join(torch.device("cpu"))
    assert ctx is not None and ctx.world_size == 2
    if task == "train-eval-crash":
        train_eval(ctx, out)
        fit_awp(out / "awp", ctx)
        fit_batch_norm(out / "fgsm-resumed", ctx, callbacks=(crash_after_first_epoch(ctx),))
    elif task == "resume":
        fit_batch_norm(out / "fgsm-resumed", ctx, resume=True)
        fit_batch_norm(out / "fgsm-full", ctx)
        free_interrupted_resumed_and_whole(ctx, out)
    else:
        raise SystemExit(f"unknown task {task!r}")
    # rank 1 finishes first (rank 0 still writes model.safetensors and state.json): leave together, so
    # that no rank tears its process group down while the other still holds its connections
    ctx.leave()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
