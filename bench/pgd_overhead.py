"""How much of fortify's PGD `early_stop` time is the model's own passes: the attack against a bare loop.

The attack runs once with a hook that records the batch size of every forward pass it makes and
whether that pass records a graph. The bare loop then replays exactly those passes, forward and
(where the attack took a gradient) backward to the input, on random inputs of the same sizes, with
nothing else: no projection, no bookkeeping of hits, no indexing. Both run interleaved in this
process; the ratio bare / attack is the share of the attack's time that its passes alone need,
i.e. how much faster the attack could get with no overhead at all.

    .venv/bin/python bench/pgd_overhead.py --threads 1 --repeats 21 --channels-last
    .venv/bin/python bench/pgd_overhead.py --threads 1 --repeats 21 --channels-last --objective pgd --probe
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import (
    NUM_CLASSES,
    add_allocator_option,
    apply_process_options,
    check_repeats,
    digits_setting,
    load_average,
    print_provenance,
)
from fortify.attacks import PGD
from fortify.models.layout import channels_last
from fortify.threat import ThreatModel

Pass = tuple[int, bool]  # (examples, with a backward pass to the input)


def recorded_passes(model: nn.Module, attack: Callable[[], Tensor]) -> list[Pass]:
    passes: list[Pass] = []
    hook = model.register_forward_pre_hook(
        lambda _m, inputs: passes.append((inputs[0].shape[0], torch.is_grad_enabled())))
    try:
        attack()
    finally:
        hook.remove()
    return passes


def bare_loop(model: nn.Module, passes: list[Pass], shape: tuple[int, ...], seed: int
              ) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(seed)
    inputs = [(torch.rand((n, *shape), generator=generator),
               torch.randint(0, NUM_CLASSES, (n,), generator=generator), grad) for n, grad in passes]

    def run() -> None:
        for x, y, grad in inputs:
            x = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                loss = F.cross_entropy(model(x), y, reduction="none")
            if grad:
                torch.autograd.grad(loss.sum(), x)
    return run


def self_times(run: Callable[[], object], repeats: int) -> dict[str, float]:
    """torch.profiler's self CPU time of each operator, in us per call of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    return {event.key: event.self_cpu_time_total / repeats for event in prof.key_averages()}


def print_operator_gaps(attack: Callable[[], object], bare: Callable[[], object], repeats: int) -> None:
    """The operators whose self time the attack exceeds the bare passes' by most."""
    in_attack, in_bare = self_times(attack, repeats), self_times(bare, repeats)
    gaps = sorted(((in_attack.get(op, 0.0) - in_bare.get(op, 0.0), op) for op in in_attack | in_bare),
                  reverse=True)
    print(f"\noperators (torch.profiler, {repeats} calls each; self CPU us per call):\n")
    print("| operator | attack | bare passes | attack - bare |")
    print("|---|---:|---:|---:|")
    for gap, op in gaps[:15]:
        print(f"| {op} | {in_attack.get(op, 0.0):.0f} | {in_bare.get(op, 0.0):.0f} | {gap:+.0f} |")
    print(f"| all | {sum(in_attack.values()):.0f} | {sum(in_bare.values()):.0f} | "
          f"{sum(in_attack.values()) - sum(in_bare.values()):+.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--channels-last", action="store_true", help="both with channels_last weights")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--objective", default="standard",
                        help="training objective of the digits model (pgd for a robust one)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the operators whose time the attack adds (torch.profiler)")
    parser.add_argument("--probe", action="store_true",
                        help="PGD with its probe of FGSM's corner, as `evaluate` runs it")
    add_allocator_option(parser)
    args = parser.parse_args()
    check_repeats(parser, args)
    apply_process_options(args)
    setting = digits_setting(args)
    model = setting.model.eval()
    pgd = PGD(ThreatModel("linf", args.eps), steps=args.steps, early_stop=True, probe=args.probe,
              seed=args.seed)

    def attack() -> Tensor:
        return torch.cat([pgd(model, xb, yb) for xb, yb in
                          zip(setting.x.split(args.batch), setting.y.split(args.batch), strict=True)])

    print_provenance([])
    print(f"setting:  {setting.description}; PGD-{args.steps} early_stop, linf eps {args.eps}, batch "
          f"{args.batch}, channels_last {'on' if args.channels_last else 'off'}")
    layout = channels_last(model) if args.channels_last else contextlib.nullcontext(model)
    with layout, torch.enable_grad():
        passes = recorded_passes(model, attack)
        bare = bare_loop(model, passes, tuple(setting.x.shape[1:]), args.seed)
        times: dict[str, list[float]] = {"attack": [], "bare passes": []}
        runs = {"attack": attack, "bare passes": bare}
        for fn in runs.values():  # warm-up
            fn()
        for r in range(args.repeats):
            for name in (("attack", "bare passes") if r % 2 == 0 else ("bare passes", "attack")):
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        if args.profile:
            print_operator_gaps(attack, bare, args.repeats)
    examples = sum(n for n, _ in passes)
    print(f"passes:   {len(passes)} forward calls, {examples / setting.x.shape[0]:.3g} passes per example "
          f"(batch sizes {', '.join(str(n) for n, _ in passes)})")
    print(f"timing:   {args.repeats} alternating repeats; medians\n")
    attack_median = statistics.median(times["attack"])
    print("| run | median ms | min-max ms | of the attack's time |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} | "
              f"{median / attack_median:.2f} |")
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
