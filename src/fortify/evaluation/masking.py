"""The gradient-masking verdict: does a robustness number come from robustness or from a broken gradient?

A defence that masks gradients (shattered, stochastic or vanishing gradients; Athalye, Carlini &
Wagner, ICML 2018) stops gradient attacks without making the model robust. Each check below is one
of the warning signs listed by Athalye et al. (Section 3.1) and by Carlini et al., "On Evaluating
Adversarial Robustness" (2019), as AutoAttack's ``checks.py`` also flags some of them:

(a) ``iterative_vs_single_step``  PGD is at least as strong as FGSM;
(b) ``unbounded``                 PGD with an eps that covers the whole box fools (almost) everything;
(c) ``eps_monotone``              success does not fall as eps grows;
(d) ``white_vs_black_box``        white-box attacks are at least as strong as black-box and transfer ones;
(e) ``more_effort``               4x the steps with restarts does not still raise success materially;
(f) ``zero_gradients``            input gradients are neither exactly zero nor non-finite;
(g) ``randomness``                the model gives the same output twice for the same input;
(h) ``loss_landscape``            the loss along the gradient direction is neither flat nor noisy.

The attacks run on the examples the model classifies correctly, and every success rate is the
share of those that the attack fools (on a randomised model, averaged over ``random_draws``
predictions). Checks (a), (c), (d) and (e) compare two attacks on the same examples: one fails when
the rival's success exceeds the other's by more than the tolerance *and* a one-sided sign test on
the examples where they disagree gives a p-value below ``significance``, so that on a small set a
gap of one or two examples is not taken for a broken gradient. When (g) fails PGD is rerun through
EOT, when (f) or (h) fails through BPDA (for an input-transform defence, or a BPDA model passed in)
and, for (f), on the logit margin; the verdict reports the plain and the adaptive success side by
side.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import Tensor, nn

from fortify.attacks.adaptive import BPDA, EOT, MarginPGD, logit_margin
from fortify.attacks.base import (
    Attack,
    check_label_dtype,
    check_label_range,
    check_positive_int,
    check_seed,
    diagnose_failure,
)
from fortify.attacks.fgsm import FGSM
from fortify.attacks.pgd import PGD
from fortify.defences.base import InputTransformDefence
from fortify.errors import ConfigError, DataError, ThreatModelViolation
from fortify.evaluation.gradients import ZeroGradientPath, input_gradient
from fortify.evaluation.metrics import median
from fortify.models.modes import restore_modes, save_modes
from fortify.models.predictions import predicted_class
from fortify.threat import ThreatModel


@dataclass(frozen=True)
class MaskingConfig:
    """Budgets and tolerances of the checks; the defaults suit a few hundred small images. The
    tolerances are shares of the attacked examples; ``significance`` is the p-value below which the
    paired sign test of a comparing check takes a gap past them for a real one (1 compares the
    shares alone; docs/METRICS.md)."""

    steps: int = 10
    effort_factor: int = 4
    effort_restarts: int = 3
    eps_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    tolerance: float = 0.03  # slack on success-rate comparisons, (a) (c) (d)
    effort_tolerance: float = 0.05  # largest gain from 4x steps with restarts that is not a flag, (e)
    significance: float = 0.05  # one-sided sign-test level for the paired comparisons, (a) (c) (d) (e)
    unbounded_success: float = 0.99
    max_zero_gradient_share: float = 0.01
    line_points: int = 11
    max_roughness: float = 2.0  # total variation over net change beyond which a line is "noisy"
    max_irregular_share: float = 0.1
    black_box_queries: int = 300
    random_draws: int = 5
    eot_samples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        # counts stored as ints (4.0 counts as 4): a float failed in check (h), after every attack had run
        for name in ("steps", "effort_factor", "effort_restarts", "line_points", "black_box_queries",
                     "random_draws", "eot_samples"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        object.__setattr__(self, "seed", check_seed("seed", self.seed))
        real_settings = ("tolerance", "effort_tolerance", "significance", "unbounded_success",
                         "max_zero_gradient_share", "max_roughness", "max_irregular_share")
        for name in real_settings:
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not isinstance(self.eps_factors, tuple | list) or not all(_is_number(f) for f in self.eps_factors):
            raise ConfigError(f"eps_factors must be a list of numbers, got {self.eps_factors!r}")
        for name in ("tolerance", "effort_tolerance", "unbounded_success", "max_zero_gradient_share",
                     "max_irregular_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.significance <= 1:
            raise ConfigError(f"significance must lie in (0, 1], got {self.significance!r}")
        if not self.eps_factors or any(not (math.isfinite(f) and f > 0) for f in self.eps_factors):
            raise ConfigError(f"eps_factors must be finite numbers > 0, got {self.eps_factors!r}")
        if self.line_points < 3 or not (math.isfinite(self.max_roughness) and self.max_roughness >= 1):
            raise ConfigError(f"need line_points >= 3 and max_roughness >= 1, got {self.line_points} and "
                              f"{self.max_roughness}")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class MaskingCheck:
    name: str
    passed: bool
    evidence: dict[str, Any]
    explanation: str


@dataclass
class AdaptiveResult:
    """A plain attack and its adaptive rerun, both scored on the model as deployed."""

    name: str  # "eot", "bpda" or "margin"
    triggered_by: list[str]
    settings: dict[str, Any]
    plain_success: float
    adaptive_success: float


class NothingToJudge(DataError):
    """The model classifies none of the examples correctly: no attack has anything to flip."""


@dataclass
class MaskingVerdict:
    masked: bool | None  # None: not judged (``not_judged``)
    threat: dict[str, Any]
    n_examples: int
    n_attacked: int
    checks: list[MaskingCheck]
    config: dict[str, Any] = field(default_factory=dict)  # the MaskingConfig the checks ran with
    adaptive: list[AdaptiveResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def not_judged(cls, threat: ThreatModel, n_examples: int, config: MaskingConfig,
                   reason: str) -> MaskingVerdict:
        """The verdict where no check could run (``reason`` says why): masked is None, no checks."""
        return cls(masked=None, threat=threat.to_dict(), n_examples=n_examples, n_attacked=0,
                   checks=[], config=asdict(config), notes=[reason])

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def check(self, name: str) -> MaskingCheck:
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(f"no check {name!r}; checks: {', '.join(c.name for c in self.checks)}")


@dataclass
class _Setup:
    """The model, the clean-correct examples the attacks run on, and how to score them."""

    model: nn.Module
    threat: ThreatModel
    config: MaskingConfig
    x: Tensor
    y: Tensor
    index: Tensor  # positions of the attacked examples among the caller's
    draws: int
    randomized: bool = False  # the randomness check (g) failed; ``draws`` may still be 1

    def fooled(self, x_adv: Tensor) -> Tensor:
        """Per attacked example, the share of the draws that misclassify ``x_adv`` (0 or 1 if fixed)."""
        with torch.no_grad():
            wrong = [(predicted_class(self.model(x_adv)) != self.y).float() for _ in range(self.draws)]
        return torch.stack(wrong).mean(0)

    def attack(self, attack: Attack, model: nn.Module | None = None) -> Tensor:
        """Attack ``model`` (the deployed one by default); score the points on the deployed one."""
        x_adv = attack(self.model if model is None else model, self.x, self.y)
        _verify(attack.threat, x_adv, self.x, attack.label)
        return self.fooled(x_adv)

    def run(self, attack: Attack, model: nn.Module | None = None) -> float:
        """Success rate of ``attack`` on the attacked examples."""
        return float(self.attack(attack, model).mean())


def masking_verdict(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    config: MaskingConfig | None = None,
    black_box: Attack | None = None,
    transfer_x_adv: Tensor | None = None,
    bpda: nn.Module | None = None,
) -> MaskingVerdict:
    """Run checks (a) to (h) on ``(x, y)`` and the adaptive reruns that failed checks call for.

    ``black_box`` defaults to Square (``fortify.attacks.square``) when it is installed, else to a
    random search over the corners of the ball. ``transfer_x_adv`` (one point per example of ``x``,
    crafted on another model) adds a transfer attack to check (d). ``bpda`` is the model to attack
    when gradients are shattered; an ``InputTransformDefence`` with a non-differentiable transform
    gets ``BPDA.around(model)`` without it.
    """
    config = config or MaskingConfig()
    _check_inputs(x, y, threat, transfer_x_adv)
    device = _device_of(model, x)
    x, y = x.to(device), y.to(device).long()  # int32 or uint8 labels: losses and gathers take int64
    modes = save_modes(model)
    model.eval()
    try:
        with torch.no_grad():  # before the first gradient probe, whose loss would take any label
            try:
                logits = model(x[:1])
            except (RuntimeError, TypeError, ValueError) as err:  # inputs the model cannot take
                diagnose_failure(model, x, y, err)
                raise
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                diagnose_failure(model, x, y, DataError("the model returned no logits"))
            check_label_range(y, logits.shape[1])
        if input_gradient(model, x[:1], y[:1]) is None:
            # a model that detaches its input would break every gradient attack inside autograd;
            # with an exactly-zero gradient path they stall instead, and check (f) reports it
            model = ZeroGradientPath(model)
        randomness = check_randomness(model, x)
        setup = _attacked_setup(model, x, y, threat, config, randomized=not randomness.passed)
        checks, white = _attack_checks(setup, black_box, transfer_x_adv)
        checks += [check_zero_gradients(setup), randomness, check_loss_landscape(setup)]
        adaptive, notes = _adaptive_reruns(setup, checks, white, bpda)
    finally:
        restore_modes(modes)
    failed = [c.name for c in checks if not c.passed]
    return MaskingVerdict(masked=bool(failed), threat=threat.to_dict(), n_examples=len(y),
                          n_attacked=len(setup.y), checks=checks, config=asdict(config),
                          adaptive=adaptive, notes=notes)


# -- set-up ---------------------------------------------------------------------------------------

def _check_inputs(x: Tensor, y: Tensor, threat: ThreatModel, transfer_x_adv: Tensor | None) -> None:
    threat.check_inputs(x)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    check_label_dtype(y)
    if transfer_x_adv is not None and transfer_x_adv.shape != x.shape:
        raise DataError(f"transfer_x_adv must have the shape of x {tuple(x.shape)}, "
                        f"got {tuple(transfer_x_adv.shape)}")


def _device_of(model: nn.Module, x: Tensor) -> torch.device:
    parameter = next(model.parameters(), None)
    return x.device if parameter is None else parameter.device


def _attacked_setup(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, config: MaskingConfig,
                    randomized: bool) -> _Setup:
    draws = config.random_draws if randomized else 1
    with torch.no_grad():
        correct = torch.stack([predicted_class(model(x)) == y for _ in range(draws)]).float().mean(0)
    # on a randomised model an example counts as correct when most draws classify it correctly
    index = (correct > 0.5).nonzero().squeeze(1)
    if index.numel() == 0:
        raise NothingToJudge("the model classifies none of the examples correctly, so no attack can "
                             "be judged; pass examples it gets right")
    return _Setup(model, threat, config, x[index], y[index], index, draws, randomized)


def _verify(threat: ThreatModel, x_adv: Tensor, x: Tensor, label: str) -> None:
    inside = threat.contains(x_adv, x)
    if not bool(inside.all()):
        raise ThreatModelViolation(f"{label} gave {int((~inside).sum())} point(s) outside "
                                   f"{threat.describe()}; its result is refused")


def _pgd(setup: _Setup, threat: ThreatModel | None = None, steps: int | None = None,
         restarts: int = 1, kind: type[PGD] = PGD) -> PGD:
    """The verdict's PGD (or ``kind``, e.g. MarginPGD), with the exit its model allows."""
    threat, steps = threat or setup.threat, steps or setup.config.steps
    if setup.randomized:
        # on a randomised model a hit on one draw (or on EOT's mean) is no answer: the first such
        # iterate lies at the boundary and fresh draws mostly undo it, where the final iterate has
        # climbed the loss for every step (docs/ATTACKS.md, EOT against torchattacks' EOTPGD)
        return kind(threat, steps=steps, restarts=restarts, keep_first_success=False, seed=setup.config.seed)
    # early_stop returns the same points as a full run, only faster (see fortify.attacks.pgd)
    return kind(threat, steps=steps, restarts=restarts, early_stop=True, seed=setup.config.seed)


