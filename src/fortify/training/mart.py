"""MART (Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples").

The loss is ``BCE(p(x_adv), y) + beta * mean_i KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_i))``:

- the boosted cross-entropy ``BCE = CE(x_adv, y) - log(1 - max_{k != y} p_k(x_adv))`` also pushes
  down the strongest wrong class;
- the KL term is weighted by how badly the clean example is classified, so misclassified examples
  get more of the robustness regulariser.

The adversarial points are PGD on the cross-entropy. The authors' code starts PGD at
``x + 0.001 * N(0, 1)``; fortify's PGD starts uniformly in the ball (the Madry start), which
only changes the first iterate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks import PGD, Attack
from fortify.models.predictions import at_least_fp32
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, scaled_step_size
from fortify.training.paired import PairedObjective, check_non_negative, kl_to_clean

# The authors' constants keep the log finite when the strongest wrong class has probability 1.
_ONE_PLUS = 1.0001
_LOG_FLOOR = 1e-12


def strongest_wrong_probability(probs: Tensor, y: Tensor) -> Tensor:
    """Per example, the largest probability among the classes other than ``y``."""
    others = probs.scatter(1, y.unsqueeze(1), -1.0)
    return others.amax(dim=1)


def boosted_cross_entropy(adv_logits: Tensor, y: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """MART's BCE, batch mean: CE plus a margin term on the strongest wrong class, in fp32 at least.

    In bf16 (the logits under ``train.amp``) ``1.0001`` rounds to 1 and a probability above about
    0.998 to 1, so the margin would become ``-log(1e-12)`` with a gradient of about 1e12.
    """
    adv_logits = at_least_fp32(adv_logits)
    probs = F.softmax(adv_logits, dim=1)
    margin = -torch.log(_ONE_PLUS - strongest_wrong_probability(probs, y) + _LOG_FLOOR)
    return F.cross_entropy(adv_logits, y, label_smoothing=label_smoothing) + margin.mean()


class MartObjective(PairedObjective):
    """MART with ``beta = 6.0`` by default: the paper's value for WideResNet and the default of the
    authors' released script (the paper uses 5 for ResNet-18)."""

    name = "mart"

    def __init__(self, options: ObjectiveOptions, *, beta: float = 6.0,
                 label_smoothing: float | None = None) -> None:
        self.beta = check_non_negative("mart beta", beta)
        super().__init__(options, label_smoothing=label_smoothing)

    def build_attack(self, threat: ThreatModel) -> Attack:
        return PGD(threat, steps=self.options.attack_steps,
                   step_size=scaled_step_size(self.options, threat), random_start=True,
                   keep_first_success=False)

    def loss_on(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        # fp32 loss heads under mixed precision too (Objective's docstring)
        clean_logits = at_least_fp32(model(x))
        adv_logits = at_least_fp32(model(x_adv))
        # the weight is not detached: the authors' code lets the gradient flow through p_y(x)
        clean_true = F.softmax(clean_logits, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        weighted_kl = kl_to_clean(clean_logits, adv_logits) * (1.0 - clean_true)
        bce = boosted_cross_entropy(adv_logits, y, label_smoothing=self.label_smoothing)
        return bce + self.beta * weighted_kl.mean()
