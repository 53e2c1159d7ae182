"""Transfer attack: craft on a surrogate model, then hand the points to the target.

The target's gradients are never used, so this measures what an attacker without access to the
model's weights achieves with a model of their own (another seed, another architecture).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.attacks.base import Attack


class Transfer(Attack):
    """Run ``source_attack`` against ``surrogate`` and return its points unchanged."""

    name = "transfer"

    def __init__(self, source_attack: Attack, surrogate: nn.Module, *, seed: int | None = None) -> None:
        super().__init__(source_attack.threat, targeted=source_attack.targeted,
                         seed=source_attack.seed if seed is None else seed)
        self.source_attack = source_attack
        self.surrogate = surrogate

    @property
    def label(self) -> str:
        return f"transfer({self.source_attack.label})"

    def with_threat(self, threat):  # type: ignore[no-untyped-def]
        return Transfer(self.source_attack.with_threat(threat), self.surrogate, seed=self.seed)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "source": self.source_attack.describe(),
                "surrogate": type(self.surrogate).__name__}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        device = next(self.surrogate.parameters()).device
        if device != x.device:  # a generator draws on its own device: seed one there from the caller's
            seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator(device=device).manual_seed(seed)
        x_adv = self.source_attack(self.surrogate, x.to(device), y.to(device),
                                   target=None if target is None else target.to(device), generator=generator)
        return x_adv.to(x.device, x.dtype)