# -- checks that run attacks ----------------------------------------------------------------------

@dataclass
class _WhiteBox:
    """Per-example outcomes of the white-box attacks every verdict runs."""

    pgd: Tensor
    fgsm: Tensor
    long_pgd: Tensor
    margin_pgd: Tensor
    long_label: str
    margin_settings: dict[str, Any]

    @property
    def union(self) -> Tensor:
        """Success of the strongest white-box attack per example (AutoAttack's worst case)."""
        return torch.stack([self.pgd, self.fgsm, self.long_pgd, self.margin_pgd]).amax(0)


def _white_box(setup: _Setup) -> _WhiteBox:
    cfg = setup.config
    long_pgd = _pgd(setup, steps=cfg.effort_factor * cfg.steps, restarts=cfg.effort_restarts)
    margin = _pgd(setup, kind=MarginPGD)
    return _WhiteBox(pgd=setup.attack(_pgd(setup)), fgsm=setup.attack(FGSM(setup.threat, seed=cfg.seed)),
                     long_pgd=setup.attack(long_pgd), margin_pgd=setup.attack(margin),
                     long_label=long_pgd.label, margin_settings=margin.describe())


def _attack_checks(setup: _Setup, black_box: Attack | None,
                   transfer_x_adv: Tensor | None) -> tuple[list[MaskingCheck], _WhiteBox]:
    white = _white_box(setup)
    checks = [
        check_iterative_vs_single_step(setup, white.pgd, white.fgsm),
        check_unbounded(setup),
        check_eps_monotone(setup, white.pgd),
        check_white_vs_black_box(setup, white.union, black_box, transfer_x_adv),
        check_more_effort(setup, white.pgd, white.long_pgd, white.long_label),
    ]
    return checks, white


