"""The fields of a results file that the report reads, and the types it needs them to have.

The report formats, iterates and indexes results.json's values deep inside its template; a string
where it formats a number, or null where it iterates a list, would crash there with a traceback.
``check`` walks the file once where it is read and names the first such field instead. Only what the
page, the comparison and the CLI's summary table read is checked; any other field may hold anything.
Sections the report can do without (analysis, privacy, ...) may be absent, null or empty, but when
present they must hold what the page reads from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any, str], None]


class Mismatch(Exception):
    """A field is missing or of the wrong type; ``where`` is its path in the file."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where} {problem}")


def _shown(value: Any) -> str:
    """A value as JSON names it, cut short: the message is one line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    return repr(value)


def _mismatch(where: str, value: Any, expected: str) -> Mismatch:
    return Mismatch(where, f"is {_shown(value)}; expected {expected}")


# -- leaves ------------------------------------------------------------------------------------

def anything(value: Any, where: str) -> None:
    """Printed as it is: only its presence matters."""


def number(value: Any, where: str) -> None:
    # bool is an int in Python but true/false in JSON, never a measurement. NaN and Infinity pass:
    # fortify writes them as null now, but older results files hold them, and the page prints n/a
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _mismatch(where, value, "a number")


def fraction(value: Any, where: str) -> None:
    """An accuracy or rate: printed as a percentage, so 2.5 or NaN would print as nonsense."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _mismatch(where, value, "a number from 0 to 1")


def _or_null(check: Check, expected: str) -> Check:
    """``check``, or null (shown as 'n/a'; non-finite values are written as null)."""
    def checked(value: Any, where: str) -> None:
        if value is not None:
            try:
                check(value, where)
            except Mismatch:
                raise _mismatch(where, value, expected) from None
    return checked


number_or_null = _or_null(number, "a number or null")
fraction_or_null = _or_null(fraction, "a number from 0 to 1, or null")


def positive(value: Any, where: str) -> None:
    number(value, where)
    if not (0 < value < float("inf")):
        raise _mismatch(where, value, "a finite number > 0")


