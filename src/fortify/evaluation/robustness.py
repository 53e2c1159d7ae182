"""Robustness evaluation: clean accuracy, each attack's accuracy, the per-example worst case.

Every point an attack returns is checked against the threat model before it is counted; a point
outside the ball or the box raises ThreatModelViolation instead of producing a number.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fortify.attacks.base import Attack, check_label_dtype, check_label_range, diagnose_failure
from fortify.errors import CheckpointError, ConfigError, DataError, ThreatModelViolation
from fortify.evaluation.gradients import ZeroGradientPath, check_gradients
from fortify.evaluation.journal import Journal, Partial, fingerprint, start_afresh
from fortify.evaluation.metrics import median
from fortify.evaluation.precision import (
    CHECK_EXAMPLES,
    DEFAULT_MIN_AGREEMENT,
    AutocastModel,
    PrecisionCheck,
    check_against_fp32,
)
from fortify.models.modes import restore_modes, save_modes
from fortify.models.predictions import predicted_class
from fortify.threat import ThreatModel
from fortify.training.distributed import DistributedContext, batch_seed

REPORT_VERSION = 1


@dataclass
class AttackResult:
    """One attack's outcome. ``mode`` says whether it saw every example or only the survivors."""

    name: str
    settings: dict[str, Any]
    mode: str  # "independent" or "cascade"
    attacked: int  # examples the attack was run on
    adversarial_accuracy: float  # over all n examples; in cascade mode, after this attack
    success_rate: float | None  # share of the attacked (clean-correct) examples it fooled; None: none
    mean_norm: float  # over attacked examples
    max_norm: float
    median_norm_successful: float | None
    robust: list[bool] = field(repr=False, default_factory=list)  # per example, after this attack


@dataclass
class EpsPoint:
    eps: float
    accuracy: float


