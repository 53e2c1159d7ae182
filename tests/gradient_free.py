"""Models whose graph does not reach their input, for tests of how evaluation copes with them."""

from __future__ import annotations

from torch import Tensor, nn


class DetachedInput(nn.Module):
    """``model`` behind a cut at the input (a preprocessing step outside autograd): its logits are
    right, but no input gradient exists."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.detach())