# -- paired comparisons of two attacks on the same examples ----------------------------------------

def paired_excess(rival: Tensor, reference: Tensor) -> dict[str, Any]:
    """How much more ``rival`` fools than ``reference`` on the same examples, and how surely.

    Both hold one success per attacked example (a share of the draws on a randomised model).
    ``excess`` is the difference of the success rates; ``rival_only`` and ``reference_only`` count
    the examples on which each does better; ``p_value`` is the one-sided sign test (exact binomial)
    of the rival doing better on the examples where the two differ, 1 where they never differ.
    """
    difference = rival.double() - reference.double()
    rival_only, reference_only = int((difference > 0).sum()), int((difference < 0).sum())
    differ = rival_only + reference_only
    p_value = binomtest(rival_only, differ, 0.5, alternative="greater").pvalue if differ else 1.0
    return {"excess": float(difference.mean()), "rival_only": rival_only, "reference_only": reference_only,
            "p_value": float(p_value)}


def _beaten(paired: dict[str, Any], tolerance: float, config: MaskingConfig) -> bool:
    """A gap past the tolerance that chance alone would rarely give (the sign test's level)."""
    return paired["excess"] > tolerance and paired["p_value"] < config.significance


def check_iterative_vs_single_step(setup: _Setup, pgd: Tensor, fgsm: Tensor) -> MaskingCheck:
    """(a) PGD takes many steps where FGSM takes one; weaker PGD means the gradient misleads."""
    tol = setup.config.tolerance
    paired = paired_excess(fgsm, pgd)
    passed = not _beaten(paired, tol, setup.config)
    return MaskingCheck(
        "iterative_vs_single_step", passed,
        {"pgd_success": float(pgd.mean()), "fgsm_success": float(fgsm.mean()),
         "pgd_steps": setup.config.steps, "tolerance": tol, "fgsm_only": paired["rival_only"],
         "pgd_only": paired["reference_only"], "p_value": paired["p_value"],
         "significance": setup.config.significance},
        _passed("PGD is at least as strong as FGSM", [("FGSM", paired)], tol) if passed else
        f"FGSM fools more examples than PGD ({paired['rival_only']} that PGD misses, against "
        f"{paired['reference_only']} the other way; sign test p = {paired['p_value']:.2g}): following "
        "the gradient for longer leads away from adversarial points, a sign of a shattered or "
        "misleading loss surface.")


