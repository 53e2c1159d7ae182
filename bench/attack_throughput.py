"""Attack throughput on CPU: fortify's FGSM and PGD against torchattacks, IBM ART and Foolbox.

Every contender attacks the same model, the same examples, under the same thread count, in this one
process. After one warm-up round, each repeat runs every contender once, in an order shuffled
afresh (seeded) for each repeat, so that drift in the machine's speed falls on all contenders
alike. The table gives the median wall time, examples per second, the time relative to fortify's
plain attack of the same kind and to fortify's fastest row of that kind (the ratio the docs quote:
its early exit changes no returned point and its probe can only add fooled examples, see
``fortify.attacks.pgd``), the robust accuracy each attack left (a faster but weaker attack shows
here) and the model forward passes each one made (counted by a wrapper around the model). CPU s is
the process CPU time (all threads): on a shared, busy machine it drifts less than wall time. Page
faults are the process's minor faults during a run: memory the allocator got afresh from the OS.

    .venv/bin/python bench/attack_throughput.py --threads 2 --repeats 7 --batch 256
    .venv/bin/python bench/attack_throughput.py --model preact-resnet18 --shape 3,32,32 \
        --batch 32 --steps 10

The default setting trains the registered ``small-cnn`` on the embedded ``digits`` set for a few
epochs (no network needed) and attacks its test split; ``--objective pgd`` trains it adversarially
instead, where few examples fall and early exits save little. ``--model`` with another registered model
uses it randomly initialised (seeded) on uniform synthetic data of ``--shape``; labels are then the
model's own clean predictions, so clean accuracy is 100% and robust accuracy still says which
attack moved more points.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from _common import (
    CPU_KERNELS,
    NUM_CLASSES,
    ForwardCounter,
    Setting,
    accuracy,
    add_allocator_option,
    add_weights_option,
    apply_process_options,
    check_repeats,
    digits_setting,
    load_average,
    print_provenance,
    repeat_order,
    run_channels_last,
    settle_weights,
)
from fortify.attacks import FGSM, PGD
from fortify.models import build_model
from fortify.threat import ThreatModel

AttackFn = Callable[[Tensor, Tensor], Tensor]


# -- the model under attack --------------------------------------------------------------------


def synthetic_setting(args: argparse.Namespace) -> Setting:
    """A seeded random model on uniform inputs; labels are its own clean predictions."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.shape, NUM_CLASSES).eval()
    n = args.examples or args.batch
    x = torch.rand((n, *args.shape), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():  # not inference_mode: attacks use y inside autograd
        y = torch.cat([model(xb).argmax(1) for xb in x.split(args.batch)])
    shape = "x".join(map(str, args.shape))
    return Setting(f"{args.model} randomly initialised (seed {args.seed}), uniform synthetic "
                   f"{shape} inputs ({n} examples, labels = clean predictions)", model, x, y)


# -- contenders --------------------------------------------------------------------------------


@dataclass
class Contender:
    """One library's implementation of one attack, and what it measured."""

    group: str  # the attack, e.g. "PGD-10": rows of one group are compared with each other
    library: str
    run: AttackFn
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process, all its threads
    robust: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults of this process in the run
    escaped: int = 0  # points outside the threat model, summed over runs

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def fortify_contenders(model: nn.Module, threat: ThreatModel, steps: list[int], seed: int
                       ) -> list[Contender]:
    def bind(attack: FGSM | PGD) -> AttackFn:
        return lambda x, y: attack(model, x, y)

    rows = [Contender("FGSM", "fortify", bind(FGSM(threat, seed=seed)))]
    for k in steps:
        alpha = 2.5 * threat.eps / k
        plain = PGD(threat, steps=k, step_size=alpha, random_start=True, seed=seed)
        early = PGD(threat, steps=k, step_size=alpha, random_start=True, early_stop=True,
                    seed=seed)
        probed = PGD(threat, steps=k, step_size=alpha, random_start=True, early_stop=True,
                     probe=True, seed=seed)  # what `evaluate` and `fortify run` use
        rows.append(Contender(f"PGD-{k}", "fortify", bind(plain)))
        rows.append(Contender(f"PGD-{k}", "fortify early_stop", bind(early)))
        rows.append(Contender(f"PGD-{k}", "fortify early_stop probe", bind(probed)))
    return rows


def torchattacks_contenders(model: nn.Module, threat: ThreatModel, steps: list[int]
                            ) -> list[Contender]:
    import torchattacks

    rows = [Contender("FGSM", "torchattacks", torchattacks.FGSM(model, eps=threat.eps))]
    for k in steps:
        attack = torchattacks.PGD(model, eps=threat.eps, alpha=2.5 * threat.eps / k, steps=k,
                                  random_start=True)
        rows.append(Contender(f"PGD-{k}", "torchattacks", attack))
    return rows


def foolbox_contenders(model: nn.Module, threat: ThreatModel, steps: list[int]) -> list[Contender]:
    """Foolbox 3's FGSM and LinfPGD (same step size, one uniform random start)."""
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=threat.bounds)

    def bind(attack: object) -> AttackFn:
        def run(x: Tensor, y: Tensor) -> Tensor:
            _, clipped, _ = attack(fmodel, x, y, epsilons=threat.eps)  # type: ignore[operator]
            return clipped
        return run

    rows = [Contender("FGSM", "Foolbox", bind(foolbox.attacks.FGSM()))]
    for k in steps:
        attack = foolbox.attacks.LinfPGD(steps=k, abs_stepsize=2.5 * threat.eps / k, random_start=True)
        rows.append(Contender(f"PGD-{k}", "Foolbox", bind(attack)))
    return rows


