"""White- or black-box: the gradient probe on models whose gradients are known."""

from __future__ import annotations

import torch
from torch import nn

from fortify.interop.access import probe_gradients


class _Quantised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.round(x * 255) / 255)


class _OutsideAutograd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.linear(x).detach().numpy())


class _Saturated(nn.Module):
    """Logit margins of 1e4: cross-entropy's gradient underflows to zero, the logits' does not."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1e4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) @ self.weight.T


def test_differentiable_model_is_white_box_and_keeps_its_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    access = probe_gradients(model, torch.rand(16, 4))
    assert access.kind == "white-box" and access.white_box and "16 of 16" in access.reason
    assert model.training


def test_saturated_model_is_still_white_box():
    x = torch.rand(8, 4)
    logits = _Saturated()(x).detach().requires_grad_(True)
    loss_gradient = torch.autograd.grad(nn.functional.cross_entropy(logits, torch.zeros(8, dtype=torch.long)),
                                        logits)[0]
    assert loss_gradient.eq(0).all()  # the trap the probe avoids
    assert probe_gradients(_Saturated(), x).white_box


def test_rounding_model_is_black_box():
    access = probe_gradients(_Quantised(), torch.rand(16, 4))
    assert access.kind == "black-box" and "zero on every example" in access.reason


def test_model_outside_autograd_is_black_box():
    access = probe_gradients(_OutsideAutograd(), torch.rand(16, 4))
    assert access.kind == "black-box" and "not connected" in access.reason
