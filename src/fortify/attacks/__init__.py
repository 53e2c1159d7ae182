"""Attacks: callables ``attack(model, x, y) -> x_adv`` that stay inside a ThreatModel.

Importing this package registers every attack in ``ATTACKS``.
"""

from fortify.attacks.apgd import APGD, APGDTargeted
from fortify.attacks.base import ATTACKS, Attack
from fortify.attacks.cw import CarliniWagnerL2
from fortify.attacks.fab import FAB, FABTargeted
from fortify.attacks.fgsm import FGSM
from fortify.attacks.fmn import FMN, MinimalNormAttack
from fortify.attacks.hopskipjump import HopSkipJump
from fortify.attacks.pgd import PGD
from fortify.attacks.square import Square
from fortify.attacks.transfer import Transfer

ATTACKS.add("transfer", Transfer)

__all__ = ["APGD", "ATTACKS", "APGDTargeted", "Attack", "CarliniWagnerL2", "FAB", "FABTargeted", "FGSM",
           "FMN", "HopSkipJump", "MinimalNormAttack", "PGD", "Square", "Transfer"]
