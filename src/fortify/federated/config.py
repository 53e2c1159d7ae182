"""What a federated run needs besides a RunConfig, and how both travel through Flower.

Flower hands an app its settings as a flat mapping of scalars (``Context.run_config``, from the
app's ``pyproject.toml`` or ``flwr run --run-config``). ``to_run_config`` flattens a RunConfig plus
a FederationConfig into dotted keys (``train.lr``, ``federation.clients``), a list as its JSON text
(``eval.attacks = '["pgd", "square"]'``); ``from_run_config`` rebuilds and validates them, so the
simulation, the CLI and a real deployment read one format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fortify.config import RunConfig, load_config
from fortify.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "krum", "trimmed-mean", "median")
PARTITIONS = ("iid", "dirichlet")
MALICIOUS_MODES = ("scale", "flip")


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    clients: int = Field(4, ge=1)
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    # Dirichlet concentration: small is skewed, large is near IID
    alpha: float = Field(0.5, gt=0, allow_inf_nan=False)
    partition_seed: int = Field(0, ge=0, lt=2**63)
    strategy: Literal["fedavg", "fedprox", "krum", "trimmed-mean", "median"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, allow_inf_nan=False)
    trim_beta: float = Field(0.25, ge=0, lt=0.5)
    malicious_clients: int = Field(0, ge=0)  # partitions 0 .. k-1 send poisoned updates
    malicious_mode: Literal["scale", "flip"] = "flip"
    malicious_scale: float = Field(10.0, gt=0, allow_inf_nan=False)
    eval_examples: int | None = Field(None, ge=1)
    eval_steps: int = Field(10, ge=1)
    out: str = ""  # where the ServerApp writes the run directory; "" writes nothing
    resume: bool = False  # continue from the progress saved in ``out`` (fortify.federated.progress)


@dataclass(frozen=True)
class FederatedRun:
    """Everything the ClientApp and ServerApp read: the usual RunConfig plus the federation."""

    config: RunConfig
    federation: FederationConfig

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        flat = _flatten(self.config.model_dump(mode="json"))
        flat.update(_flatten({"federation": self.federation.model_dump(mode="json")}))
        return flat

    @classmethod
    def from_run_config(cls, values: dict[str, Any]) -> FederatedRun:
        nested = _read_lists(_unflatten(dict(values)), RunConfig)
        federation = nested.pop("federation", {})
        try:
            fed = FederationConfig.model_validate(federation)
        except ValidationError as err:
            problems = "; ".join(f"federation.{'.'.join(map(str, p['loc']))}: {p['msg']} "
                                 f"(got {p.get('input')!r})" for p in err.errors())
            raise ConfigError(f"invalid federation settings: {problems}") from None
        return cls(load_config(None, nested), fed)


def load_federated_run(path: Path | None, overrides: dict[str, Any],
                       federation: dict[str, Any]) -> FederatedRun:
    """A RunConfig from YAML plus flags, and a validated FederationConfig from flags."""
    config = load_config(path, overrides)
    return FederatedRun.from_run_config({**FederatedRun(config, FederationConfig()).to_run_config(),
                                         **_flatten({"federation": federation})})


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the leaves, a list as its JSON text (``_read_lists`` reads it back): a Flower run
    config holds only bool, int, float and str. None and empty mappings are left out: every setting
    that takes None defaults to it, and an empty mapping of attack options means no options."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
    return flat


def _read_lists(tree: dict[str, Any], model: Any) -> dict[str, Any]:
    """``tree`` with the JSON text of each list read back, where ``model`` (a pydantic model, or the
    annotation of a mapping's values) takes a list: a string setting that looks like JSON stays a
    string; in a mapping of any values (``eval.attack_options``) a JSON list is read as a list."""
    for key, value in tree.items():
        annotation = _annotation_of(model, key)
        if isinstance(value, dict):
            tree[key] = _read_lists(value, annotation)
        elif isinstance(value, str) and _takes_list(annotation):
            tree[key] = _json_list(value)
    return tree


def _annotation_of(model: Any, key: str) -> Any:
    """What ``model`` takes under ``key``; None where it takes nothing (pydantic refuses the key)."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(key)
        return field.annotation if field is not None else None
    if get_origin(model) is dict:
        return get_args(model)[1]
    return Any if model is Any else None


def _takes_list(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, UnionType):
        return any(_takes_list(kind) for kind in get_args(annotation))
    return annotation is Any or annotation is list or get_origin(annotation) is list


def _json_list(text: str) -> Any:
    """The list ``text`` holds as JSON; text that holds none stays text, for the config's own check
    to refuse by name (``eval.attacks: Input should be a valid list``) or, under Any, to keep."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, list) else text


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
