"""One step of TRADES' KL attack, two ways: the gradient through the KL loss, and its closed form.

The gradient of ``sum_i KL(p_i || softmax(z_i))`` in the logits ``z`` is ``softmax(z) - p``.
fortify's ``KLAttack`` hands that to autograd as the output gradient of the model; the loss form
(what it did before, and what the authors' code does) differentiates through two log-softmaxes, a
product and a sum first. Both run here on small-cnn with channels_last weights (the CPU default),
batch 64, interleaved block by block, and the script prints the median milliseconds per step.

    taskset -c 1 .venv/bin/python bench/trades_attack_step.py --threads 1
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
from fortify.models import build_model
from fortify.models.layout import to_channels_last
from fortify.training.paired import kl_to_clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
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
    point = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        clean_logits = model(x)
        clean_probs = F.softmax(clean_logits, dim=1)

    def through_the_loss() -> Tensor:
        start = point.clone().requires_grad_(True)
        return torch.autograd.grad(kl_to_clean(clean_logits, model(start)).sum(), start)[0]

    def closed_form() -> Tensor:
        start = point.clone().requires_grad_(True)
        logits = model(start)
        ascent = F.softmax(logits.detach(), dim=1) - clean_probs
        return torch.autograd.grad(logits, start, grad_outputs=ascent)[0]

    gap = (through_the_loss() - closed_form()).abs().max().item()
    print(f"max difference of the two gradients: {gap:.3g} "
          f"(largest entry {through_the_loss().abs().max().item():.3g})")
    ways: dict[str, Callable[[], Tensor]] = {"through the loss": through_the_loss, "closed form": closed_form}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for block in range(args.blocks):
        order = list(ways) if block % 2 else list(reversed(ways))
        for name in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                ways[name]()
            times[name].append((time.perf_counter() - started) / args.steps * 1e3)
    print(f"\nsmall-cnn, batch {args.batch}, {args.blocks} blocks of {args.steps} steps, "
          f"{args.threads} thread(s)")
    for name, measured in times.items():
        print(f"{name:>17}: median {statistics.median(measured):.3f} ms / step, best {min(measured):.3f}")
    ratio = statistics.median(times["through the loss"]) / statistics.median(times["closed form"])
    print(f"through the loss / closed form: {ratio:.3f}")


if __name__ == "__main__":
    main()