def _passed(claim: str, leads: list[tuple[str, dict[str, Any]]], tolerance: float) -> str:
    """A passing check's explanation; a lead past the tolerance that chance explains is named."""
    within = [f"{rival}'s lead of {paired['excess']:.1%} rests on {paired['rival_only']} example(s) against "
              f"{paired['reference_only']} (sign test p = {paired['p_value']:.2g})"
              for rival, paired in leads if paired["excess"] > tolerance]
    return claim + (", within chance: " + "; ".join(within) + "." if within else ".")


def unbounded_eps(threat: ThreatModel, x: Tensor) -> float:
    """An eps that lets the attack reach every point of the box: its width (L-inf) or diameter (L2)."""
    width = threat.bounds[1] - threat.bounds[0]
    return width if threat.norm == "linf" else width * math.sqrt(x[0].numel())


def check_unbounded(setup: _Setup) -> MaskingCheck:
    """(b) With the whole box allowed, any classifier can be fooled; a gradient attack must find it."""
    eps = unbounded_eps(setup.threat, setup.x)
    success = setup.run(_pgd(setup, setup.threat.with_eps(eps)))
    need = setup.config.unbounded_success
    passed = success >= need
    return MaskingCheck(
        "unbounded", passed, {"eps": eps, "success": success, "required": need},
        f"PGD at eps={eps:.4g}, which covers the whole box, fools {success:.1%} of the examples."
        if passed else
        f"PGD at eps={eps:.4g}, which covers the whole box, fools only {success:.1%} (needs {need:.0%}): "
        "the gradient does not lead to adversarial points even without a budget.")


