"""One attack step, two ways: the gradient through the loss, and the loss's closed-form logit gradient.

The gradient of the summed loss in the logits ``z`` has a closed form for both losses fortify's
training attacks ascend: ``softmax(z) - onehot(y)`` for the cross-entropy of PGD and FGSM
(``Attack.gradient_and_logits``), ``softmax(z) - p`` for ``sum_i KL(p_i || softmax(z_i))`` of
TRADES' ``KLAttack``. fortify hands it to autograd as the model's output gradient; the loss form
(what the reference implementations do) differentiates through the loss's log-softmaxes, gather or
product, and sum first. Both run here on small-cnn with channels_last weights (the CPU default),
batch 64, interleaved block by block, and the script prints the largest difference of the two
gradients and the median milliseconds per step.

    taskset -c 1 .venv/bin/python bench/closed_form_step.py --threads 1 --loss ce
    taskset -c 1 .venv/bin/python bench/closed_form_step.py --threads 1 --loss kl
    taskset -c 1 .venv/bin/python bench/closed_form_step.py --threads 1 --loss apgd-ce

``apgd-ce`` times APGD-CE's pass (``APGD._evaluate``: logits, per-example loss and input gradient),
which takes the closed form as PGD does, against the same pass through the loss.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from _common import NUM_CLASSES, print_provenance
from fortify.attacks import PGD
from fortify.attacks.apgd import APGD
from fortify.models import build_model
from fortify.models.layout import to_channels_last
from fortify.threat import ThreatModel
from fortify.training.paired import kl_to_clean

Step = Callable[[Tensor], Tensor]  # input gradient at a point that requires grad


def cross_entropy_steps(model: torch.nn.Module, x: Tensor, y: Tensor) -> dict[str, Step]:
    attack = PGD(ThreatModel("linf", 0.1))

    def through_the_loss(point: Tensor) -> Tensor:
        return torch.autograd.grad(F.cross_entropy(model(point), y, reduction="none").sum(), point)[0]

    def closed_form(point: Tensor) -> Tensor:
        return attack.gradient_and_logits(model, point, y, None)[0]
    return {"through the loss": through_the_loss, "closed form": closed_form}


class _APGDThroughTheLoss(APGD):
    def closed_form_applies(self, model: torch.nn.Module) -> bool:
        return False


def apgd_steps(model: torch.nn.Module, x: Tensor, y: Tensor) -> dict[str, Step]:
    threat = ThreatModel("linf", 0.1)
    closed, through = APGD(threat), _APGDThroughTheLoss(threat)

    def through_the_loss(point: Tensor) -> Tensor:
        return through._evaluate(model, point, y, None, need_grad=True)[2]

    def closed_form(point: Tensor) -> Tensor:
        return closed._evaluate(model, point, y, None, need_grad=True)[2]
    return {"through the loss": through_the_loss, "closed form": closed_form}


def kl_steps(model: torch.nn.Module, x: Tensor, y: Tensor) -> dict[str, Step]:
    with torch.no_grad():
        clean_logits = model(x)
        clean_probs = F.softmax(clean_logits, dim=1)

    def through_the_loss(point: Tensor) -> Tensor:
        return torch.autograd.grad(kl_to_clean(clean_logits, model(point)).sum(), point)[0]

    def closed_form(point: Tensor) -> Tensor:  # as KLAttack.perturb steps
        logits = model(point)
        ascent = F.softmax(logits.detach(), dim=1) - clean_probs
        return torch.autograd.grad(logits, point, grad_outputs=ascent)[0]
    return {"through the loss": through_the_loss, "closed form": closed_form}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss", choices=("ce", "kl", "apgd-ce"), default="ce")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_provenance([])
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), NUM_CLASSES).eval()
    to_channels_last(model)
    x = torch.rand(args.batch, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    point = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    steps_of = {"ce": cross_entropy_steps, "kl": kl_steps, "apgd-ce": apgd_steps}[args.loss]
    ways = steps_of(model, x, y)

    def step(name: str) -> Tensor:
        return ways[name](point.clone().requires_grad_(True))

    loss_form, closed = step("through the loss"), step("closed form")
    print(f"max difference of the two gradients: {(loss_form - closed).abs().max().item():.3g} "
          f"(largest entry {loss_form.abs().max().item():.3g}); "
          f"signs that differ: {int((loss_form.sign() != closed.sign()).sum())} of {closed.numel()}")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for block in range(args.blocks):
        order = list(ways) if block % 2 else list(reversed(ways))
        for name in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - started) / args.steps * 1e3)
    print(f"\nsmall-cnn, {args.loss} loss, batch {args.batch}, {args.blocks} blocks of {args.steps} steps, "
          f"{args.threads} thread(s)")
    for name, measured in times.items():
        print(f"{name:>17}: median {statistics.median(measured):.3f} ms / step, best {min(measured):.3f}")
    ratio = statistics.median(times["through the loss"]) / statistics.median(times["closed form"])
    print(f"through the loss / closed form: {ratio:.3f}")


if __name__ == "__main__":
    main()
