"""Loss heads in fp32 under mixed precision (``train.amp``): on CPU, bf16 autocast hands softmax and
log-softmax bf16 logits, whose 8 bits of mantissa round a probability near 1 to 1 (MART's margin term
then becomes ``-log(1e-12)``) and the KL of nearby points to rounding noise (TRADES)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.config import TrainConfig
from fortify.data import Dataset, Split
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.methods import MethodOptions, objective_from_config
from fortify.training.objectives import OBJECTIVES, at_least_fp32, build_objective
from fortify.training.paired import kl_to_clean
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.05)
CONFIDENT_CLASS = 1


def _confidently_wrong_mlp() -> nn.Module:
    """An MLP whose logit for class 1 is 9 above the others: p_1 = 0.9997, which bf16 rounds to 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.0, 9.0, 0.0]))
    return model


def _loss_and_gradient(name: str, *, amp: bool) -> tuple[float, torch.Tensor]:
    model = _confidently_wrong_mlp()
    objective = build_objective(name, MethodOptions(THREAT, attack_steps=2, free_replays=2))
    x = torch.rand(16, 10, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.long)  # every example's strongest wrong class is the confident one
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = objective(model, x, y)
    loss.backward()
    objective.after_backward(model)
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_under_bf16_autocast_has_the_fp32_loss_and_gradient(name):
    # Prepare / Execute: the same model, batch and seed in fp32 and under CPU bf16 autocast
    loss_fp32, grad_fp32 = _loss_and_gradient(name, amp=False)
    loss_bf16, grad_bf16 = _loss_and_gradient(name, amp=True)
    # Assert: only the bf16 forward pass's rounding apart (before the fix MART's loss was 2.2 times
    # the fp32 one and its gradient 1e8 times longer)
    assert loss_bf16 == pytest.approx(loss_fp32, rel=1e-2)
    assert (grad_bf16 - grad_fp32).norm() <= 2e-2 * grad_fp32.norm()


@pytest.mark.parametrize(("dtype", "head_dtype"), [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64),  # never narrowed
])
def test_loss_heads_widen_low_precision_logits_only(dtype, head_dtype):
    logits = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    widened = at_least_fp32(logits)
    assert widened.dtype == head_dtype
    widened.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == dtype  # the gradient reaches the model


def test_trades_kl_under_bf16_autocast_is_non_negative_and_near_the_fp32_one():
    # Prepare: points 0.01 apart under a linear model with logits of size ~1.5: KL ~ 5e-4, below the
    # rounding of a bf16 log-probability (~4e-3)
    torch.manual_seed(0)
    model = nn.Linear(32, 10)
    with torch.no_grad():
        model.weight.mul_(8)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 32, generator=gen)
    x_adv = x + 0.01 * torch.randn(x.shape, generator=gen)
    # Execute
    with torch.no_grad():
        reference = kl_to_clean(model(x), model(x_adv))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = kl_to_clean(model(x), model(x_adv))
    # Assert: a divergence (>= 0) of about the fp32 size (before the fix: 47% negative, mean 1.5x)
    assert reference.min() > 0
    assert mixed.min() >= 0
    assert mixed.mean().item() == pytest.approx(reference.mean().item(), rel=0.1)
    assert mixed.dtype == torch.float32


def test_mart_training_with_amp_on_a_confident_model_matches_fp32_training(digits: Dataset):
    # Prepare: an MLP that puts p ~ 1 on class 3 for every input, wrong for 90% of the data
    train = Split(digits.train.x[:256], digits.train.y[:256])
    val = Split(digits.val.x[:64], digits.val.y[:64])
    threat = ThreatModel("linf", 0.1)

    def fit(amp: bool) -> float:
        torch.manual_seed(0)
        model = build_model("mlp", digits.input_shape, digits.num_classes)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            head.bias.zero_()
            head.bias[3] = 12.0
        config = TrainConfig(objective="mart", epochs=1, batch_size=64, lr=0.01, early_stopping=False,
                             amp=amp, attack_steps=1, val_attack_steps=1)
        trainer = Trainer(model, objective_from_config(config, threat), config, threat=threat,
                          show_progress=False)
        return trainer.fit(train, val).history[-1].train_loss

    # Execute
    loss_fp32, loss_amp = fit(amp=False), fit(amp=True)
    # Assert: before the fix the bf16 margin term's 1e12 gradients drove the loss to 1e13
    assert loss_amp == pytest.approx(loss_fp32, rel=0.05)