def count(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _mismatch(where, value, "a whole number >= 0")


def text(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise _mismatch(where, value, "a string")


# -- containers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Absent:
    """A record field that may be left out; ``empty`` also lets null, {} or [] stand for 'left out'."""

    check: Check
    empty: bool = False


def optional(check: Check) -> _Absent:
    return _Absent(check)


def section(check: Check) -> _Absent:
    """A part the page leaves out with a note when it is absent or empty (its template tests truth)."""
    return _Absent(check, empty=True)


def record(**fields: Check | _Absent) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _mismatch(where, value, "an object")
        for key, field in fields.items():
            inner = f"{where}.{key}" if where else key
            if isinstance(field, _Absent):
                if key in value and not (field.empty and not value[key]):
                    field.check(value[key], inner)
            elif key not in value:
                raise Mismatch(where or "the file", f"lacks {key}")
            else:
                field(value[key], inner)
    return check


def list_of(item: Check, *, length: int | None = None, min_length: int = 0) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise _mismatch(where, value, "a list")
        if length is not None and len(value) != length:
            raise _mismatch(where, value, f"a list of {length}")
        if len(value) < min_length:
            raise _mismatch(where, value, f"a list of at least {min_length}")
        for index, element in enumerate(value):
            item(element, f"{where}[{index}]")
    return check


def equal_to(expected: Any) -> Check:
    def check(value: Any, where: str) -> None:
        if value != expected or isinstance(value, bool) != isinstance(expected, bool):
            raise _mismatch(where, value, repr(expected))
    return check


def paired(first: str, second: str) -> Check:
    """A record whose lists ``first`` and ``second`` pair up by position, so are equally long: one
    entry short, the page had shown every share under the next eps."""
    def check(value: Any, where: str) -> None:
        a, b = (value.get(key) if isinstance(value, dict) else None for key in (first, second))
        if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
            raise Mismatch(where or "the file", f"holds {len(a)} {first} but {len(b)} {second}")
    return check


def all_of(*checks: Check) -> Check:
    def check(value: Any, where: str) -> None:
        for each in checks:
            each(value, where)
    return check


def mapping_of(item: Check, *, min_length: int = 0) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _mismatch(where, value, "an object")
        if len(value) < min_length:
            raise Mismatch(where, "is empty; expected at least one entry")
        for key, element in value.items():
            item(element, f"{where}.{key}")
    return check


# -- what the report reads ---------------------------------------------------------------------

THREAT = record(norm=text, eps=positive, bounds=list_of(number, length=2),
                constraints=optional(record(description=text, schema=anything)))

ATTACK = record(name=text, settings=anything, mode=anything, attacked=anything, adversarial_accuracy=fraction,
                success_rate=fraction_or_null, median_norm_successful=number_or_null)

# every field the page prints with pct() is a fraction: 2.5 or NaN would print as 250.0% or nan%
PRECISION = record(amp=anything, examples=anything, clean_agreement=fraction_or_null, attack=anything,
                   attacked=anything, robust_agreement=fraction_or_null)

# the CLI's summary table multiplies the accuracies by 100, so null is no more allowed than a string
ROBUSTNESS = record(
    n_examples=anything, clean_accuracy=fraction, worst_case_accuracy=fraction, attacks=list_of(ATTACK),
    eps_curve=list_of(record(eps=positive, accuracy=fraction_or_null)), eps_curve_attack=anything,
    warnings=list_of(anything), precision=section(PRECISION))

_SHIFT = record(clean_mean=number_or_null, adversarial_mean=number_or_null, shift=number_or_null)
_CLASSES = record(macro_precision=number_or_null, macro_recall=number_or_null, macro_f1=number_or_null)

ANALYSIS = record(
    attack=anything,
    score=record(clean_accuracy=fraction_or_null, worst_case_accuracy=fraction_or_null,
                 harmonic_mean=number_or_null, eps_auc=number_or_null, eps_max=number_or_null),
    margin=record(norm=anything, summary=all_of(record(
        n_examples=anything, n_not_found=anything, q1=number_or_null, median=number_or_null,
        q3=number_or_null, eps=list_of(number_or_null), fraction_below=list_of(fraction_or_null)),
        paired("eps", "fraction_below"))),
    certified=record(sigma=anything, n=anything, alpha=anything, abstained=anything,
                     above_margin=list_of(anything),
                     curve=all_of(record(n_examples=anything, radii=optional(list_of(number_or_null)),
                                         accuracy=list_of(fraction_or_null, min_length=1)),
                                  paired("radii", "accuracy"))),
    metrics=record(entropy=_SHIFT, margin=_SHIFT, classes=record(clean=_CLASSES, adversarial=_CLASSES)),
    masking=record(masked=anything, n_attacked=anything, n_examples=anything,
                   checks=list_of(record(name=anything, passed=anything, explanation=anything,
                                         evidence=anything)),
                   adaptive=section(list_of(record(name=anything, triggered_by=list_of(anything),
                                                   plain_success=fraction_or_null,
                                                   adaptive_success=fraction_or_null))),
                   notes=optional(list_of(anything))),
    gallery=record())

# the verdict takes the strongest attack by AUC, so the AUCs must compare as numbers
MEMBERSHIP = record(attack=anything, n_members=anything, n_nonmembers=anything, auc=fraction,
                    balanced_accuracy=number_or_null, advantage=number_or_null,
                    tpr_at_fpr=mapping_of(fraction_or_null))

PRIVACY = record(membership=list_of(MEMBERSHIP), warnings=list_of(anything))
PRIVACY_FILE = record(kind=equal_to("privacy"), privacy=PRIVACY)  # privacy.json, as `fortify audit` writes it

TABULAR = record(
    settings=list_of(record(setting=anything, threat=anything, worst_case_accuracy=fraction_or_null,
                            accuracy=mapping_of(fraction_or_null))),
    feature_changes=anything)

TRAINING = record(
    seconds=number, history=list_of(record(epsilon=optional(number_or_null))), best_epoch=anything,
    selection_metric=anything, stopped_early=anything,
    privacy=section(record(accountant=anything, epsilon=number_or_null, delta=anything,
                           noise_multiplier=number_or_null, max_grad_norm=anything, steps=anything,
                           replaced_modules=list_of(anything))),
    canary_audit=section(record(n_inserted=anything, n_held_out=anything, epsilon_lower=number_or_null,
                                confidence=fraction_or_null, auc=number_or_null)))

MODEL = record(robustness=ROBUSTNESS, analysis=section(ANALYSIS), privacy=section(PRIVACY),
               tabular=section(TABULAR), training=section(TRAINING))

# kind 'comparison' (fortify run): every model's sections under models.NAME
# the classes' names label the per-class figures; inputs_also_in_train counts held-out copies
# of training inputs (the report warns of them)
DATASET_FIELDS = {"class_names": optional(list_of(text)),
                  "inputs_also_in_train": optional(record(validation=count, test=count))}
DATASET = record(name=text, **DATASET_FIELDS)

COMPARISON = record(threat=THREAT, dataset=DATASET, models=mapping_of(MODEL, min_length=1),
                    notes=optional(list_of(text)), provenance=optional(record()))

# kind 'evaluation' (fortify evaluate): one model's sections at the top level
EVALUATION = record(robustness=all_of(ROBUSTNESS, record(threat=THREAT)),
                    config=record(data=optional(record(name=optional(text)))),
                    dataset=optional(record(**DATASET_FIELDS)),
                    analysis=section(ANALYSIS), privacy=section(PRIVACY), tabular=section(TABULAR),
                    provenance=optional(record()))


def check(value: Any, spec: Check) -> None:
    """Raise Mismatch naming the first field of ``value`` the report could not read."""
    spec(value, "")
