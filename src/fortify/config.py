"""Run configuration: pydantic models validated from YAML plus command-line overrides.

Every setting is resolved here before anything runs, so a bad value stops the run before a single
file is written. Unknown keys are errors, not silently ignored typos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fortify.errors import ConfigError, shortened


class _Strict(BaseModel):
    # no setting takes an infinite or NaN value: `lr: .inf` would train into NaN losses
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read YAML's `epochs: true` as 1, and `early_stopping: 10` (meant for
        # `patience`) as true
        if info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _is_number_field(annotation):
            raise ValueError("a number is expected, not true or false")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_switch_field(annotation):
            raise ValueError("true or false is expected, not a number")
        if isinstance(value, list) and any(isinstance(v, bool) for v in value) \
                and _is_number_list_field(annotation):
            raise ValueError(f"numbers are expected, not true or false: {value}")
        return value


def _kinds(annotation: Any) -> set[Any]:
    """The types a field takes: the members of a union, else the annotation itself."""
    return set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}


def _is_number_field(annotation: Any) -> bool:
    kinds = _kinds(annotation)
    return bool(kinds & {int, float}) and bool not in kinds


def _is_switch_field(annotation: Any) -> bool:
    kinds = _kinds(annotation)
    return bool in kinds and not kinds & {int, float}


def _is_number_list_field(annotation: Any) -> bool:
    """``list[float]`` (or ``list[float] | None``): a list of numbers."""
    kinds = _kinds(annotation)
    return any(get_origin(kind) is list and _is_number_field(get_args(kind)[0]) for kind in kinds)


class DataConfig(_Strict):
    name: str = "digits"
    path: Path | None = None
    seed: int = Field(0, ge=0, lt=2**63)  # what torch's generators take
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    cache_dir: Path = Path.home() / ".cache" / "fortify"
    download: bool = True
    target: str | None = None  # label column of a csv dataset
    feature_schema: str | None = None  # tabular schema: a YAML path or a bundled name (fortify.tabular)


class ModelConfig(_Strict):
    name: str | None = None  # None: the dataset's default model
    normalize: bool = True


class ThreatConfig(_Strict):
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.2, gt=0)


class AugmentConfig(_Strict):
    """Batch augmentation before the attack (fortify.training.augment); every step off by default."""

    crop_padding: int = Field(0, ge=0)  # random crop after padding each side by this many pixels
    flip: bool = False  # left-right mirror with probability 1/2
    cutout_size: int = Field(0, ge=0)  # side of the square cutout erases

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.cutout_size)


# The peak learning rate of an objective when train.lr is unset. Free AT takes free_replays optimiser
# steps per batch where the other objectives take one; on digits it diverged at 0.05 on one of two
# CPUs and trained better at 0.02 on both budgets measured (docs/RECIPES.md).
DEFAULT_LR = 0.05
DEFAULT_LR_BY_OBJECTIVE = {"free": 0.02}


def default_lr(objective: str) -> float:
    """The learning rate ``objective`` trains at when ``train.lr`` is unset."""
    return DEFAULT_LR_BY_OBJECTIVE.get(objective, DEFAULT_LR)


class TrainConfig(_Strict):
    objective: str = "pgd"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float | None = Field(None, gt=0)  # None: default_lr(objective); read it as learning_rate
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "piecewise", "cosine", "cyclic"] = "cosine"
    eps_warmup_epochs: int = Field(0, ge=0)
    # upper bounds on step counts: a typo of many digits would otherwise run without end
    attack_steps: int = Field(10, ge=1, le=10_000)
    attack_step_size: float | None = Field(None, gt=0)
    fgsm_ratio: float = Field(0.5, ge=0, le=1)
    trades_beta: float = Field(6.0, ge=0)
    mart_beta: float = Field(6.0, ge=0)
    free_replays: int = Field(8, ge=1)
    awp_gamma: float = Field(5e-3, ge=0)
    awp_warmup_epochs: int = Field(0, ge=0)  # epochs of the wrapped objective before AWP starts
    mix_ratio: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    noise_sigma: float = Field(0.25, gt=0, allow_inf_nan=False)  # `gaussian`: std of the training noise
    early_stopping: bool = True
    patience: int = Field(10, ge=1)
    val_attack_steps: int = Field(10, ge=1, le=10_000)
    grad_clip: float | None = Field(None, gt=0)
    amp: bool = False  # bf16 autocast for the training passes (CUDA, or a CPU with native bf16)
    seed: int = Field(0, ge=0, lt=2**63)  # what torch's generators take
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    ema_decay: float | None = Field(None, ge=0, le=1)  # None: no EMA; else the evaluated weights
    extra_data: Path | None = None  # .npz with x, y like the dataset (fortify.training.extra_data)
    extra_fraction: float = Field(0.0, ge=0, lt=1)  # share of each batch drawn from extra_data
    # channels_last conv weights and inputs while training (speed only; the weights come back in the
    # default layout); None: on for CPU training in one process of a model that runs so, not under DP
    channels_last: bool | None = None
    # torch.compile the training passes: True (torch's default mode) or a mode by name;
    # "reduce-overhead" replays CUDA graphs, which pays off on a GPU (docs/PERFORMANCE.md)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False
    # record the whole eager training step (attack, backward, optimiser step) as one CUDA graph and
    # replay it: no launch overhead and no compilation (fortify.training.step_graph)
    cuda_graph: bool = False

    @model_validator(mode="after")
    def _check_extra_data(self) -> TrainConfig:
        if (self.extra_data is None) != (self.extra_fraction == 0):
            raise ValueError("extra_data and extra_fraction go together: give a .npz path and a "
                             f"fraction in (0, 1), got extra_data={self.extra_data}, "
                             f"extra_fraction={self.extra_fraction}")
        return self

    @model_validator(mode="after")
    def _check_warmups_end(self) -> TrainConfig:
        # a warm-up as long as the run never trains at the threat's eps (and early stopping, which
        # waits for its end, never counts), or never perturbs the weights of an awp-* objective
        if self.eps_warmup_epochs and self.eps_warmup_epochs >= self.epochs:
            raise ValueError(f"eps_warmup_epochs ({self.eps_warmup_epochs}) must be below epochs "
                             f"({self.epochs}): the run would end before training at the threat's eps")
        if self.objective.startswith("awp-") and self.awp_warmup_epochs >= self.epochs:
            raise ValueError(f"awp_warmup_epochs ({self.awp_warmup_epochs}) must be below epochs "
                             f"({self.epochs}): {self.objective} would never perturb the weights")
        return self

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, or the objective's default when it is unset."""
        return self.lr if self.lr is not None else default_lr(self.objective)