def art_contenders(model: nn.Module, threat: ThreatModel, steps: list[int], batch: int,
                   input_shape: tuple[int, ...]) -> list[Contender]:
    """ART's FGM and PyTorch PGD; NumPy in and out, as ART's API requires."""
    import numpy as np
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                                   input_shape=input_shape, nb_classes=NUM_CLASSES,
                                   clip_values=threat.bounds, device_type="cpu")

    def bind(attack: object) -> AttackFn:
        def run(x: Tensor, y: Tensor) -> Tensor:
            return torch.from_numpy(attack.generate(x.numpy(), y.numpy()))  # type: ignore[attr-defined]
        return run

    rows = [Contender("FGSM", "ART", bind(FastGradientMethod(
        classifier, norm=np.inf, eps=threat.eps, batch_size=batch)))]
    for k in steps:
        attack = ProjectedGradientDescentPyTorch(
            classifier, norm=np.inf, eps=threat.eps, eps_step=2.5 * threat.eps / k, max_iter=k,
            num_random_init=1, batch_size=batch, verbose=False)
        rows.append(Contender(f"PGD-{k}", "ART", bind(attack)))
    return rows


def channels_last_rows(rows: list[Contender], model: nn.Module) -> list[Contender]:
    """The same attacks, each run on ``model`` as fortify's evaluation runs it on CPU
    (``run_channels_last``)."""
    return [Contender(c.group, f"{c.library} {CPU_KERNELS}", run_channels_last(c.run, model)) for c in rows]


def build_contenders(counted: ForwardCounter, threat: ThreatModel, args: argparse.Namespace,
                     input_shape: tuple[int, ...]) -> list[Contender]:
    rows = fortify_contenders(counted, threat, args.steps, args.seed)
    if args.channels_last:  # fortify's fastest row per attack, and every peer's rows below, once more
        rows += channels_last_rows([c for c in rows if c.library.startswith("fortify early_stop")
                                    or c.group == "FGSM"], counted)
    torchattacks_rows = torchattacks_contenders(counted, threat, args.steps)
    rows += torchattacks_rows + (channels_last_rows(torchattacks_rows, counted) if args.channels_last else [])
    try:
        foolbox_rows = foolbox_contenders(counted, threat, args.steps)
        rows += foolbox_rows + (channels_last_rows(foolbox_rows, counted) if args.channels_last else [])
    except ImportError as err:
        print(f"note: Foolbox skipped, not importable ({err})")
    if args.no_art:
        print("note: ART skipped (--no-art)")
    else:
        try:
            art = art_contenders(counted, threat, args.steps, args.batch, input_shape)
            rows += art + (channels_last_rows(art, counted) if args.channels_last else [])
        except ImportError as err:
            print(f"note: ART skipped, adversarial-robustness-toolbox is not importable ({err})")
    order = {"FGSM": 0, **{f"PGD-{k}": i + 1 for i, k in enumerate(args.steps)}}
    return sorted(rows, key=lambda c: order[c.group])  # stable: library order kept per group


# -- measuring ---------------------------------------------------------------------------------


def attack_all(contender: Contender, x: Tensor, y: Tensor, batch: int) -> Tensor:
    return torch.cat([contender.run(xb, yb)
                      for xb, yb in zip(x.split(batch), y.split(batch), strict=True)])


