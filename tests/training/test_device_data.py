"""Training data kept on the GPU, and CUDA-graph training (``train.compile: reduce-overhead``).

The CUDA cases skip without a GPU (CI has none); the placement rule is checked on the meta device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fortify.config import TrainConfig
from fortify.data import Split
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import RESIDENT_SHARE, Trainer, splits_on_device

THREAT = ThreatModel("linf", 0.2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_splits_move_to_the_device_together_only_when_they_fit_in_their_share_of_free_memory():
    train = Split(torch.rand(10, 1, 8, 8), torch.arange(10))
    extra = Split(torch.rand(3, 1, 8, 8), torch.arange(3))
    size = sum(s.x.nbytes + s.y.nbytes for s in (train, extra))
    meta = torch.device("meta")
    moved = splits_on_device([train, extra], meta, free_bytes=int(size / RESIDENT_SHARE))
    kept = splits_on_device([train, extra], meta, free_bytes=int(size / RESIDENT_SHARE) - 1)
    assert all(t.device == meta for split in moved for t in (split.x, split.y))
    assert kept[0] is train and kept[1] is extra  # neither moves: the training split alone would fit


def _fit(digits, tmp_path, **settings):
    torch.manual_seed(5)
    model = build_model("mlp", digits.input_shape, digits.num_classes).cuda()
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=digits.train.x[:32].numpy(), y=digits.train.y[:32].numpy())
    config = TrainConfig(objective="fgsm-rs", epochs=2, batch_size=32, seed=2, early_stopping=False,
                         augment={"crop_padding": 1, "flip": True}, extra_data=extra,
                         extra_fraction=0.25, **settings)
    trainer = Trainer(model, build_objective("fgsm-rs", ObjectiveOptions(THREAT, seed=2)), config,
                      threat=THREAT, show_progress=False)
    return model, trainer


@needs_cuda
def test_a_training_split_kept_on_the_gpu_trains_what_host_batches_train(digits, tmp_path):
    train, val = digits.train.head(160), digits.val.head(64)
    on_gpu, trainer = _fit(digits, tmp_path)
    trainer.fit(train, val)
    assert trainer.batch_recipe.extra.x.is_cuda  # the extra data followed the training split
    on_host, host_trainer = _fit(digits, tmp_path)
    host_trainer._keep_on_gpu = lambda split: split  # batches cut from host memory and copied, as before
    host_trainer.fit(train, val)
    for (name, a), b in zip(on_gpu.state_dict().items(), on_host.state_dict().values()):
        assert torch.equal(a, b), name


@needs_cuda
def test_cuda_graph_training_follows_eager_training(digits, tmp_path):
    train, val = digits.train.head(256), digits.val.head(64)
    eager, eager_trainer = _fit(digits, tmp_path)
    graphs, graph_trainer = _fit(digits, tmp_path, compile="reduce-overhead")
    eager_trainer.fit(train, val)
    graph_trainer.fit(train, val)
    for (name, a), b in zip(eager.state_dict().items(), graphs.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), name