def check_eps_monotone(setup: _Setup, pgd: Tensor) -> MaskingCheck:
    """(c) A larger ball holds every point of a smaller one, so success cannot fall with eps."""
    cap = unbounded_eps(setup.threat, setup.x)
    grid = sorted({min(f * setup.threat.eps, cap) for f in setup.config.eps_factors} | {setup.threat.eps})
    outcomes = [pgd if eps == setup.threat.eps else
                setup.attack(_pgd(setup, setup.threat.with_eps(eps))) for eps in grid]
    # at eps = 0 the unattacked examples: none fooled on a fixed model (they are clean-correct), on
    # a randomised one the noise's own errors, which every success rate above includes too
    outcomes = [setup.fooled(setup.x), *outcomes]
    tol = setup.config.tolerance
    falls = _falls([0.0, *grid], outcomes, tol, setup.config.significance)
    drops = [fall for fall in falls if fall["counted"]]
    evidence = {"eps": [0.0, *grid], "success": [float(o.mean()) for o in outcomes], "tolerance": tol,
                "falls": falls, "significance": setup.config.significance}
    return MaskingCheck(
        "eps_monotone", not drops, evidence,
        ("Attack success grows with eps." if not falls else
         "Attack success grows with eps, within chance: each fall past the tolerance rests on too few "
         "examples (" + "; ".join(_describe_fall(f) for f in falls) + ").") if not drops else
        "Attack success falls as eps grows (" + "; ".join(_describe_fall(f) for f in drops)
        + "): a larger budget should never help the model, so the attack is not finding what exists.")


def _falls(eps: list[float], outcomes: list[Tensor], tol: float, significance: float) -> list[dict[str, Any]]:
    """Each point whose success lies more than ``tol`` below the best at a smaller eps, paired
    example by example with that point; ``counted`` where the sign test finds the fall significant.

    Each point is held to the best success at any smaller eps, not only to its neighbour's: every
    smaller ball lies inside the larger one, and a slow slide whose steps each stay within ``tol``
    is a fall all the same.
    """
    success = [float(o.mean()) for o in outcomes]
    falls, best = [], 0
    for i in range(1, len(eps)):
        if success[i] < success[best] - tol:
            paired = paired_excess(outcomes[best], outcomes[i])
            falls.append({"from_eps": eps[best], "to_eps": eps[i], "fall": success[best] - success[i],
                          "lost": paired["rival_only"], "gained": paired["reference_only"],
                          "p_value": paired["p_value"], "counted": paired["p_value"] < significance})
        if success[i] > success[best]:
            best = i
    return falls