@dataclass
class RobustnessReport:
    threat: dict[str, Any]
    n_examples: int
    clean_accuracy: float
    worst_case_accuracy: float
    attacks: list[AttackResult]
    eps_curve: list[EpsPoint]
    eps_curve_attack: str | None
    warnings: list[str]
    clean_correct: list[bool] = field(repr=False, default_factory=list)
    precision: PrecisionCheck | None = None  # the fp32 check of a mixed-precision evaluation
    # whether the model ran with channels_last conv weights (set by fortify.pipeline; None: not recorded)
    channels_last: bool | None = None
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RobustnessReport:
        if not isinstance(data, dict):
            raise DataError(f"a robustness report must be a mapping, got {type(data).__name__}")
        if data.get("version") != REPORT_VERSION:
            raise DataError(f"robustness report version {data.get('version')!r} is not "
                            f"{REPORT_VERSION}, the version this fortify reads")
        fields = _exact_fields(cls, data, "the robustness report")
        fields["attacks"] = [AttackResult(**_exact_fields(AttackResult, a, "an attack record"))
                             for a in _listed(data["attacks"], "attacks")]
        fields["eps_curve"] = [EpsPoint(**_exact_fields(EpsPoint, p, "an eps point"))
                               for p in _listed(data["eps_curve"], "eps_curve")]
        if data.get("precision") is not None:
            fields["precision"] = PrecisionCheck(**_exact_fields(PrecisionCheck, data["precision"],
                                                                 "the precision check"))
        return cls(**fields)

    def attack(self, name: str) -> AttackResult:
        for result in self.attacks:
            if result.name == name:
                return result
        raise KeyError(name)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[Attack],
    threat: ThreatModel,
    *,
    batch_size: int = 256,
    cascade: bool = False,
    eps_grid: Sequence[float] | None = None,
    num_classes: int | None = None,
    journal_dir: Path | None = None,
    curve_attack: Attack | None = None,
    shard: DistributedContext | None = None,
    amp: str | None = None,
    amp_min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> RobustnessReport:
    """Attack ``model`` on ``(x, y)`` with each attack and summarise.

    Independent mode runs every attack on every clean-correct example, so each attack's accuracy
    stands on its own. Cascade mode (AutoAttack's) gives each attack only the examples that all
    earlier attacks failed on: cheaper, and its last accuracy is the worst case.
    The eps curve reruns ``curve_attack`` (default: the last attack) at each eps in ``eps_grid``.
    With ``journal_dir`` the progress is written after every batch, and a killed evaluation
    continues where it stopped.
    Each attack batch draws its randomness from its own seed (``batch_seed``), so under torchrun
    (``shard``) the ranks take turns over the batches and the merged report equals one process's.
    With ``amp`` ("bf16" or "fp16") the model runs under autocast, and the first examples are also
    evaluated in fp32 (``RobustnessReport.precision``); a low agreement becomes a warning.
    """
    if isinstance(attacks, Attack):
        raise ConfigError("evaluate takes a list of attacks; pass [attack]")
    attacks = list(attacks)  # a generator would be spent by the first look
    eps_grid = list(eps_grid or [])
    _check_setup(attacks, threat, x, y, num_classes, batch_size, curve_attack, eps_grid)
    if shard is not None and journal_dir is not None:
        raise ConfigError("a sharded evaluation keeps no journal: pass journal_dir or shard, not both")
    device = next(model.parameters(), x).device  # a model without parameters runs where x is
    modes = save_modes(model)  # read before wrapping: a new wrapper starts in training mode
    fp32_model = model
    if amp is not None:
        model = AutocastModel(model, amp, device)
    model.eval()
    try:
        x, y = x.to(device), y.to(device).long()  # int32 or uint8 labels: losses and gathers take int64
        clean_logits = _predict(model, x, batch_size)
        if num_classes is not None and clean_logits.shape[-1] != num_classes:
            raise ConfigError(f"num_classes is {num_classes}, but the model outputs {clean_logits.shape[-1]} "
                              "classes")
        check_label_range(y, clean_logits.shape[-1])  # a label past the model's classes is no 'error'
        warnings = _logit_warnings(clean_logits)
        clean_correct = predicted_class(clean_logits) == y
        first = clean_correct.nonzero().squeeze(1)[:batch_size]  # what the first attack batch sees
        gradients = check_gradients(model, x[first], y[first], attacks)
        warnings += gradients.warnings
        if not gradients.connected:  # gradient attacks then stall on zeros instead of failing
            fp32_model, model = ZeroGradientPath(fp32_model), ZeroGradientPath(model)
        precision = None
        if amp is not None:
            sample = slice(0, min(batch_size, CHECK_EXAMPLES))
            precision = check_against_fp32(fp32_model, model, x[sample], y[sample], attacks[0],
                                           amp=amp, min_agreement=amp_min_agreement)
            warnings += precision.warnings()
        robust = clean_correct.clone()
        journal = None
        if journal_dir is not None:
            journal = Journal(journal_dir, fingerprint(x, y, attacks, cascade, batch_size, amp,
                                                       model=fp32_model, clean_correct=clean_correct))
        results = ([_journaled_result(r, attack, len(y), journal_dir)
                    for r, attack in zip(journal.completed(), attacks, strict=False)]
                   if journal is not None and journal_dir is not None else [])
        for result in results:
            recorded = torch.tensor(result.robust, device=device)
            if bool((recorded & ~clean_correct).any()):  # robust where the model is wrong: not this run's
                raise CheckpointError(f"the journal in {journal_dir} holds results this model cannot have "
                                      "(robust examples it misclassifies clean); "
                                      f"{start_afresh(journal_dir)}")
            robust &= recorded
        for index in range(len(results), len(attacks)):
            todo = robust if cascade else clean_correct
            result = _run_attack(model, attacks[index], x, y, todo, batch_size, cascade,
                                 journal=journal, attack_index=index, shard=shard)
            results.append(result)
            robust &= torch.tensor(result.robust, device=device)
            if journal is not None:
                journal.save_completed(asdict(result))
        curve_attack = curve_attack or attacks[-1]
        curve = _eps_curve(model, curve_attack, x, y, clean_correct, batch_size, eps_grid, shard)
    finally:
        restore_modes(modes)
    n = len(y)
    return RobustnessReport(
        threat=threat.to_dict(),
        n_examples=n, clean_accuracy=float(clean_correct.float().mean()),
        worst_case_accuracy=float(robust.float().mean()), attacks=results, eps_curve=curve,
        eps_curve_attack=curve_attack.label if eps_grid else None, warnings=warnings,
        clean_correct=clean_correct.tolist(), precision=precision)


