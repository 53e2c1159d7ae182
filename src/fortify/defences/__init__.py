"""Classic gradient-masking defences as opt-in model wrappers (inputs in the box, logits out).

They are here to be seen through: ``fortify.evaluation.masking`` flags each of them, and the
adaptive attacks in ``fortify.attacks.adaptive`` (EOT, BPDA) measure what they really withstand.
"""

from fortify.defences.base import DEFENCES, InputTransformDefence
from fortify.defences.distillation import DefensiveDistillation, distillation_loss
from fortify.defences.jpeg import JPEGCompression
from fortify.defences.quantize import InputQuantization
from fortify.defences.randomized import GaussianNoise, RandomResizePad

__all__ = ["DEFENCES", "DefensiveDistillation", "GaussianNoise", "InputQuantization",
           "InputTransformDefence", "JPEGCompression", "RandomResizePad", "distillation_loss"]
