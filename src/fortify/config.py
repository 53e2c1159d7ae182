"""Run configuration: pydantic models validated from YAML plus command-line overrides.

Every setting is resolved here before anything runs, so a bad value stops the run before a single
file is written. Unknown keys are errors, not silently ignored typos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fortify.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = "digits"
    path: Path | None = None
    seed: int = 0
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    cache_dir: Path = Path.home() / ".cache" / "fortify"
    download: bool = True


class ModelConfig(_Strict):
    name: str | None = None  # None: the dataset's default model
    normalize: bool = True


class ThreatConfig(_Strict):
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.2, gt=0)


class TrainConfig(_Strict):
    objective: str = "pgd"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "piecewise", "cosine", "cyclic"] = "cosine"
    eps_warmup_epochs: int = Field(0, ge=0)
    attack_steps: int = Field(10, ge=1)
    attack_step_size: float | None = Field(None, gt=0)
    fgsm_ratio: float = Field(0.5, ge=0, le=1)
    trades_beta: float = Field(6.0, ge=0)
    mart_beta: float = Field(6.0, ge=0)
    free_replays: int = Field(8, ge=1)
    awp_gamma: float = Field(5e-3, ge=0)
    mix_ratio: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    early_stopping: bool = True
    patience: int = Field(10, ge=1)
    val_attack_steps: int = Field(10, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    amp: bool = False
    seed: int = 0


class EvalConfig(_Strict):
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd"])
    # "autoattack": APGD-CE, APGD-T, FAB-T, Square as a cascade (replaces `attacks`)
    preset: Literal["autoattack"] | None = None
    steps: int | None = Field(None, ge=1)  # None: PGD 20, every other attack its paper's default
    restarts: int | None = Field(None, ge=1)
    queries: int | None = Field(None, ge=1)  # query budget of the black-box attacks
    attack_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per attack name
    surrogate: Path | None = None  # model directory the transfer attack crafts on
    n_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    eps_grid: list[float] | None = None  # None: 0.25..1.5 times the threat's eps
    cascade: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.eps_grid is not None and any(e <= 0 for e in self.eps_grid):
            raise ValueError(f"every eps in eps_grid must be > 0, got {self.eps_grid}")
        if not self.attacks:
            raise ValueError("attacks must name at least one attack")
        return self


class RunConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "config"
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}")
        else:
            lines.append(f"{where}: {problem['msg']} (got {problem.get('input')!r})")
    return "invalid configuration: " + "; ".join(lines)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (optional), apply nested overrides (flags win), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    try:
        return RunConfig.model_validate(_merge(raw, overrides or {}))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
