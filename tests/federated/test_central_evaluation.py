"""The server's evaluation of the global model: in batches of eval.batch_size, in eval mode, with the
accuracies a single batch of the whole test split gives."""

from __future__ import annotations

import copy

import pytest
import torch
from fedkit import small_batchnorm_mlp, small_run
from flwr.app import ArrayRecord
from torch import Tensor, nn

from fortify.attacks import PGD
from fortify.data import Dataset
from fortify.federated.client import load_run_dataset
from fortify.federated.config import FederatedRun
from fortify.federated.progress import FederationProgress
from fortify.federated.results import RoundRecord
from fortify.federated.server import central_evaluator
from fortify.models.registry import ModelSpec
from fortify.threat import ThreatModel

BATCH = 64  # does not divide the 359 test digits: five batches of 64, then one of 39
EPS = 0.1  # small enough that some of the trained model's answers survive PGD


class BatchRecorder(nn.Module):
    """Wraps a model and notes each forward pass's batch size and whether any layer was training."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append((len(x), any(m.training for m in self.model.modules())))
        return self.model(x)


def _run() -> FederatedRun:
    return small_run(eval_examples=None, sections={"eval": {"batch_size": BATCH}, "threat": {"eps": EPS}})


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return load_run_dataset(_run())


@pytest.fixture(scope="module")
def trained(dataset: Dataset) -> nn.Module:
    """The batch-norm MLP after a few epochs of SGD: right on most digits, so accuracies can differ."""
    torch.manual_seed(0)
    model = small_batchnorm_mlp(ModelSpec(dataset.input_shape, dataset.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        for x, y in dataset.train.batches(64, generator=generator):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def _evaluate_round_one(run: FederatedRun, dataset: Dataset, model: nn.Module) -> RoundRecord:
    progress = FederationProgress(run)
    central_evaluator(run, dataset, model, progress)(1, ArrayRecord(model.state_dict()))
    return progress.rounds[-1]


def test_the_batched_evaluation_gives_exactly_the_one_batch_accuracies(dataset, trained):
    # Prepare
    run, model, test = _run(), copy.deepcopy(trained), dataset.test
    # Execute
    record = _evaluate_round_one(run, dataset, model)
    # Assert: the whole test split as one batch, as the server evaluated before
    attack = PGD(ThreatModel("linf", EPS, dataset.bounds), steps=run.federation.eval_steps, early_stop=True,
                 probe=True, seed=run.config.eval.seed)
    model.eval()
    with torch.no_grad():
        clean = (model(test.x).argmax(1) == test.y).float().mean().item()
        robust = (model(attack(model, test.x, test.y)).argmax(1) == test.y).float().mean().item()
    assert 0 < robust < clean  # an attack that fools some answers and not others
    assert (record.clean_accuracy, record.robust_accuracy) == (clean, robust)


def test_the_model_sees_at_most_eval_batch_size_examples_at_once_and_only_in_eval_mode(dataset, trained):
    # Prepare: the server's model in training mode, as a freshly built one is
    recorder = BatchRecorder(copy.deepcopy(trained)).train()
    # Execute
    _evaluate_round_one(_run(), dataset, recorder)
    # Assert
    sizes = [size for size, _ in recorder.calls]
    assert max(sizes) == BATCH
    assert len(dataset.test) % BATCH in sizes  # the last, shorter batch was evaluated too
    assert not any(training for _, training in recorder.calls)  # BatchNorm used its running statistics
    assert recorder.training and recorder.model[2].training  # the caller's mode came back