# the attacks a preset runs, as a cascade (each sees only the examples still robust)
PRESETS = {"autoattack": ("apgd-ce", "apgd-t", "fab-t", "square")}


class EvalConfig(_Strict):
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd"])
    # "autoattack": APGD-CE, APGD-T, FAB-T, Square as a cascade (replaces `attacks`)
    preset: Literal["autoattack"] | None = None
    steps: int | None = Field(None, ge=1, le=1_000_000)  # None: PGD 20, every other its paper's default
    restarts: int | None = Field(None, ge=1)
    queries: int | None = Field(None, ge=1)  # query budget of the black-box attacks
    attack_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per attack name
    surrogate: Path | None = None  # model directory the transfer attack crafts on
    n_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    eps_grid: list[float] | None = None  # None: 0.25..1.5 times the threat's eps
    cascade: bool = False
    seed: int = Field(0, ge=0, lt=2**63)  # what torch's generators take
    # autocast precision of attacks and predictions; the first examples are checked against fp32
    amp: Literal["bf16", "fp16"] | None = None
    amp_min_agreement: float = Field(0.9, gt=0, le=1)  # below it, the fp32 check warns
    # attack and analyse with channels_last conv weights (speed only); None: on CPU when the model
    # has 4-D weights and runs so, else off (fortify.pipeline.eval_channels_last)
    channels_last: bool | None = None

    @field_validator("attack_options")
    @classmethod
    def _finite_options(cls, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # checked here, not only when the attacks are built: a dump to JSON would turn NaN into null
        for attack, settings in options.items():
            for key, value in settings.items():
                _check_finite(f"{attack}.{key}", value)
        return options

    def _check_preset_overrides_nothing_given(self) -> None:
        """A preset runs its own attacks, cascaded: an attack list or ``cascade: false`` given beside
        it would be replaced without a word (a dumped config holds the preset's own list: accepted)."""
        given = self.model_fields_set
        if "attacks" in given and list(self.attacks) != list(PRESETS[self.preset]):
            raise ValueError(f"preset {self.preset!r} runs {', '.join(PRESETS[self.preset])}, not the "
                             f"attacks given beside it ({', '.join(self.attacks)}); give one of preset "
                             "and attacks")
        if "cascade" in given and not self.cascade:
            raise ValueError(f"preset {self.preset!r} cascades its attacks; cascade: false does not apply")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.eps_grid is not None and any(e <= 0 for e in self.eps_grid):
            raise ValueError(f"every eps in eps_grid must be > 0, got {self.eps_grid}")
        if self.eps_grid is not None and len(set(self.eps_grid)) != len(self.eps_grid):
            raise ValueError(f"eps_grid names an eps twice: {self.eps_grid}")
        if not self.attacks:
            raise ValueError("attacks must name at least one attack")
        if self.preset is not None:
            self._check_preset_overrides_nothing_given()
            # a preset replaces the attack list and cascades: record what runs, not what was replaced
            self.__dict__.update(attacks=list(PRESETS[self.preset]), cascade=True)
        twice = sorted({name for name in self.attacks if self.attacks.count(name) > 1})
        if twice:  # refused here, before a run trains: evaluation refuses it too, once the training is done
            raise ValueError(f"attacks names {', '.join(twice)} twice; give each attack once "
                             "(more random starts: restarts)")
        return self


def _check_finite(where: str, value: Any) -> None:
    """Every number in ``value``, however deep in lists and mappings, is finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(f"{where}[{i}]", item)


# what DPConfig holds for DP training alone; canaries also audit a model trained without DP
_DP_ONLY = ("target_epsilon", "noise_multiplier", "delta", "max_grad_norm", "max_physical_batch_size",
            "accountant", "noise_seed")

class DPConfig(_Strict):
    """Differentially private training with Opacus (see docs/DP.md); off unless ``enabled``."""

    enabled: bool = False
    target_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)  # noise chosen to spend this
    noise_multiplier: float | None = Field(None, ge=0, allow_inf_nan=False)  # or a fixed noise level
    delta: float = Field(1e-5, gt=0, lt=1)  # must also be < 1/n, checked once n is known
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    max_physical_batch_size: int | None = Field(None, ge=1)  # None: whole logical batches
    accountant: Literal["prv", "rdp"] = "prv"
    canaries: int = Field(0, ge=0)  # mislabelled canaries per side for the empirical audit
    # None: Poisson sampling and noise drawn from generators seeded by the OS's entropy, so that no one
    # can recompute the noise from the published settings; a number makes them repeatable (experiments
    # only: whoever knows it and the training seed knows the noise)
    noise_seed: int | None = Field(None, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _check(self) -> DPConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier, got "
                             f"target_epsilon={self.target_epsilon}, "
                             f"noise_multiplier={self.noise_multiplier}")
        if not self.enabled:
            # a private setting without DP would be dropped without a word, and the run trained in the
            # clear under a config that reads as private (canaries are a non-private audit too)
            fields = type(self).model_fields
            given = sorted(name for name in _DP_ONLY if getattr(self, name) != fields[name].default)
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"{', '.join('dp.' + name for name in given)} only {verb} to DP training: "
                                 "set dp.enabled: true (or --dp), or remove it")
        if self.canaries == 1:  # refused here: the audit would refuse it only after the training
            raise ValueError("canaries must be 0 (off) or at least 2 per side: the audit splits each side "
                             "into a threshold half and an evaluation half")
        return self


MAX_REFERENCE_MODELS = 256  # LiRA's paper trains at most 256 shadow models; each is a whole training run


class AnalysisConfig(_Strict):
    """The report's per-model measurements (fortify.evaluation.analysis) and the privacy audit."""

    enabled: bool = True
    margin_examples: int = Field(100, ge=1)  # FMN minimal-norm search
    margin_steps: int = Field(100, ge=1, le=1_000_000)
    certify_examples: int = Field(100, ge=1)  # randomized smoothing
    # None: the model's train.noise_sigma when it trained with `gaussian` (its smoothing noise), else 0.25
    certify_sigma: float | None = Field(None, gt=0, allow_inf_nan=False)
    certify_n: int = Field(1000, ge=1)
    certify_alpha: float = Field(0.001, gt=0, lt=1)
    masking_examples: int = Field(200, ge=1)
    gallery_examples: int = Field(8, ge=0)
    privacy: bool = True  # threshold membership inference, members = train, non-members = test
    # LiRA beside it: reference models trained as the audited model was (each costs a training run);
    # 0 runs none, LiRA needs at least 2. lira_queries "training": also the flips and shifts that
    # train.augment trained on (images)
    reference_models: int = Field(0, ge=0, le=MAX_REFERENCE_MODELS)
    lira_queries: Literal["single", "training"] = "single"

    @model_validator(mode="after")
    def _check_lira(self) -> AnalysisConfig:
        if self.reference_models == 1:
            raise ValueError("reference_models=1 is too few: LiRA needs at least 2 reference models "
                             "(or 0 to skip it)")
        if self.lira_queries != "single" and self.reference_models == 0:
            raise ValueError("lira_queries applies to LiRA: set reference_models >= 2 as well")
        return self


class RunConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    dp: DPConfig = Field(default_factory=DPConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "config"
        if problem["type"] == "extra_forbidden":
            valid = _section_keys(root, problem["loc"][:-1])
            lines.append(f"unknown key {where!r}" + (f" (valid keys: {', '.join(valid)})" if valid else ""))
        else:
            given = problem.get("input")
            # a whole section's check names its values itself; repeating the section says nothing
            shown = "" if isinstance(given, dict) else f" (got {shortened(repr(given))})"
            lines.append(f"{where}: {shortened(problem['msg'], 300)}{shown}")
    return "invalid configuration: " + "; ".join(lines)


def _section_keys(root: type[BaseModel], path: Sequence[Any]) -> list[str]:
    """The keys the section at ``path`` of ``root`` accepts ([] when the path leads to no section)."""
    section: Any = root
    for name in path:
        field_info = section.model_fields.get(name) if isinstance(section, type) else None
        section = field_info.annotation if field_info is not None else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return []
    return list(section.model_fields)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, dict) and key in merged:
            continue  # a section that is not a mapping (`train: 5`) stays, for validation to refuse
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key (<<: *anchor); keys given beside it may override the merged ones
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# -- comparing settings (resume and sweeps refuse a run made under others) ----------------------

# settings that change no result: where data is cached, whether it may be downloaded, whether the
# step is compiled, replayed from a CUDA graph or runs channels_last (the same arithmetic, rounded in
# another order). cache_dir holds an absolute home directory another user or container would not
# share, so a run continued there must not be refused over it; a run started before channels_last
# became the CPU default recorded it as false, and resumes under the default; eval.channels_last
# changes the attacks' float rounding at most (docs/ATTACKS.md), as train.channels_last and compile
# change the training's
NOT_RESULT_SETTINGS = {"data": ("cache_dir", "download"),
                       "train": ("compile", "cuda_graph", "channels_last"), "eval": ("channels_last",)}


def comparable_train_settings(train: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig's ``model_dump(mode="json")`` without NOT_RESULT_SETTINGS."""
    return comparable_settings({"train": train})["train"]


_FILE_SETTINGS = (("data", "path"), ("train", "extra_data"))


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A config's sections (``model_dump(mode="json")``) without NOT_RESULT_SETTINGS, with file paths
    made absolute (from the working directory), and with the learning rate an unset ``train.lr``
    stands for (a run recorded before it could be unset holds the number)."""
    compared = {section: {k: v for k, v in values.items() if k not in NOT_RESULT_SETTINGS.get(section, ())}
                if isinstance(values, dict) else values for section, values in settings.items()}
    for section, key in _FILE_SETTINGS:  # one file, however its path is spelled, is one setting
        values = compared.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = str(Path(values[key]).expanduser().resolve())
    train = compared.get("train")
    if isinstance(train, dict) and train.get("lr") is None and isinstance(train.get("objective"), str):
        train["lr"] = default_lr(train["objective"])
    return compared


_MISSING = object()


def setting_differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key was X, now Y`` for each setting that differs; nested sections as dotted keys."""
    differing = []
    for key in sorted(set(before) | set(now), key=str):
        old, new = before.get(key, _MISSING), now.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            differing += setting_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differing.append(f"{prefix}{key} was {_shown(old)}, now {_shown(new)}")
    return differing


def _shown(value: Any) -> str:
    return "not set" if value is _MISSING else repr(value)


def listed(differing: list[str], most: int = 4) -> str:
    """The first ``most`` differences for a one-line message, and how many more there are."""
    more = f" (and {len(differing) - most} more)" if len(differing) > most else ""
    return "; ".join(differing[:most]) + more


def load_yaml(path: Path | str, kind: str = "config") -> Any:
    """What a YAML file holds (safe loader: plain data only); ConfigError naming the ``kind`` of file
    when it cannot be read or parsed."""
    if Path(path).exists() and not Path(path).is_file():
        # a pipe (``--config <(...)``) reads once: a command that reads its config twice would find it
        # empty the second time and drop its settings without a word
        raise ConfigError(f"{kind} file {path} is not a regular file; write the {kind} to a file first")
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except OSError as err:
        raise ConfigError(f"cannot read {kind} file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} file {path} is not valid YAML: {one_line_yaml_error(err)}") from None
    except RecursionError:
        raise ConfigError(f"{kind} file {path} nests its values deeper than a {kind} does") from None


def one_line_yaml_error(err: yaml.YAMLError) -> str:
    """``line L, column C: problem (context)`` from a PyYAML error: its own message spans several
    lines (the line quoted, a caret under it), and fortify's errors are one line."""
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or mark is None:
        return " ".join(str(err).split())
    context = f" ({err.context})" if err.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{context}"


def read_yaml_mapping(path: Path | None) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} without a file); a clear ConfigError otherwise."""
    if path is None:
        return {}
    loaded = load_yaml(path)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (optional), apply nested overrides (flags win), validate."""
    return config_from_dict(read_yaml_mapping(path), overrides)


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate a mapping (as read from YAML) with nested overrides applied."""
    try:
        return RunConfig.model_validate(_merge(raw, overrides or {}))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, RunConfig)) from None
