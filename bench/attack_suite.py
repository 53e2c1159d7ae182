"""The stronger attacks on CPU against the peers: APGD-CE, the AutoAttack ensemble, Square, and the
minimal-norm attacks C&W L2, FMN, FAB and HopSkipJump.

Every contender attacks the same model (small-cnn trained on the embedded digits set), the same
examples, under the same thread count, in this one process: one warm-up round, then repeats in
which every contender runs once, in an order shuffled afresh (seeded) for each repeat. Budgets are
equal across libraries within a group (same iterations, restarts, queries, binary-search steps,
step sizes). The model is wrapped in a counter of forward and backward passes. The table gives
median wall time, examples/s, time relative to fortify, the passes, and what the attack achieved:
robust accuracy for the eps-bounded attacks; for the minimal-norm attacks the success rate, the
median norm of the successful perturbations and the median found norm over all clean-correct
examples (inf where not fooled), in the norm the group names, and after the table whether each
fortify row fools at least as many examples as each peer's at every radius. A faster but weaker
attack is visible as weaker. Every returned point is checked: inside the eps-ball and the box for
the bounded attacks, inside the box for the minimal-norm ones; a point outside counts as no attack
(the example keeps its clean outcome), and the rows that returned any are named after the table.
fortify's AutoAttack row returns its robust mask, not points: ``evaluate`` checks those itself.
``--cw-offset`` moves the C&W examples past those a budget was chosen on, to check that budget on
examples it has not seen.

    .venv/bin/python bench/attack_suite.py --threads 1 --repeats 5
    .venv/bin/python bench/attack_suite.py --attacks apgd,square --repeats 5 --examples 128
    .venv/bin/python bench/attack_suite.py --attacks fmn,fab,hsj --repeats 5
"""

from __future__ import annotations

import argparse
import logging
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
    median,
    print_provenance,
    repeat_order,
    run_channels_last,
    settle_weights,
)
from fortify.attacks import APGD, FAB, FMN, CarliniWagnerL2, HopSkipJump, Square
from fortify.config import EvalConfig
from fortify.evaluation.robustness import evaluate
from fortify.pipeline import build_attacks
from fortify.threat import ThreatModel

ATTACK_CHOICES = ("apgd", "autoattack", "cw", "square", "fmn", "fab", "hsj")
NORM_RTOL = 0.01  # minimal-norm strength: a found norm up to 1% larger at the same rank counts as equal


@dataclass
class Outcome:
    """What one run returned: the adversarial points, or (for an ensemble) the robust mask."""

    x_adv: Tensor | None = None
    robust: Tensor | None = None


# A contender attacks all examples, in batches of its own choosing: (x, y) -> Outcome
RunFn = Callable[[Tensor, Tensor], Outcome]


@dataclass
class Contender:
    group: str  # rows of one group share a budget and are compared with each other
    library: str
    run: RunFn
    limit: int | None = None  # attack only ``limit`` examples from ``start`` (C&W in ART is slow)
    norm: str | None = None  # minimal-norm groups: the norm their found points are measured in
    seconds: list[float] = field(default_factory=list)
    forward: list[int] = field(default_factory=list)  # examples forwarded
    backward: list[int] = field(default_factory=list)  # examples back-propagated
    robust: list[float] = field(default_factory=list)
    # minimal-norm groups, in the group's norm:
    success: list[float] = field(default_factory=list)  # share of clean-correct examples fooled
    found_norm: list[float] = field(default_factory=list)  # median norm of successful perturbations
    radius: list[float] = field(default_factory=list)  # median found norm, inf where not fooled
    norm_runs: list[Tensor] = field(default_factory=list)  # found norm per clean-correct example, per run
    outside: int = 0  # returned points outside the ball or box, over all runs (they count as not fooled)
    start: int = 0  # the first example attacked

    def examples(self, setting: Setting) -> tuple[Tensor, Tensor]:
        stop = None if self.limit is None else self.start + self.limit
        return setting.x[self.start:stop], setting.y[self.start:stop]


def batched(attack: Callable[[Tensor, Tensor], Tensor], batch: int) -> RunFn:
    def run(x: Tensor, y: Tensor) -> Outcome:
        return Outcome(x_adv=torch.cat([attack(xb, yb) for xb, yb in
                                        zip(x.split(batch), y.split(batch), strict=True)]))
    return run