def _journaled_result(record: Any, attack: Attack, n: int, journal_dir: Path) -> AttackResult:
    """A finished attack's record from the journal, refused unless it is whole and consistent: a
    damaged or edited record would otherwise stop the evaluation with a traceback, or put numbers it
    never measured into the report (an accuracy that its own per-example outcomes contradict)."""
    fields = {f.name for f in dataclasses.fields(AttackResult)}
    problem = None
    if not isinstance(record, dict) or set(record) != fields:
        shown = sorted(record) if isinstance(record, dict) else record
        problem = f"a finished attack's record has fields {shown}"
    elif record["name"] not in (attack.label, *attack.earlier_labels):
        problem = f"it records {record['name']!r} where this evaluation runs {attack.label!r}"
    elif not (isinstance(record["robust"], list) and len(record["robust"]) == n
              and all(isinstance(r, bool) for r in record["robust"])):
        problem = f"{record['name']}'s per-example outcomes are not {n} true/false values"
    elif not (isinstance(record["adversarial_accuracy"], (int, float))
              and abs(record["adversarial_accuracy"] - sum(record["robust"]) / n) < 1e-6):  # float32 mean
        problem = f"{record['name']}'s accuracy does not match its per-example outcomes"
    elif record["settings"] != json.loads(json.dumps(attack.describe(), default=str)):
        problem = f"{record['name']}'s settings are not this evaluation's"
    elif not _plausible_numbers(record, n):
        problem = f"{record['name']}'s counts, success rate or norms are not numbers in their range"
    if problem is not None:
        raise CheckpointError(f"the journal in {journal_dir} is damaged ({problem}); "
                              f"{start_afresh(journal_dir)}")
    return AttackResult(**{**record, "name": attack.label})


def _plausible_numbers(record: dict[str, Any], n: int) -> bool:
    def number(value: Any, low: float = 0.0, high: float = math.inf) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high

    attacked = record["attacked"]
    return (isinstance(attacked, int) and number(attacked, 0, n)
            and record["mode"] in ("cascade", "independent")
            and (record["success_rate"] is None or number(record["success_rate"], 0, 1))
            and number(record["mean_norm"]) and number(record["max_norm"])
            and (record["median_norm_successful"] is None or number(record["median_norm_successful"])))


def _check_setup(attacks: Sequence[Attack], threat: ThreatModel, x: Tensor, y: Tensor,
                 num_classes: int | None, batch_size: int, curve_attack: Attack | None,
                 eps_grid: Sequence[float]) -> None:
    for eps in eps_grid:  # each a valid budget of this threat model, before any attack runs
        threat.with_eps(eps)
    if len(set(eps_grid)) != len(eps_grid):
        raise ConfigError(f"eps_grid names an eps twice: {list(eps_grid)}")
    if not attacks:
        raise ConfigError("evaluate needs at least one attack")
    labels = [attack.label for attack in attacks]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:  # results are looked up by label: the second would hide the first
        raise ConfigError(f"the attacks name {', '.join(twice)} twice; give each attack once")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for attack in [*attacks, *([curve_attack] if curve_attack is not None else [])]:
        if attack.threat != threat:
            theirs, ours = attack.threat.describe_against(threat)
            raise ConfigError(f"attack {attack.label!r} uses {theirs} but the evaluation's threat model "
                              f"is {ours}")
    threat.check_inputs(x)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    check_label_dtype(y)
    if num_classes is not None:
        check_label_range(y, num_classes)


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """The clean logits; inputs the model cannot take (another dtype or shape) are a DataError that
    names them, as the attacks raise, rather than torch's own error."""
    try:
        with torch.inference_mode():
            return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    except (RuntimeError, TypeError, ValueError) as err:
        diagnose_failure(model, x, torch.zeros(0, dtype=torch.long, device=x.device), err)
        raise


def _logit_warnings(logits: Tensor) -> list[str]:
    warnings = []
    if logits.numel() and bool(((logits >= 0) & (logits <= 1)).all()):
        sums = logits.sum(dim=1)
        if torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            warnings.append("the model's outputs lie in [0, 1] and sum to 1: it seems to return "
                            "probabilities, not logits; attacks on a softmax output get weak "
                            "gradients and overstate robustness")
    return warnings


