"""HopSkipJump's strength on large float32 inputs: fortify, ART and Foolbox against fortify in float64.

HopSkipJump's tolerances were chosen for float64: its probe radius (moved / d under L-inf) and its
bisection tolerance (theta) fall below a float32 unit in the last place from about 3x32x32 inputs
up, where a probe rounds to the point it probes and the boundary-normal estimate comes out 0. This
bench attacks two-class linear models, whose minimal distance has a closed form (margin over the
dual norm of the weight difference; the box does not bind for these inputs, which sit in [0.35,
0.65]), with every library at the same iterations and gradient-estimation sizes, and prints the
median of found distance / exact distance (1 is the optimum) and the median queries per example.
ART's HopSkipJump computes in float64 (NumPy's default) and its samples reach the float32 model
rounded; Foolbox's runs in the model's float32. Strength only: nothing here is timed.

    .venv/bin/python bench/hsj_precision.py --threads 1
    .venv/bin/python bench/hsj_precision.py --threads 1 --shapes 3x32x32 --norms linf --examples 16
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from _common import print_provenance
from fortify.attacks import HopSkipJump
from fortify.threat import ThreatModel

Search = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, x, y) -> adversarial points


class Counted(nn.Module):
    """The model, counting the rows it is asked about (each row is one query) and taking any float
    dtype in (ART hands over float64 samples)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.model(x.to(next(self.model.parameters()).dtype))


def linear_setting(shape: tuple[int, ...], n: int, seed: int) -> tuple[nn.Sequential, Tensor, Tensor]:
    """A two-class linear model whose boundary passes through the box's centre, n inputs near it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 2))
    with torch.no_grad():
        model[1].bias -= model(torch.full((1, *shape), 0.5))[0]
    x = 0.35 + 0.3 * torch.rand(n, *shape)
    return model.eval(), x, model(x).argmax(1)


def exact_distance(model: nn.Sequential, x: Tensor, y: Tensor, norm: str) -> Tensor:
    """margin / ||w_y - w_other||_dual, in float64: the distance to the boundary, box aside."""
    weight, bias = model[1].weight.detach().double(), model[1].bias.detach().double()
    difference = weight[y] - weight[1 - y]
    margin = (difference * x.double().flatten(1)).sum(1) + bias[y] - bias[1 - y]
    return margin / difference.norm(p=1 if norm == "linf" else 2, dim=1)


def fortify_search(args: argparse.Namespace, norm: str, dtype: torch.dtype) -> Search:
    attack = HopSkipJump(ThreatModel(norm, 0.1), max_iter=args.iterations, max_queries=1_000_000,
                         init_evals=100, max_evals=10_000, gamma=1.0, seed=args.seed)

    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return attack.minimal(model.to(dtype), x.to(dtype), y)[0].double()
    return run


def art_search(args: argparse.Namespace, norm: str) -> Search:
    from art.attacks.evasion import HopSkipJump as ArtHopSkipJump
    from art.estimators.classification import PyTorchClassifier

    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                                       input_shape=tuple(x.shape[1:]), nb_classes=2,
                                       clip_values=(0.0, 1.0), device_type="cpu")
        attack = ArtHopSkipJump(classifier, targeted=False, norm=np.inf if norm == "linf" else 2,
                                max_iter=args.iterations, max_eval=10_000, init_eval=100, init_size=100,
                                verbose=False)
        np.random.seed(args.seed)  # ART draws from NumPy's global generator
        return torch.from_numpy(attack.generate(x.numpy(), y.numpy())).double()
    return run


def foolbox_search(args: argparse.Namespace, norm: str) -> Search:
    import foolbox

    attack = foolbox.attacks.HopSkipJumpAttack(steps=args.iterations, initial_gradient_eval_steps=100,
                                               max_gradient_eval_steps=10_000, gamma=1.0, constraint=norm)

    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        torch.manual_seed(args.seed)
        points = attack(foolbox.PyTorchModel(model, bounds=(0.0, 1.0)), x, y, epsilons=None)[0]
        return points.double()
    return run


def contenders(args: argparse.Namespace, norm: str) -> list[tuple[str, Search]]:
    rows: list[tuple[str, Search]] = [
        ("fortify float64 (reference)", fortify_search(args, norm, torch.float64)),
        ("fortify float32", fortify_search(args, norm, torch.float32))]
    peers = (("ART", lambda: art_search(args, norm)), ("Foolbox", lambda: foolbox_search(args, norm)))
    for name, build in peers:
        try:
            rows.append((f"{name} float32 model", build()))
        except ImportError as err:
            print(f"note: {name} skipped, not importable ({err})")
    return rows


def measure(search: Search, model: nn.Module, x: Tensor, y: Tensor, norm: str) -> tuple[float, float, int]:
    """Median found / exact distance over the examples it fooled, median queries, and how many fooled."""
    counted = Counted(copy.deepcopy(model))
    points = search(counted, x, y)
    with torch.no_grad():
        fooled = model(points.float()).argmax(1) != y
    threat = ThreatModel(norm, 0.1)
    ratio = threat.distance(points, x.double()) / exact_distance(model, x, y, norm)
    median_ratio = float(ratio[fooled].median()) if fooled.any() else math.inf
    return median_ratio, counted.rows / len(x), int(fooled.sum())


def shape_list(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(side) for side in item.split("x")) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", type=shape_list, default=shape_list("1x8x8,3x32x32,3x64x64"))
    parser.add_argument("--norms", type=lambda s: s.split(","), default=["linf", "l2"])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any(norm not in ("linf", "l2") for norm in args.norms):
        parser.error(f"--norms takes linf and l2, got {args.norms}")
    torch.set_num_threads(args.threads)
    print_provenance([("art", "adversarial-robustness-toolbox"), ("foolbox", "foolbox")])
    print(f"setting:  two-class linear models, {args.examples} inputs each in [0.35, 0.65]; HopSkipJump "
          f"untargeted, {args.iterations} iterations, 100 gradient samples growing as sqrt(t) to at most "
          f"10,000, gamma 1; seed {args.seed}\n")
    print("| input | norm | library | found / exact distance (median) | queries per example | fooled |")
    print("|---|---|---|---:|---:|---:|")
    for shape in args.shapes:
        model, x, y = linear_setting(shape, args.examples, args.seed)
        for norm in args.norms:
            for name, search in contenders(args, norm):
                ratio, queries, fooled = measure(search, model, x, y, norm)
                print(f"| {'x'.join(map(str, shape))} | {norm} | {name} | {ratio:.3f} | {queries:,.0f} | "
                      f"{fooled}/{len(x)} |", flush=True)


if __name__ == "__main__":
    main()
