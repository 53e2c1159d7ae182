"""Per-attack options from a configuration file, checked against the attack's own signature.

YAML hands over whatever was written: ``random_start: "no"`` is a non-empty string, which Python
takes as true, and ``steps: true`` a bool, which Python takes as 1. Each option is checked here
against its parameter's annotation (bool, int, float) before the attack is built, so that such a
value is refused by name instead of changing the attack silently. NaN and infinities are refused
earlier, when the configuration is read (``EvalConfig``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fortify.errors import ConfigError


def check_option_types(attack_name: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """ConfigError for an option the attack does not take (listing those it takes) or whose value
    does not fit its parameter's annotated type."""
    parameters = {name: p for name, p in inspect.signature(factory).parameters.items() if name != "threat"}
    for key, value in options.items():
        parameter = parameters.get(key)
        if parameter is None:
            raise ConfigError(f"attack_options for {attack_name!r}: unknown option {key!r}; it takes "
                              f"{', '.join(parameters)}")
        problem = _type_problem(str(parameter.annotation), value)
        if problem is not None:
            raise ConfigError(f"attack_options for {attack_name!r}: {key}={value!r} {problem}")


def _type_problem(annotation: str, value: Any) -> str | None:
    kinds = {part.strip() for part in annotation.split("|")}
    if value is None:
        return None if "None" in kinds else "may not be null"
    if "bool" in kinds:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool) and kinds & {"int", "float"}:
        return "must be a number, not true or false"
    if "int" in kinds and "float" not in kinds:
        return None if isinstance(value, int) else "must be a whole number"
    if "float" in kinds and not isinstance(value, (int, float)):
        return "must be a number"
    return None