def _exact_fields(kind: type, data: Any, what: str) -> dict[str, Any]:
    """``data`` as the keyword arguments of the dataclass ``kind``: every field, and no other key."""
    if not isinstance(data, dict):
        raise DataError(f"{what} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    missing, unexpected = sorted(names - set(data)), sorted(set(data) - names)
    if missing or unexpected:
        raise DataError(f"{what} lacks the fields {missing} and holds the unexpected {unexpected}")
    return dict(data)


def _listed(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise DataError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _run_attack(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, todo: Tensor,
                batch_size: int, cascade: bool, *, journal: Journal | None = None,
                attack_index: int = 0, shard: DistributedContext | None = None) -> AttackResult:
    """Attack the examples marked in ``todo``; the rest count as not robust."""
    index = todo.nonzero().squeeze(1)
    robust = torch.zeros_like(todo)
    norms = torch.zeros(len(index), device=x.device)
    generator = torch.Generator(device=x.device).manual_seed(attack.seed)
    first = 0
    partial = journal.partial(attack_index) if journal is not None else None
    if partial is not None:
        assert journal is not None
        _check_partial(partial, todo, index, batch_size, journal.directory)
        first = partial.next_start
        robust, norms = partial.robust.to(x.device), partial.norms.to(x.device)
    for start in range(first, len(index), batch_size):
        if shard is not None and not shard.owns(start // batch_size):
            continue
        generator.manual_seed(batch_seed(attack.seed, start // batch_size))
        chunk = index[start:start + batch_size]
        x_adv = attack(model, x[chunk], y[chunk], generator=generator)
        _verify(attack, x_adv, x[chunk])
        with torch.inference_mode():
            robust[chunk] = predicted_class(model(x_adv)) == y[chunk]
        norms[start:start + len(chunk)] = attack.threat.distance(x_adv, x[chunk])
        if journal is not None:
            journal.save_partial(Partial(attack_index, start + batch_size, robust, norms))
    if shard is not None:  # each example was attacked by one rank; the others hold zeros for it
        robust, norms = shard.merge(robust, norms)
    fooled = ~robust[index]
    successful_norms = norms[fooled]
    return AttackResult(
        name=attack.label, settings=attack.describe(),
        mode="cascade" if cascade else "independent", attacked=len(index),
        adversarial_accuracy=float(robust.float().mean()),
        success_rate=float(fooled.float().mean()) if len(index) else None,
        mean_norm=float(norms.mean()) if len(index) else 0.0,
        max_norm=float(norms.max()) if len(index) else 0.0,
        median_norm_successful=median(successful_norms),
        robust=robust.tolist())


def _check_partial(partial: Partial, todo: Tensor, index: Tensor, batch_size: int, journal_dir: Path) -> None:
    """Refuse an attack-under-way record that this evaluation cannot have written: outcomes of another
    length, a position past the end or between batches, or robust examples outside the attacked ones
    or in batches not yet run (a damaged or edited journal would otherwise stop with a traceback or
    put numbers no attack measured into the report)."""
    robust = partial.robust.to(todo.device)
    attacked, start = len(index), partial.next_start
    problem = None
    if robust.shape != todo.shape or partial.norms.shape != (attacked,):
        problem = (f"outcomes for {tuple(robust.shape)} and norms for {tuple(partial.norms.shape)} "
                   f"examples where {len(todo)} and {attacked} belong")
    elif start % batch_size or not 0 < start < attacked + batch_size:
        problem = (f"it stopped at example {start}, not after a batch of {batch_size} of the "
                   f"{attacked} attacked")
    elif bool((robust & ~todo).any()) or bool(robust[index[start:]].any()):
        problem = "robust examples the attack had not reached"
    if problem is not None:
        raise CheckpointError(f"the journal in {journal_dir} is damaged ({problem}); "
                              f"{start_afresh(journal_dir)}")


def _verify(attack: Attack, x_adv: Tensor, x: Tensor) -> None:
    inside = attack.threat.contains(x_adv, x)
    if not bool(inside.all()):
        outside = int((~inside).sum())
        worst = float(attack.threat.distance(x_adv, x).max())
        raise ThreatModelViolation(
            f"attack {attack.label!r} returned {outside} point(s) outside {attack.threat.describe()}"
            f" (largest distance {worst:.6g}); its result is refused")


def _eps_curve(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, clean_correct: Tensor,
               batch_size: int, eps_grid: Sequence[float] | None,
               shard: DistributedContext | None = None) -> list[EpsPoint]:
    points = []
    for eps in sorted(eps_grid or []):
        scaled = attack.with_threat(attack.threat.with_eps(eps))
        result = _run_attack(model, scaled, x, y, clean_correct, batch_size, cascade=False,
                             shard=shard)
        points.append(EpsPoint(eps=eps, accuracy=result.adversarial_accuracy))
    return points