# -- contenders, by group ----------------------------------------------------------------------


def apgd_group(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> list[Contender]:
    group, n_iter = f"APGD-CE-{args.apgd_iter}", args.apgd_iter
    rows = []
    for early in (False, True):
        attack = APGD(threat, loss="ce", n_iter=n_iter, restarts=1, early_stop=early, seed=args.seed)
        label = "fortify early_stop" if early else "fortify"
        rows.append(Contender(group, label, batched(lambda x, y, a=attack: a(model, x, y), args.batch)))
    if args.channels_last:
        early_stop = rows[-1].run
        rows.append(Contender(group, f"fortify early_stop {CPU_KERNELS}",
                              run_channels_last(early_stop, model)))
    rows += peer(lambda: Contender(group, "torchattacks", batched(_torchattacks_apgd(model, threat, args),
                                                                  args.batch)), "torchattacks")
    rows += peer(lambda: Contender(group, "pyautoattack", batched(_autoattack_apgd(model, threat, args),
                                                                  args.batch)), "pyautoattack")
    return rows


def _torchattacks_apgd(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> Callable:
    import torchattacks

    return torchattacks.APGD(model, norm="Linf", eps=threat.eps, steps=args.apgd_iter, n_restarts=1,
                             loss="ce", seed=args.seed)


def _autoattack_apgd(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> Callable:
    from pyautoattack.autopgd_base import APGDAttack

    attack = APGDAttack(model, n_iter=args.apgd_iter, norm="Linf", n_restarts=1, eps=threat.eps,
                        seed=args.seed, loss="ce", device="cpu")
    return attack.perturb


def autoattack_group(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> list[Contender]:
    group = "AutoAttack (standard)"
    config = EvalConfig(preset="autoattack", batch_size=args.batch, seed=args.seed)
    attacks = build_attacks(config, threat, NUM_CLASSES)

    def fortify_cascade(x: Tensor, y: Tensor) -> Outcome:
        report = evaluate(model, x, y, attacks, threat, batch_size=args.batch, cascade=True, eps_grid=None)
        robust = torch.tensor(report.clean_correct)
        for result in report.attacks:
            robust &= torch.tensor(result.robust)
        return Outcome(robust=robust)

    rows = [Contender(group, "fortify", fortify_cascade)]
    rows += peer(lambda: Contender(group, "pyautoattack", _autoattack_standard(model, threat, args)),
                 "pyautoattack")
    return rows


def _autoattack_standard(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> RunFn:
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its progress lines, not results

    def run(x: Tensor, y: Tensor) -> Outcome:
        ensemble = AutoAttack(model, device="cpu", eps=threat.eps, norm="Linf", seed=args.seed,
                              version="standard")
        x_adv, _ = ensemble.run_standard_evaluation(x, y, batch_size=args.batch)
        return Outcome(x_adv=x_adv)
    return run


def cw_group(model: nn.Module, args: argparse.Namespace) -> list[Contender]:
    """Two groups: torchattacks' C&W has one fixed constant, ART's a binary search over it.

    In the search group both libraries run at the shared budget (``--cw-steps`` Adam steps per
    constant, lr 0.01) and at a second budget each: fortify with ``--cw-tuned`` steps and learning
    rate, ART with ``--cw-art-short-steps`` steps (its line search converges within fewer). fortify
    also runs with ``warm_start`` (each round from where the last ended) at the shared budget and at
    ``--cw-warm``. Which row is at least as strong as which is printed after the table
    (``print_dominance``).
    """
    threat = ThreatModel("l2", 1.0)  # minimal() seeks the smallest perturbation; eps plays no part
    steps, searches, lr = args.cw_steps, args.cw_searches, 0.01
    single = f"C&W-L2 1x{steps} (c=1)"
    search = f"C&W-L2 search {searches}x (c0=0.1)"

    def fortify(b: int, c: float, steps: int = steps, lr: float = lr, warm: bool = False) -> RunFn:
        attack = CarliniWagnerL2(threat, steps=steps, binary_search_steps=b, initial_const=c,
                                 learning_rate=lr, abort_early=True, warm_start=warm, seed=args.seed)
        return batched(lambda x, y: attack.minimal(model, x, y)[0], args.batch)

    def search_row(label: str, run: RunFn) -> Contender:
        return Contender(search, label, run, limit, "l2", start=args.cw_offset)

    limit = args.cw_examples
    rows = [Contender(single, "fortify", fortify(1, 1.0), limit, "l2", start=args.cw_offset)]
    rows += peer(lambda: Contender(single, "torchattacks", batched(_torchattacks_cw(model, steps, lr),
                                                                    args.batch), limit, "l2",
                                   start=args.cw_offset), "torchattacks")
    rows.append(search_row(f"fortify {steps} steps lr {lr:g}", fortify(searches, 0.1)))
    rows.append(search_row(f"fortify {steps} steps lr {lr:g} warm start", fortify(searches, 0.1, warm=True)))
    tuned_steps, tuned_lr = args.cw_tuned
    warm_steps, warm_lr = args.cw_warm
    rows.append(search_row(f"fortify {tuned_steps} steps lr {tuned_lr:g}",
                           fortify(searches, 0.1, tuned_steps, tuned_lr)))
    rows.append(search_row(f"fortify {warm_steps} steps lr {warm_lr:g} warm start",
                           fortify(searches, 0.1, warm_steps, warm_lr, warm=True)))
    if args.channels_last:
        rows.append(search_row(f"fortify {tuned_steps} steps lr {tuned_lr:g} {CPU_KERNELS}",
                               run_channels_last(fortify(searches, 0.1, tuned_steps, tuned_lr), model)))
        rows.append(search_row(f"fortify {warm_steps} steps lr {warm_lr:g} warm start {CPU_KERNELS}",
                               run_channels_last(fortify(searches, 0.1, warm_steps, warm_lr, warm=True),
                                                 model)))
    if args.cw_long_steps:  # ART's line search does more per step: a longer fortify run for equal strength
        rows.append(search_row(f"fortify {args.cw_long_steps} steps lr {lr:g}",
                               fortify(searches, 0.1, args.cw_long_steps)))
    rows += peer(lambda: search_row(f"Foolbox {steps} steps lr {lr:g}",
                                    _foolbox_cw(model, steps, searches, lr, args)), "foolbox")
    for art_steps in (steps, args.cw_art_short_steps):
        rows += peer(lambda s=art_steps: search_row(f"ART {s} steps lr {lr:g}",
                                                    _art_cw(model, s, searches, lr, args)), "art")
    if args.channels_last:  # ART's quickest budget on the channels_last model too
        short = args.cw_art_short_steps
        rows += peer(lambda: search_row(f"ART {short} steps lr {lr:g} {CPU_KERNELS}",
                                        run_channels_last(_art_cw(model, short, searches, lr, args), model)),
                     "art")
    return rows


def _torchattacks_cw(model: nn.Module, steps: int, lr: float) -> Callable:
    import torchattacks

    return torchattacks.CW(model, c=1.0, kappa=0, steps=steps, lr=lr)


def _foolbox_cw(model: nn.Module, steps: int, searches: int, lr: float, args: argparse.Namespace) -> RunFn:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    attack = foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=searches, steps=steps, stepsize=lr,
                                                   confidence=0.0, initial_const=0.1, abort_early=True)

    def run(x: Tensor, y: Tensor) -> Tensor:
        best, _, _ = attack(fmodel, x, y, epsilons=None)  # unbounded: the smallest point found
        # Foolbox starts its best points at all zeros and leaves them there where it found none;
        # tanh space never reaches the box face exactly, so an all-zero row means "not found"
        not_found = best.flatten(1).abs().amax(dim=1) == 0
        return torch.where(not_found.reshape(-1, *([1] * (x.dim() - 1))), x, best)
    return batched(run, args.batch)


def _art_cw(model: nn.Module, steps: int, searches: int, lr: float, args: argparse.Namespace) -> RunFn:
    from art.attacks.evasion import CarliniL2Method

    attack = CarliniL2Method(art_classifier(model, args), confidence=0.0, learning_rate=lr,
                             binary_search_steps=searches, max_iter=steps, initial_const=0.1,
                             batch_size=args.batch, verbose=False)
    return numpy_run(attack)


def square_group(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> list[Contender]:
    group, queries = f"Square-{args.queries}", args.queries
    attack = Square(threat, n_queries=queries, p_init=0.8, seed=args.seed)
    rows = [Contender(group, "fortify", batched(lambda x, y: attack(model, x, y), args.batch))]
    rows += peer(lambda: Contender(group, "torchattacks", batched(_torchattacks_square(model, threat, args),
                                                                  args.batch)), "torchattacks")
    rows += peer(lambda: Contender(group, "pyautoattack", batched(_autoattack_square(model, threat, args),
                                                                  args.batch)), "pyautoattack")
    rows += peer(lambda: Contender(group, "ART", _art_square(model, threat, args)), "art")
    return rows


def _torchattacks_square(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> Callable:
    import torchattacks

    return torchattacks.Square(model, norm="Linf", eps=threat.eps, n_queries=args.queries, n_restarts=1,
                               p_init=0.8, loss="margin", resc_schedule=True, seed=args.seed)


def _autoattack_square(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> Callable:
    from pyautoattack.square import SquareAttack

    # resc_schedule=True: the p schedule stretched to the query budget, as fortify, torchattacks and ART do
    attack = SquareAttack(model, norm="Linf", n_queries=args.queries, eps=threat.eps, p_init=0.8,
                          n_restarts=1, seed=args.seed, loss="margin", resc_schedule=True, device="cpu")
    return attack.perturb


def _art_square(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> RunFn:
    import numpy as np
    from art.attacks.evasion import SquareAttack

    attack = SquareAttack(art_classifier(model, args), norm=np.inf, max_iter=args.queries, eps=threat.eps,
                          p_init=0.8, nb_restarts=1, batch_size=args.batch, verbose=False)
    return numpy_run(attack)


NORM_LABEL = {"linf": "Linf", "l2": "L2"}


def fmn_group(model: nn.Module, args: argparse.Namespace) -> list[Contender]:
    """FMN (Pintor et al. 2021) in both norms against Foolbox's, at the same steps and schedules'
    defaults (the parity test's setting, docs/ATTACKS.md)."""
    rows = []
    for norm in ("linf", "l2"):
        group = f"FMN-{NORM_LABEL[norm]} {args.fmn_steps} steps"
        attack = FMN(ThreatModel(norm, 1.0), steps=args.fmn_steps, seed=args.seed)
        rows.append(Contender(group, "fortify", batched(lambda x, y, a=attack: a.minimal(model, x, y)[0],
                                                        args.batch), norm=norm))
        rows += peer(lambda g=group, n=norm: Contender(g, "Foolbox", _foolbox_fmn(model, n, args), norm=n),
                     "foolbox")
    return rows


def _foolbox_fmn(model: nn.Module, norm: str, args: argparse.Namespace) -> RunFn:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    build = {"linf": foolbox.attacks.LInfFMNAttack, "l2": foolbox.attacks.L2FMNAttack}[norm]
    if norm == "l2" and not args.foolbox_fmn_as_shipped:
        build = _projected_l2_fmn(foolbox)
    attack = build(steps=args.fmn_steps)
    return batched(lambda x, y: attack(fmodel, x, y, epsilons=None)[0], args.batch)


def _projected_l2_fmn(foolbox):
    """Foolbox 3.3.4's L2FMNAttack with the projection its code means. As shipped, its factor
    ``norms / norms`` is always 1, so it never projects onto its ball and climbs the gradient
    unconstrained: a different (weaker) attack than FMN, at the same cost."""
    import eagerpy as ep
    from foolbox.devutils import atleast_kd, flatten

    class ProjectedL2FMN(foolbox.attacks.L2FMNAttack):
        def project(self, x, x0, epsilon):
            norms = ep.maximum(flatten(x - x0).norms.l2(axis=-1), 1e-12)
            return x0 + (x - x0) * atleast_kd(ep.minimum(1, epsilon / norms), x.ndim)

    return ProjectedL2FMN


def fab_group(model: nn.Module, args: argparse.Namespace) -> list[Contender]:
    """Untargeted FAB (Croce & Hein 2020), one restart from x, against pyautoattack's and
    torchattacks' ports of the authors' code; their eps is set to the box's diameter in the norm,
    so that it keeps every point found and they return their minimal points as fortify does."""
    rows = []
    diameter = {"linf": 1.0, "l2": float(torch.tensor(args.input_shape).prod().sqrt())}
    for norm in ("linf", "l2"):
        group = f"FAB-{NORM_LABEL[norm]} {args.fab_steps} steps"
        attack = FAB(ThreatModel(norm, 1.0), steps=args.fab_steps, restarts=1, seed=args.seed)
        rows.append(Contender(group, "fortify", batched(lambda x, y, a=attack: a.minimal(model, x, y)[0],
                                                        args.batch), norm=norm))
        reach = diameter[norm]
        rows += peer(lambda g=group, n=norm, e=reach: Contender(
            g, "pyautoattack", batched(_autoattack_fab(model, n, e, args), args.batch), norm=n),
            "pyautoattack")
        rows += peer(lambda g=group, n=norm, e=reach: Contender(
            g, "torchattacks", batched(_torchattacks_fab(model, n, e, args), args.batch), norm=n),
            "torchattacks")
    return rows


def _autoattack_fab(model: nn.Module, norm: str, reach: float, args: argparse.Namespace) -> Callable:
    from pyautoattack.fab_pt import FABAttack_PT

    return FABAttack_PT(model, norm=NORM_LABEL[norm], n_restarts=1, n_iter=args.fab_steps, eps=reach,
                        alpha_max=0.1, eta=1.05, beta=0.9, seed=args.seed, device="cpu").perturb


def _torchattacks_fab(model: nn.Module, norm: str, reach: float, args: argparse.Namespace) -> Callable:
    import torchattacks

    return torchattacks.FAB(model, norm=NORM_LABEL[norm], eps=reach, steps=args.fab_steps, n_restarts=1,
                            alpha_max=0.1, eta=1.05, beta=0.9, seed=args.seed, multi_targeted=False,
                            n_classes=NUM_CLASSES)


def hsj_group(model: nn.Module, args: argparse.Namespace) -> list[Contender]:
    """HopSkipJump L2, untargeted, label-only, against ART's and Foolbox's at the same iterations
    and gradient-estimation sizes (100 growing as sqrt(t), at most 10,000); fortify's query cap is
    set past what those iterations spend, so that the iterations bind for all three. The queries
    each spent are the forward column."""
    group, limit = f"HopSkipJump-L2 {args.hsj_iter} iterations", args.hsj_examples
    attack = HopSkipJump(ThreatModel("l2", 1.0), max_iter=args.hsj_iter, max_queries=1_000_000,
                         init_evals=100, max_evals=10_000, gamma=1.0, seed=args.seed)
    rows = [Contender(group, "fortify", batched(lambda x, y: attack.minimal(model, x, y)[0], args.batch),
                      limit, "l2")]
    rows += peer(lambda: Contender(group, "ART", _art_hsj(model, args), limit, "l2"), "art")
    rows += peer(lambda: Contender(group, "Foolbox", _foolbox_hsj(model, args), limit, "l2"), "foolbox")
    return rows


class AsFloat32(nn.Module):
    """ART's HopSkipJump hands the classifier float64 samples (NumPy's default); the model is float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.float())


def _art_hsj(model: nn.Module, args: argparse.Namespace) -> RunFn:
    from art.attacks.evasion import HopSkipJump as ArtHopSkipJump

    classifier = art_classifier(AsFloat32(model), args)
    attack = ArtHopSkipJump(classifier, batch_size=args.batch, targeted=False, norm=2, max_iter=args.hsj_iter,
                            max_eval=10_000, init_eval=100, init_size=100, verbose=False)
    run = numpy_run(attack)
    return lambda x, y: Outcome(x_adv=run(x, y).x_adv.float())


def _foolbox_hsj(model: nn.Module, args: argparse.Namespace) -> RunFn:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    attack = foolbox.attacks.HopSkipJumpAttack(steps=args.hsj_iter, initial_gradient_eval_steps=100,
                                               max_gradient_eval_steps=10_000, gamma=1.0, constraint="l2")
    return batched(lambda x, y: attack(fmodel, x, y, epsilons=None)[0], args.batch)


def art_classifier(model: nn.Module, args: argparse.Namespace) -> object:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=args.input_shape,
                             nb_classes=NUM_CLASSES, clip_values=(0.0, 1.0), device_type="cpu")


def numpy_run(attack: object) -> RunFn:
    """ART takes and returns NumPy arrays and batches on its own."""
    def run(x: Tensor, y: Tensor) -> Outcome:
        return Outcome(x_adv=torch.from_numpy(attack.generate(x.numpy(), y.numpy())))  # type: ignore[attr-defined]
    return run


def peer(build: Callable[[], Contender], module: str) -> list[Contender]:
    """The peer's row, or none (with a note) when its library is not importable."""
    try:
        return [build()]
    except ImportError as err:
        print(f"note: {module} skipped, not importable ({err})")
        return []


def build_contenders(model: nn.Module, threat: ThreatModel, args: argparse.Namespace) -> list[Contender]:
    rows: list[Contender] = []
    if "apgd" in args.attacks:
        rows += apgd_group(model, threat, args)
    if "autoattack" in args.attacks:
        rows += autoattack_group(model, threat, args)
    if "cw" in args.attacks:
        rows += cw_group(model, args)
    if "square" in args.attacks:
        rows += square_group(model, threat, args)
    if "fmn" in args.attacks:
        rows += fmn_group(model, args)
    if "fab" in args.attacks:
        rows += fab_group(model, args)
    if "hsj" in args.attacks:
        rows += hsj_group(model, args)
    return rows


# -- measuring ---------------------------------------------------------------------------------


def measure(contender: Contender, setting: Setting, counted: ForwardCounter, threat: ThreatModel,
            args: argparse.Namespace) -> None:
    x, y = contender.examples(setting)
    counted.reset()
    start = time.perf_counter()
    outcome = contender.run(x, y)
    contender.seconds.append(time.perf_counter() - start)
    contender.forward.append(counted.examples)
    contender.backward.append(counted.backward_examples)
    robust = outcome.robust
    if robust is None:
        assert outcome.x_adv is not None
        inside = allowed_region(contender, threat, x).contains(outcome.x_adv, x)
        contender.outside += int((~inside).sum())
        clean_correct = predictions(setting.model, x, args.batch) == y
        # a point outside counts as no attack at all: the example keeps its clean outcome
        held = predictions(setting.model, outcome.x_adv, args.batch) == y
        robust = torch.where(inside, held, clean_correct)
        if contender.norm is not None:
            record_minimal_norm(contender, outcome.x_adv, x, clean_correct & ~robust, clean_correct)
    contender.robust.append(float(robust.float().mean()))


def allowed_region(contender: Contender, threat: ThreatModel, x: Tensor) -> ThreatModel:
    """Where a row's points must lie: the eps-ball and the box, or for a minimal-norm row the box
    alone (an L2 ball as wide as the box's diameter holds the whole box)."""
    if contender.norm is None:
        return threat
    low, high = threat.bounds
    return ThreatModel("l2", (high - low) * x[0].numel() ** 0.5, bounds=threat.bounds)


def predictions(model: nn.Module, x: Tensor, batch: int) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(xb).argmax(1) for xb in x.split(batch)])


def record_minimal_norm(contender: Contender, x_adv: Tensor, x: Tensor, fooled: Tensor,
                        clean_correct: Tensor) -> None:
    """Success rate, median norm and each example's found norm (in the contender's norm), over the
    examples the model got right (the others need no attack)."""
    distance = ThreatModel(contender.norm, 1.0).distance(x_adv, x)
    found = torch.where(fooled, distance, torch.inf)[clean_correct]
    successful = found[torch.isfinite(found)]
    contender.success.append(float(fooled.sum() / clean_correct.sum()))
    contender.found_norm.append(float(successful.median()) if successful.numel() else float("nan"))
    # the lower median, so that with most examples not fooled the radius is inf, not an average
    contender.radius.append(float(found.median()))
    contender.norm_runs.append(found.sort().values)  # inf where not fooled


def run_rounds(contenders: list[Contender], setting: Setting, counted: ForwardCounter,
               threat: ThreatModel, args: argparse.Namespace) -> None:
    for contender in contenders:  # warm-up: allocator, kernels, lazy imports
        contender.run(setting.x[:16], setting.y[:16])
    for r in range(args.repeats):
        for contender in repeat_order(contenders, r, args.seed):
            measure(contender, setting, counted, threat, args)
        print(f"  repeat {r + 1}/{args.repeats} done (load {load_average()})", file=sys.stderr)


# -- reporting ---------------------------------------------------------------------------------


def print_header(args: argparse.Namespace, setting: Setting, threat: ThreatModel, clean: float) -> None:
    print_provenance([("torchattacks", "torchattacks"), ("pyautoattack", "pyautoattack"),
                      ("art", "adversarial-robustness-toolbox"), ("foolbox", "foolbox")])
    print(f"setting:  {setting.description}; clean accuracy {clean:.2%}")
    print(f"attacks:  untargeted; {threat.describe()} for APGD, AutoAttack, Square; C&W, FMN, FAB and "
          f"HopSkipJump unbounded (minimal norm); batch {args.batch}; seed {args.seed}")
    print(f"budgets:  APGD-CE {args.apgd_iter} iterations, 1 restart, rho 0.75; AutoAttack standard "
          f"(APGD-CE 100, APGD-T 9x100, FAB-T 9x100, Square 5000); C&W {args.cw_searches} binary-search "
          f"steps from c0 0.1 (one at c 1), {args.cw_steps} Adam steps per constant at lr 0.01 unless "
          f"the row says otherwise, abort_early in fortify, {args.cw_examples} examples from example "
          f"{args.cw_offset}; Square "
          f"{args.queries} queries, "
          "p_init 0.8, schedule rescaled to the budget")
    foolbox_l2 = "as shipped (no projection)" if args.foolbox_fmn_as_shipped else "with its projection"
    print(f"          FMN {args.fmn_steps} steps (Foolbox's L2 FMN {foolbox_l2}); "
          f"FAB {args.fab_steps} steps, 1 restart; "
          f"HopSkipJump L2 {args.hsj_iter} iterations, {args.hsj_examples} examples")
    print(f"timing:   1 warm-up round (16 examples), then {args.repeats} interleaved repeats "
          "(order shuffled per repeat, seeded); medians")


def print_table(contenders: list[Contender], total: int) -> None:
    baseline: dict[str, float] = {}
    for c in contenders:  # each group's first row (a fortify one) is its baseline
        baseline.setdefault(c.group, median(c.seconds))
    print()
    print("| attack | library | n | median s | min-max s | examples/s | time / fortify | robust acc "
          "| success | median norm | median radius | forward / n | backward / n |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        seconds, n = median(c.seconds), min(c.limit or total, total - c.start)
        success = f"{median(c.success):.2%}" if c.success else "-"
        found_norm = f"{median(c.found_norm):.3f}" if c.found_norm else "-"
        radius = f"{median(c.radius):.3f}" if c.radius else "-"
        print(f"| {c.group} | {c.library} | {n} | {seconds:.3f} | {min(c.seconds):.3f}-{max(c.seconds):.3f} "
              f"| {n / seconds:,.0f} | {seconds / baseline[c.group]:.2f} | {median(c.robust):.2%} "
              f"| {success} | {found_norm} | {radius} | {median(c.forward) / n:.3g} "
              f"| {median(c.backward) / n:.3g} |")


def print_dominance(contenders: list[Contender]) -> None:
    """For minimal-norm rows: is a fortify row at least as strong as a peer's at every radius?

    Row A is at least as strong as row B when, at every radius r, A fools at least as many examples
    within r as B; with the found norms sorted (inf where not fooled) that is ``sorted(A) <= sorted(B)``
    element by element, here with ``NORM_RTOL`` of slack (two runs that return the same points up to
    rounding, or differ by 0.3% on one example, are not called weaker). Where a row's repeats found
    different norms, fortify's row is judged by its weakest repeat at each rank and the peer's by
    its strongest. The speed ratio then compares attacks of equal or greater strength.
    """
    minimal = [c for c in contenders if c.norm_runs]
    lines = []
    for ours in (c for c in minimal if c.library.startswith("fortify")):
        a = torch.stack(ours.norm_runs).amax(0)
        for theirs in (c for c in minimal if c.group == ours.group and not c.library.startswith("fortify")):
            b = torch.stack(theirs.norm_runs).amin(0)
            ratio = median(theirs.seconds) / median(ours.seconds)
            if bool((a <= b * (1 + NORM_RTOL)).all()):
                verdict = f"at least as strong at every {ours.norm} radius (norms within {NORM_RTOL:.0%})"
            else:
                larger = a > b * (1 + NORM_RTOL)
                excess = float((a[larger] / b[larger]).max()) - 1  # inf where only b found a point
                verdict = (f"weaker: {int(larger.sum())} of {a.numel()} sorted norms larger "
                           f"(by up to {excess:.1%})")
            lines.append(f"- {ours.library} vs {theirs.library}: {verdict}; {theirs.library} takes "
                         f"{ratio:.2f}x the time")
    if lines:
        print("\nminimal-norm strength (found norms in each group's norm, per clean-correct example):")
        print("\n".join(lines))


# -- entry point -------------------------------------------------------------------------------


def attack_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACK_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attacks {unknown or [text]}; valid: "
                                         f"{', '.join(ATTACK_CHOICES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", type=attack_list, default=list(ATTACK_CHOICES),
                        help=f"comma separated, from {', '.join(ATTACK_CHOICES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (>= 5)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--examples", type=int, default=None, help="examples (default: digits test split)")
    parser.add_argument("--eps", type=float, default=0.2, help="L-inf eps of APGD, AutoAttack, Square")
    parser.add_argument("--apgd-iter", type=int, default=100)
    parser.add_argument("--cw-steps", type=int, default=50)
    parser.add_argument("--cw-searches", type=int, default=3,
                        help="binary-search steps of the C&W search row")
    parser.add_argument("--cw-examples", type=int, default=64,
                        help="C&W attacks only N examples, from --cw-offset on (ART's C&W is slow)")
    parser.add_argument("--cw-offset", type=int, default=0,
                        help="C&W attacks its examples from this one on (e.g. past those a budget "
                             "was chosen on)")
    parser.add_argument("--channels-last", action="store_true",
                        help="add rows run on the model as fortify's evaluation runs it on CPU, "
                             "channels_last weights and linear layers on oneDNN where that pays (fortify's "
                             "APGD early_stop and tuned C&W, ART's short C&W)")
    parser.add_argument("--cw-long-steps", type=int, default=0,
                        help="add a fortify row to the C&W search group with this many steps per constant")
    parser.add_argument("--cw-tuned", type=lambda s: (int(s.split(",")[0]), float(s.split(",")[1])),
                        default=(40, 0.05), help="STEPS,LR of fortify's second row in the C&W search group")
    parser.add_argument("--cw-warm", type=lambda s: (int(s.split(",")[0]), float(s.split(",")[1])),
                        default=(30, 0.05),
                        help="STEPS,LR of fortify's warm-started row in the C&W search group")
    parser.add_argument("--cw-art-short-steps", type=int, default=10,
                        help="steps per constant of ART's second row in the C&W search group")
    parser.add_argument("--queries", type=int, default=1000, help="Square's query budget")
    parser.add_argument("--fmn-steps", type=int, default=100)
    parser.add_argument("--foolbox-fmn-as-shipped", action="store_true",
                        help="run Foolbox's L2 FMN without the projection onto its ball it means to make")
    parser.add_argument("--fab-steps", type=int, default=100)
    parser.add_argument("--hsj-iter", type=int, default=20, help="HopSkipJump iterations")
    parser.add_argument("--hsj-examples", type=int, default=32,
                        help="HopSkipJump attacks only the first N examples (ART's runs one at a time)")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    add_weights_option(parser)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    check_repeats(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_process_options(args)
    setting = digits_setting(args)
    if "cw" in args.attacks and not 0 <= args.cw_offset <= setting.x.shape[0] - args.cw_examples:
        sys.exit(f"--cw-offset {args.cw_offset} with --cw-examples {args.cw_examples} runs past the "
                 f"{setting.x.shape[0]} examples")
    args.input_shape = tuple(setting.x.shape[1:])
    threat = ThreatModel("linf", args.eps)
    weights = settle_weights(setting.model, args)
    counted = ForwardCounter(setting.model).eval()
    contenders = build_contenders(counted, threat, args)
    print_header(args, setting, threat, accuracy(setting.model, setting.x, setting.y, args.batch))
    print(weights)
    run_rounds(contenders, setting, counted, threat, args)
    print_table(contenders, setting.x.shape[0])
    outside = [f"{c.library} {c.group}: {c.outside}" for c in contenders if c.outside]
    if outside:
        print(f"\nwarning: points outside the ball or box, counted as not fooled: {'; '.join(outside)}")
    print_dominance(contenders)
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