def _describe_fall(fall: dict[str, Any]) -> str:
    return (f"{fall['from_eps']:.3g}->{fall['to_eps']:.3g}: -{fall['fall']:.1%}, {fall['lost']} example(s) "
            f"lost against {fall['gained']} gained, p = {fall['p_value']:.2g}")


def check_white_vs_black_box(setup: _Setup, white: Tensor, black_box: Attack | None,
                             transfer_x_adv: Tensor | None) -> MaskingCheck:
    """(d) A black-box attack sees less than a white-box one; beating it means the gradient misleads.

    ``white`` is the per-example worst case over the white-box attacks (FGSM, PGD, the longer PGD
    and PGD on the logit margin), as in AutoAttack, where Square only counts what they missed.
    """
    black_box = black_box or default_black_box(setup.threat, setup.config)
    if black_box.threat != setup.threat:
        raise ConfigError(f"the black-box attack uses {black_box.threat.describe()} but the verdict's "
                          f"threat model is {setup.threat.describe()}")
    rivals = {"black-box": setup.attack(black_box)}
    evidence: dict[str, Any] = {"white_box_success": float(white.mean()), "black_box": black_box.label,
                                "black_box_success": float(rivals["black-box"].mean()),
                                "tolerance": setup.config.tolerance,
                                "significance": setup.config.significance}
    if transfer_x_adv is not None:
        points = transfer_x_adv.to(setup.x.device)[setup.index]
        _verify(setup.threat, points, setup.x, "the transfer attack")
        rivals["transfer"] = setup.fooled(points)
        evidence["transfer_success"] = float(rivals["transfer"].mean())
    paired = {name: paired_excess(outcome, white) for name, outcome in rivals.items()}
    evidence["paired"] = paired
    beaten = [name for name in rivals if _beaten(paired[name], setup.config.tolerance, setup.config)]
    if beaten:
        return MaskingCheck(
            "white_vs_black_box", False, evidence,
            "The " + " and ".join(f"{name} attack ({paired[name]['rival_only']} examples the white-box "
                                  f"attacks miss, against {paired[name]['reference_only']}; p = "
                                  f"{paired[name]['p_value']:.2g})" for name in beaten)
            + " fools more examples than the white-box attacks: the gradient is less useful than no "
            "gradient at all.")
    return MaskingCheck("white_vs_black_box", True, evidence, _passed(
        "White-box attacks are at least as strong as the black-box and transfer attacks",
        [(f"the {name} attack", paired[name]) for name in rivals], setup.config.tolerance))


def check_more_effort(setup: _Setup, pgd: Tensor, long: Tensor, long_label: str) -> MaskingCheck:
    """(e) On an honestly evaluated model PGD has converged; if 4x the effort still gains, it had not."""
    tol = setup.config.effort_tolerance
    paired = paired_excess(long, pgd)
    gain = paired["excess"]
    passed = not _beaten(paired, tol, setup.config)
    return MaskingCheck(
        "more_effort", passed, {"pgd_success": float(pgd.mean()), "long_attack": long_label,
                                "long_success": float(long.mean()), "gain": gain, "tolerance": tol,
                                "long_only": paired["rival_only"], "pgd_only": paired["reference_only"],
                                "p_value": paired["p_value"], "significance": setup.config.significance},
        _passed(f"The attack has converged: {long_label} gains {gain:+.1%} over PGD-{setup.config.steps}",
                [(long_label, paired)], tol) if passed else
        f"{long_label} fools {gain:.1%} more than PGD-{setup.config.steps} ({paired['rival_only']} examples "
        f"against {paired['reference_only']}; sign test p = {paired['p_value']:.2g}): the plain attack had "
        "not converged, so its accuracy overstates robustness; report the stronger attack.")


