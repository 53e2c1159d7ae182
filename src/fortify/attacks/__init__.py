"""Attacks: callables ``attack(model, x, y) -> x_adv`` that stay inside a ThreatModel."""

from fortify.attacks.base import ATTACKS, Attack
from fortify.attacks.fgsm import FGSM
from fortify.attacks.pgd import PGD

__all__ = ["ATTACKS", "Attack", "FGSM", "PGD"]