def measure(contender: Contender, setting: Setting, counted: ForwardCounter,
            threat: ThreatModel, batch: int) -> None:
    """Time one run over all examples; record robust accuracy and forward passes after it."""
    counted.reset()
    start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, start_cpu = time.perf_counter(), time.process_time()
    x_adv = attack_all(contender, setting.x, setting.y, batch)
    contender.seconds.append(time.perf_counter() - start)
    contender.cpu_seconds.append(time.process_time() - start_cpu)
    contender.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    contender.calls.append(counted.calls)
    contender.examples.append(counted.examples)
    contender.robust.append(accuracy(setting.model, x_adv, setting.y, batch))
    contender.escaped += int((~threat.contains(x_adv, setting.x)).sum())


def run_rounds(contenders: list[Contender], setting: Setting, counted: ForwardCounter,
               threat: ThreatModel, args: argparse.Namespace) -> None:
    for contender in contenders:  # warm-up round: allocator, kernels, lazy imports
        attack_all(contender, setting.x[:args.batch], setting.y[:args.batch], args.batch)
    for r in range(args.repeats):
        for contender in repeat_order(contenders, r, args.seed):
            measure(contender, setting, counted, threat, args.batch)
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr)


# -- reporting ---------------------------------------------------------------------------------


def print_header(args: argparse.Namespace, setting: Setting, threat: ThreatModel,
                 clean: float) -> None:
    print_provenance([("torchattacks", "torchattacks"), ("art", "adversarial-robustness-toolbox"),
                      ("foolbox", "foolbox")])
    print(f"setting:  {setting.description}; clean accuracy {clean:.2%}")
    print(f"attacks:  {threat.describe()}, untargeted; PGD step size 2.5*eps/steps, one random "
          f"start; batch {args.batch}; seed {args.seed}")
    print(f"timing:   1 warm-up round, then {args.repeats} interleaved repeats (order shuffled per repeat, "
          "seeded); "
          "medians")


def print_table(contenders: list[Contender], n: int, batch: int) -> None:
    baseline = {c.group: c.median_seconds for c in contenders if c.library == "fortify"}
    fastest: dict[str, float] = {}
    for c in contenders:
        if c.library.startswith("fortify"):
            fastest[c.group] = min(fastest.get(c.group, float("inf")), c.median_seconds)
    batches = -(-n // batch)
    print()
    print("| attack | library | median s | min-max s | examples/s | time / fortify | time / fastest fortify "
          "| CPU s | robust acc | forward calls | forwarded / n | page faults |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        median = c.median_seconds
        calls = statistics.median(c.calls)
        print(f"| {c.group} | {c.library} | {median:.3f} | "
              f"{min(c.seconds):.3f}-{max(c.seconds):.3f} | {n / median:,.0f} | "
              f"{median / baseline[c.group]:.2f} | {median / fastest[c.group]:.2f} | "
              f"{statistics.median(c.cpu_seconds):.3f} | "
              f"{statistics.median(c.robust):.2%} | "
              f"{calls:g} ({calls / batches:.3g}/batch) | "
              f"{statistics.median(c.examples) / n:.3g} | {statistics.median(c.faults):,.0f} |")
    escaped = [f"{c.library} {c.group}: {c.escaped}" for c in contenders if c.escaped]
    if escaped:
        print(f"\nwarning: points outside the threat model: {'; '.join(escaped)}")


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (>= 5)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--examples", type=int, default=None,
                        help="examples to attack (default: digits test split / one batch)")
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--steps", type=lambda s: [int(k) for k in s.split(",")],
                        default=[10, 50], help="PGD step counts, comma separated")
    parser.add_argument("--model", default="small-cnn",
                        help="small-cnn: trained on digits; any other registered model: random "
                             "init on synthetic data of --shape")
    parser.add_argument("--shape", type=lambda s: tuple(int(d) for d in s.split(",")),
                        default=(3, 32, 32), help="input shape for a synthetic setting")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--objective", default="standard",
                        help="training objective of the digits model (e.g. pgd for a robust one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-art", action="store_true", help="leave ART out")
    parser.add_argument("--channels-last", action="store_true",
                        help="also run fortify's fastest rows and every peer's on the model as fortify's "
                             "evaluation runs it on CPU: channels_last weights, linear layers on oneDNN "
                             "where that pays")
    add_weights_option(parser)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    check_repeats(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_process_options(args)
    setting = digits_setting(args) if args.model == "small-cnn" else synthetic_setting(args)
    threat = ThreatModel("linf", args.eps)
    weights = settle_weights(setting.model, args)
    counted = ForwardCounter(setting.model).eval()
    contenders = build_contenders(counted, threat, args, tuple(setting.x.shape[1:]))
    print_header(args, setting, threat, accuracy(setting.model, setting.x, setting.y, args.batch))
    print(weights)
    run_rounds(contenders, setting, counted, threat, args)
    print_table(contenders, setting.x.shape[0], args.batch)
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