# -- checks on the gradient and on the outputs ----------------------------------------------------

def check_zero_gradients(setup: _Setup) -> MaskingCheck:
    """(f) A zero or non-finite input gradient gives a gradient attack nothing to follow."""
    point = setup.x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(setup.model(point), setup.y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
    flat = grad.reshape(grad.shape[0], -1)
    non_finite = ~torch.isfinite(flat).all(dim=1)
    zero = (flat == 0).all(dim=1) & ~non_finite
    share = float((zero | non_finite).float().mean())
    limit = setup.config.max_zero_gradient_share
    passed = share <= limit
    return MaskingCheck(
        "zero_gradients", passed,
        {"zero_share": float(zero.float().mean()), "non_finite_share": float(non_finite.float().mean()),
         "zero_element_share": float((flat == 0).float().mean()), "limit": limit},
        "Input gradients of the cross-entropy are non-zero and finite." if passed else
        f"{share:.1%} of the examples have an all-zero or non-finite input gradient of the "
        "cross-entropy: a non-differentiable step (shattered gradients) or a saturated softmax "
        "(vanishing gradients) stops gradient attacks without making the model robust.")


def check_randomness(model: nn.Module, x: Tensor) -> MaskingCheck:
    """(g) A model that answers differently each time defeats single-sample gradients (use EOT)."""
    with torch.no_grad():
        first, second = model(x), model(x)
    # NaN equals NaN here: a model that outputs NaN every time is broken, not random
    same = torch.isclose(first, second, rtol=1e-5, atol=1e-6, equal_nan=True).all(dim=1)
    passed = bool(same.all())
    predictions_differ = predicted_class(first) != predicted_class(second)
    return MaskingCheck(
        "randomness", passed,
        {"differing_outputs_share": float((~same).float().mean()),
         "differing_predictions_share": float(predictions_differ.float().mean()),
         "max_abs_difference": float((first - second).abs().max())},
        "Two forward passes on the same inputs give the same outputs." if passed else
        "Two forward passes on the same inputs give different outputs: the model is randomised, so "
        "one gradient is one sample of a random quantity; attack its expectation (EOT).")


def _margin_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return -logit_margin(model(x), y)


def check_loss_landscape(setup: _Setup) -> MaskingCheck:
    """(h) Along the steepest-ascent direction a smooth loss rises steadily; flat or jagged lines flag.

    The loss is the logit margin ``max_{j != y} z_j - z_y``, which does not saturate the way
    cross-entropy does. ``line_points`` points ``t * d`` for t in [0, eps], d the ascent direction,
    are evaluated; a line is flat when the loss does not change, and noisy when its total variation
    exceeds ``max_roughness`` times its net change.
    """
    cfg, x, y = setup.config, setup.x, setup.y
    point = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_margin_loss(setup.model, point, y).sum(), point)
    direction = setup.threat.ascent_direction(grad)
    steps = torch.linspace(0, setup.threat.eps, cfg.line_points, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        losses = torch.stack([_margin_loss(setup.model, setup.threat.project(x + t * direction, x), y)
                              for t in steps], dim=1).double()
    flat, noisy, roughness = _line_irregularity(losses, cfg.max_roughness)
    share = float((flat | noisy).float().mean())
    passed = share <= cfg.max_irregular_share
    return MaskingCheck(
        "loss_landscape", passed,
        {"flat_share": float(flat.float().mean()), "noisy_share": float(noisy.float().mean()),
         "median_roughness": median(roughness), "points": cfg.line_points,
         "limit": cfg.max_irregular_share},
        "The loss rises steadily along the gradient direction." if passed else
        f"For {share:.1%} of the examples the loss along the gradient direction is flat or noisy: "
        "the gradient does not describe the loss nearby (shattered or stochastic gradients).")


def _line_irregularity(losses: Tensor, max_roughness: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per line (a row of losses): flat, noisy, and total variation over net change."""
    steps = losses.diff(dim=1)
    variation = steps.abs().sum(dim=1)
    net = (losses[:, -1] - losses[:, 0]).abs()
    scale = losses.abs().amax(dim=1).clamp_min(1.0)
    flat = variation <= 1e-6 * scale  # below float32 rounding of the loss: the line did not move
    roughness = variation / net.clamp_min(1e-12 * scale)
    return flat, ~flat & (roughness > max_roughness), roughness


# -- the black-box default and the adaptive reruns ------------------------------------------------

def default_black_box(threat: ThreatModel, config: MaskingConfig) -> Attack:
    """Square (Andriushchenko et al. 2020) when installed, else random corners of the ball."""
    try:
        square = importlib.import_module("fortify.attacks.square")
    except ImportError:
        return RandomCorners(threat, queries=config.black_box_queries, seed=config.seed)
    return square.Square(threat, n_queries=config.black_box_queries, seed=config.seed)


class RandomCorners(Attack):
    """Gradient-free baseline: ``queries`` random points on the ball's surface, the first that fools.

    For L-inf the points are corners ``x + eps * s`` with random signs ``s``; for L2, random
    directions of length eps. The box then clips them (through the threat model).
    """

    name = "random-corners"

    def __init__(self, threat: ThreatModel, *, queries: int = 300, seed: int = 0) -> None:
        super().__init__(threat, seed=seed)
        self.queries = check_positive_int("queries", queries)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.queries}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "queries": self.queries}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        with torch.no_grad():
            for _ in range(self.queries):
                candidate = self.threat.project(x + self._surface_step(x, generator), x)
                new = self.succeeded(model(candidate), y, target) & ~found
                best[new] = candidate[new]
                found |= new
        return best

    def _surface_step(self, x: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.threat.eps * self.threat.ascent_direction(noise)


def _adaptive_reruns(setup: _Setup, checks: list[MaskingCheck], white: _WhiteBox,
                     bpda: nn.Module | None) -> tuple[list[AdaptiveResult], list[str]]:
    """The same PGD against EOT and BPDA wrappers, and the margin loss, as the failed checks ask."""
    failed = {c.name for c in checks if not c.passed}
    randomized = "randomness" in failed
    pgd_success = float(white.pgd.mean())
    results, notes = [], []
    if randomized:
        results.append(_rerun(setup, "eot", ["randomness"], EOT(setup.model, setup.config.eot_samples),
                              pgd_success, {"eot_samples": setup.config.eot_samples}))
    shattered = sorted(failed & {"zero_gradients", "loss_landscape"})
    # a noisy loss line on a randomised model is explained by its randomness, which EOT addresses
    if shattered and not (randomized and "zero_gradients" not in failed):
        bpda = bpda or _auto_bpda(setup.model)
        if bpda is not None:
            target = EOT(bpda, setup.config.eot_samples) if randomized else bpda
            results.append(_rerun(setup, "bpda", shattered, target, pgd_success,
                                  {"eot_samples": setup.config.eot_samples if randomized else None}))
        elif "loss_landscape" in failed:  # zero gradients alone are answered by the margin loss
            notes.append("BPDA was not run: no non-differentiable input transform is known for this "
                         "model; pass bpda=BPDA(model, transform) if it has one")
    if "zero_gradients" in failed:  # the margin PGD already ran among the white-box attacks
        results.append(AdaptiveResult("margin", ["zero_gradients"], white.margin_settings, pgd_success,
                                      float(white.margin_pgd.mean())))
    return results, notes


def _auto_bpda(model: nn.Module) -> nn.Module | None:
    if isinstance(model, ZeroGradientPath):
        # a transform off the autograd graph altogether: BPDA's identity backward needs no graph
        # through it, so BPDA answers it all the same
        model = model.model
    if isinstance(model, InputTransformDefence) and not model.differentiable:
        return BPDA.around(model)
    return None


def _rerun(setup: _Setup, name: str, triggered_by: list[str], target: nn.Module, pgd_success: float,
           extra: dict[str, Any]) -> AdaptiveResult:
    attack = _pgd(setup)
    return AdaptiveResult(name, triggered_by, {**attack.describe(), **extra}, pgd_success,
                          setup.run(attack, model=target))
