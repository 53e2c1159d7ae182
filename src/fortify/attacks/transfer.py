"""Transfer attack: craft on a surrogate model, then hand the points to the target.

The target's gradients are never used, so this measures what an attacker without access to the
model's weights achieves with a model of their own (another seed, another architecture).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fortify.attacks.base import Attack
from fortify.attacks.pgd import PGD
from fortify.models.digest import weights_sha256


class Transfer(Attack):
    """Run ``source_attack`` against ``surrogate`` and return its points unchanged.

    A PGD source runs to its final iterate (``keep_first_success=False``) whatever it was built with:
    the first iterate that fools the surrogate lies just past the surrogate's boundary and seldom
    fools the target, where the final one has climbed the surrogate's loss for every step
    (``tests/attacks/test_transfer.py`` holds a standard digits CNN to under 45% robust accuracy under
    a PGD-trained surrogate's final iterates; its first hits left 57%).
    """

    name = "transfer"

    def __init__(self, source_attack: Attack, surrogate: nn.Module, *, seed: int | None = None) -> None:
        super().__init__(source_attack.threat, targeted=source_attack.targeted,
                         seed=source_attack.seed if seed is None else seed)
        self.source_attack = _final_iterate(source_attack)
        self.surrogate = surrogate

    @property
    def label(self) -> str:
        return f"transfer({self.source_attack.label})"

    @property
    def earlier_labels(self) -> tuple[str, ...]:
        return tuple(f"transfer({label})" for label in self.source_attack.earlier_labels)

    def with_threat(self, threat):  # type: ignore[no-untyped-def]
        return Transfer(self.source_attack.with_threat(threat), self.surrogate, seed=self.seed)

    def describe(self) -> dict[str, object]:
        # the surrogate's weights by their hash: another surrogate of the same class finds other points
        return {**super().describe(), "source": self.source_attack.describe(),
                "surrogate": type(self.surrogate).__name__,
                "surrogate_sha256": weights_sha256(self.surrogate)}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        parameter = next(self.surrogate.parameters(), None)  # a surrogate without any runs where x is
        device = x.device if parameter is None else parameter.device
        if device != x.device:  # a generator draws on its own device: seed one there from the caller's
            seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator(device=device).manual_seed(seed)
        x_adv = self.source_attack(self.surrogate, x.to(device), y.to(device),
                                   target=None if target is None else target.to(device), generator=generator)
        return x_adv.to(x.device, x.dtype)


def _final_iterate(attack: Attack) -> Attack:
    """``attack``, or for a PGD that keeps first hits a copy that returns its final iterates (early
    exit and probe, which rest on first hits, go with them)."""
    if not (isinstance(attack, PGD) and attack.keep_first_success):
        return attack
    final = copy.copy(attack)
    final.keep_first_success, final.early_stop, final.probe = False, False, False
    return final
