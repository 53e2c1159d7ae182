"""From a RunConfig to trained models, robustness reports and a run directory.

Everything that can be validated (dataset, model, objective, attack names, eps against the box)
is built in ``prepare`` before any file is written, so a bad setting stops the run cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import fortify
from fortify.attacks import APGD, ATTACKS, PGD, Attack
from fortify.attacks.options import check_option_types
from fortify.attacks.transfer import Transfer
from fortify.config import (
    PRESETS,
    AugmentConfig,
    DataConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
    comparable_settings,
    config_from_dict,
    listed,
    load_config,
    read_yaml_mapping,
    setting_differences,
)
from fortify.data import DataOptions, Dataset, Split, load_dataset
from fortify.data.base import splits_sha256
from fortify.errors import CheckpointError, ConfigError, DataError, FortifyError
from fortify.evaluation import RobustnessReport, evaluate
from fortify.evaluation.analysis import AnalysisOptions, ModelAnalysis, analyse
from fortify.evaluation.certify import DEFAULT_SIGMA
from fortify.evaluation.metrics import json_safe
from fortify.evaluation.precision import check_amp_support
from fortify.models import MODELS, build_model
from fortify.models.layout import channels_last, has_4d_tensors, runs_channels_last
from fortify.models.onednn_linear import onednn_linear, onednn_linear_pays
from fortify.tabular.run import run_threat, table_options
from fortify.threat import ThreatModel
from fortify.training import checkpoint as ckpt
from fortify.training.batches import load_recipe_data
from fortify.training.distributed import DistributedContext
from fortify.training.methods import objective_from_config
from fortify.training.objectives import OBJECTIVES, Objective
from fortify.training.trainer import Trainer, TrainResult

if TYPE_CHECKING:  # the privacy package is imported only when an audit runs
    from fortify.privacy.audit import PrivacyReport
    from fortify.privacy.lira import LiraQueries
    from fortify.privacy.recipe import TrainerRecipe

MODEL_CARD = "model.json"
DATA_HASH = "data_sha256"  # the model card's record of the data the model was trained on
EXTRA_DATA_HASH = "extra_data_sha256"  # and of train.extra_data, when given


@dataclass
class Setup:
    config: RunConfig
    dataset: Dataset
    threat: ThreatModel
    model_name: str
    device: torch.device
    extra: Split | None = None  # train.extra_data, loaded and checked once


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


# the datasets that read a file path, and a target column; any other would drop them without a word
_READS_PATH = ("csv", "npz")
_READS_TARGET = ("csv",)


def _check_data_settings_are_read(data: DataConfig) -> None:
    """A data file or target column given to a dataset that ignores it would run on other data than
    the config names (``--data my.npz`` trained on digits)."""
    if data.path is not None and data.name not in _READS_PATH:
        raise ConfigError(f"dataset {data.name!r} does not read data.path ({data.path}); the datasets "
                          f"that read a file: {', '.join(_READS_PATH)} (e.g. --dataset npz)")
    if data.target is not None and data.name not in _READS_TARGET:
        raise ConfigError(f"dataset {data.name!r} has no target column to choose (data.target="
                          f"{data.target!r}); only {', '.join(_READS_TARGET)} reads it")


def _check_test_fraction_is_read(data: DataConfig, dataset: Dataset) -> None:
    """A dataset with its own test split (torchvision's, an npz with x_test) draws none: a test_fraction
    other than the default would be dropped without a word."""
    default = DataConfig.model_fields["test_fraction"].default
    if dataset.metadata.get("fixed_test_split") and data.test_fraction != default:
        raise ConfigError(f"dataset {data.name!r} comes with its own test split, so data.test_fraction="
                          f"{data.test_fraction} is not used; leave it at its default ({default})")


def prepare(config: RunConfig, device: str = "auto", objectives: tuple[str, ...] = (),
            input_encoding: dict[str, Any] | None = None) -> Setup:
    """Load data and check every name and value the run will use; a table with ``input_encoding`` (a
    model card's) encoded as the model's training data was, instead of by its own rows."""
    for objective in objectives or (config.train.objective,):
        OBJECTIVES.get(objective)
    for attack in attack_names(config.eval):
        ATTACKS.get(attack)
    data = config.data
    _check_data_settings_are_read(data)
    dataset = load_dataset(data.name, table_options(DataOptions(
        seed=data.seed, val_fraction=data.val_fraction, test_fraction=data.test_fraction,
        cache_dir=data.cache_dir, path=data.path, download=data.download), data.target, data.feature_schema,
        input_encoding))
    _check_test_fraction_is_read(data, dataset)
    model_name = config.model.name or dataset.default_model
    MODELS.get(model_name)
    # a schema (or a csv dataset) makes the threat model constrained: see fortify.tabular
    threat = run_threat(config.threat.norm, config.threat.eps, dataset, data.feature_schema)
    threat.check_inputs(dataset.test.x[:1])
    for eps in config.eval.eps_grid or ():  # the robustness curve's budgets, checked before any attack
        threat.with_eps(eps)
    surrogate = config.eval.surrogate
    if surrogate is not None:
        if not (Path(surrogate) / MODEL_CARD).is_file():
            raise CheckpointError(f"surrogate {surrogate} holds no trained fortify model ({MODEL_CARD} "
                                  "missing)")
        # a surrogate of other data would only fail in the middle of the evaluation
        check_data_fits_model(read_model_card(Path(surrogate) / MODEL_CARD), dataset, Path(surrogate))
    # a stand-in surrogate: this only checks names and options before any file is written
    build_attacks(config.eval, threat, dataset.num_classes,
                  surrogate=nn.Identity() if surrogate is not None else None)
    if config.eval.amp is not None:
        check_amp_support(config.eval.amp, resolve_device(device))
    extra = load_recipe_data(config.train, dataset, dp=config.dp.enabled)
    return Setup(config, dataset, threat, model_name, resolve_device(device), extra)


# -- models ------------------------------------------------------------------------------------

def new_model(setup: Setup, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    card = model_card(setup)
    model = build_model(card["name"], card["input_shape"], card["num_classes"],
                        mean=card["mean"], std=card["std"])
    return model.to(setup.device)


def model_card(setup: Setup) -> dict[str, Any]:
    normalize = setup.config.model.normalize and setup.dataset.mean is not None
    return {"name": setup.model_name, "input_shape": list(setup.dataset.input_shape),
            "num_classes": setup.dataset.num_classes, "bounds": list(setup.dataset.bounds),
            "mean": list(setup.dataset.mean) if normalize else None,
            "std": list(setup.dataset.std) if normalize else None,
            # a table's encoding (column order, fitted bounds, categories) happens outside the model
            "input_encoding": setup.dataset.metadata.get("schema")}


def data_records(setup: Setup) -> dict[str, str]:
    """What a model card records of the data: their SHA-256, and that of the extra training data."""
    extra = {} if setup.extra is None else {EXTRA_DATA_HASH: splits_sha256((setup.extra,))}
    return {DATA_HASH: setup.dataset.sha256()} | extra


def check_data_unchanged(model_dir: Path, setup: Setup, card: dict[str, Any] | None = None, *,
                         with_extra: bool = True) -> None:
    """ConfigError when ``setup`` names the data ``model_dir``'s model was trained on, split alike,
    but the data are no longer what they were: a file changed under the same path. A resumed run
    would go on training on other data, an evaluation could test on training examples, and an audit
    would call members non-members. The extra training data (``with_extra``) matter to training and
    to audits (their inputs are neither members nor non-members, and LiRA's reference models train on
    them); an evaluation without the report's audit leaves them out.

    ``card`` is the model card as loaded, else the one in ``model_dir`` is read as written. Cards
    written before the record have none."""
    card = _card_if_readable(Path(model_dir) / MODEL_CARD) if card is None else card
    own_path = Path(model_dir) / "config.yaml"
    if card is None or not own_path.is_file():
        return
    own, now = (comparable_settings(c.model_dump(mode="json")) for c in (load_config(own_path), setup.config))
    if own["data"] != now["data"]:
        return  # other data or another split, named deliberately or refused by the settings' checks
    path = setup.config.data.path
    _check_recorded(card.get(DATA_HASH), setup.dataset.sha256(),
                    f"the data {setup.dataset.name!r}{'' if path is None else f' in {path}'}", model_dir)
    same_extra = own["train"].get("extra_data") == now["train"].get("extra_data")
    if with_extra and setup.extra is not None and same_extra:
        _check_recorded(card.get(EXTRA_DATA_HASH), splits_sha256((setup.extra,)),
                        f"the extra training data in {setup.config.train.extra_data}", model_dir)


def _check_recorded(recorded: Any, found: str, what: str, model_dir: Path) -> None:
    if isinstance(recorded, str) and recorded != found:
        raise ConfigError(f"{what} differ from those {model_dir} was trained on (SHA-256 {recorded[:12]}... "
                          f"then, {found[:12]}... now): restore them, or start a new run; a changed file "
                          "would mix other examples into training, testing and the audit's members")


def _ordered(encoding: dict[str, Any] | None, with_classes: bool) -> Any:
    """An encoding in a form whose equality sees the column order (dicts compare without it)."""
    if encoding is None:
        return None
    classes = encoding.get("classes") if with_classes else None
    return encoding.get("target"), classes, list(encoding.get("features", {}).items())


def check_data_fits_model(card: dict[str, Any], dataset: Dataset, model_dir: Path) -> None:
    """ConfigError when ``dataset`` does not fit the model: inputs of another shape, box or number
    of classes, or a table encoded otherwise than the model's training data was (another column
    order, bounds refitted on other rows, other categories or classes), which the model would read as
    permuted or rescaled features, or relabelled classes, without any error of its own."""
    _check_table_encoding(card.get("input_encoding"), dataset.metadata.get("schema"), model_dir)
    shape, classes = tuple(card["input_shape"]), int(card["num_classes"])
    if (shape, classes) != (tuple(dataset.input_shape), dataset.num_classes):
        raise ConfigError(f"{model_dir} takes inputs of shape {shape} and scores {classes} classes; the "
                          f"data {dataset.name!r} has inputs of shape {tuple(dataset.input_shape)} and "
                          f"{dataset.num_classes} classes")
    trained_box = card.get("bounds")
    if trained_box is not None and [float(b) for b in trained_box] != [float(b) for b in dataset.bounds]:
        # inputs on another scale: the model would read them rescaled, and the threat model's box
        # (and with it every attack's eps budget) would not be the one it was trained in
        raise ConfigError(f"{model_dir} was trained on inputs in [{trained_box[0]:g}, {trained_box[1]:g}]; "
                          f"the data {dataset.name!r} lie in [{dataset.bounds[0]:g}, {dataset.bounds[1]:g}]")


def _check_table_encoding(trained: dict[str, Any] | None, now: dict[str, Any] | None,
                          model_dir: Path) -> None:
    # models trained before the encoding recorded the classes are compared on the rest
    with_classes = trained is not None and "classes" in trained
    if trained is None or _ordered(trained, with_classes) == _ordered(now, with_classes):
        return
    if now is None:
        raise ConfigError(f"{model_dir} was trained on a table encoded by a schema; the data given has "
                          "none")
    trained_features, features = trained.get("features", {}), now.get("features", {})
    name = next((f for f in features if features[f] != trained_features.get(f)), None)
    if list(trained_features) != list(features):
        problem = (f"its columns are {list(features)}, the model's training data had "
                   f"{list(trained_features)}")
    elif name is not None:
        problem = f"feature {name!r} is encoded as {features[name]}, in training as {trained_features[name]}"
    elif now.get("target") != trained.get("target"):
        problem = f"the target is {now.get('target')!r}, in training {trained.get('target')!r}"
    else:
        problem = f"its classes are {now.get('classes')}, in training {trained.get('classes')}"
    raise ConfigError(f"the data is encoded otherwise than the data {model_dir} was trained on: {problem}; "
                      "give the schema the model was trained with (model.json's input_encoding, as "
                      "data.feature_schema)")


def model_from_card(card: dict[str, Any], weights: Path | None = None) -> nn.Module:
    """The architecture a model card names, with fresh weights (DP-trained models in Opacus' form).

    With ``weights`` (a tensor file the model will load) the architecture is first built on the meta
    device, without memory, and its shapes compared with the file's: a card that does not fit its
    weights, an edited one asking for a 32 GiB layer say, is refused before anything is allocated.
    """
    if weights is not None:
        with torch.device("meta"):
            skeleton = _architecture(card)
        ckpt.check_shapes_fit(weights, skeleton)
    return _architecture(card)


def _architecture(card: dict[str, Any]) -> nn.Module:
    model = build_model(card["name"], card["input_shape"], card["num_classes"],
                        mean=card.get("mean"), std=card.get("std"))
    if card.get("opacus_fixed"):
        from fortify.training.dp import make_dp_compatible

        model, _ = make_dp_compatible(model)
    return model


def load_trained_model(model_dir: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture from model.json and load model.safetensors (hash-checked)."""
    card_path = Path(model_dir) / MODEL_CARD
    if not card_path.is_file():
        members = sorted(str(p.parent) for p in Path(model_dir).glob(f"models/*/{MODEL_CARD}"))
        if members:  # a fortify run directory holds its models one level down
            raise CheckpointError(f"{model_dir} is a run directory; give one of its models: "
                                  f"{', '.join(members)}")
        raise CheckpointError(f"{model_dir} holds no trained fortify model ({MODEL_CARD} missing)")
    state = ckpt.read_state_json(Path(model_dir))
    if not state.get("finished"):
        raise CheckpointError(f"training in {model_dir} did not finish; resume it first")
    hashes = state.get("sha256")
    if not isinstance(hashes, dict) or not isinstance(hashes.get("model.safetensors"), str):
        # every fortify writer records it: without it the tamper check would be skipped
        raise CheckpointError(f"{model_dir / ckpt.STATE_JSON} records no hash of model.safetensors; "
                              "refusing to load weights that cannot be checked")
    # directories written before the card was hashed have none: their card's fields are checked alone
    if MODEL_CARD in hashes and ckpt.sha256(card_path) != hashes[MODEL_CARD]:
        raise CheckpointError(f"{card_path} does not match the hash recorded in {ckpt.STATE_JSON}: the "
                              "model card was edited after training; refusing to load it")
    settings_path = Path(model_dir) / "config.yaml"
    if "config.yaml" in hashes and (not settings_path.is_file()
                                    or ckpt.sha256(settings_path) != hashes["config.yaml"]):
        raise CheckpointError(f"{settings_path} does not match the hash recorded in {ckpt.STATE_JSON}: the "
                              "settings the model was trained with were edited (another data seed would test "
                              "on training examples); to evaluate under other settings, give them to "
                              "fortify evaluate --config instead")
    card = read_model_card(card_path)
    weights = Path(model_dir) / "model.safetensors"
    model = model_from_card(card, weights)
    ckpt.load_weights(weights, model, hashes["model.safetensors"])
    return model.to(device).eval(), card


# a model card's input may hold at most this many values, and its model score at most this many
# classes: beyond them a tampered card would make the rebuilt model allocate memory without end
_CARD_MAX_INPUT_VALUES = 2**24
_CARD_MAX_CLASSES = 2**20


def read_model_card(path: Path) -> dict[str, Any]:
    """model.json, checked for the fields that rebuild the architecture."""
    try:
        card = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, or a number past 4,300 digits
        raise CheckpointError(f"{path} is not a readable model card ({err})") from None
    return check_model_card(card, str(path))


def check_model_card(card: Any, source: str) -> dict[str, Any]:
    """``card`` if it names an architecture with a sane input shape and class count, else a
    CheckpointError naming ``source``."""
    def count(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    shape = card.get("input_shape") if isinstance(card, dict) else None
    fits = (isinstance(card, dict) and isinstance(card.get("name"), str)
            and isinstance(shape, list) and 1 <= len(shape) <= 4
            and all(count(d, 1, _CARD_MAX_INPUT_VALUES) for d in shape)
            and math.prod(shape) <= _CARD_MAX_INPUT_VALUES
            and count(card.get("num_classes"), 2, _CARD_MAX_CLASSES))
    if not fits:
        raise CheckpointError(f"{source} is not a fortify model card: it needs a name (text), an "
                              f"input_shape (1 to 4 whole numbers >= 1, at most {_CARD_MAX_INPUT_VALUES:,} "
                              f"values) and num_classes (a whole number in 2..{_CARD_MAX_CLASSES:,})")
    problem = _card_field_problem(card)
    if problem:
        raise CheckpointError(f"{source} is not a fortify model card: {problem}")
    return card


_SHA256 = re.compile("[0-9a-f]{64}")
_CARD_FIELDS = frozenset({"name", "input_shape", "num_classes", "bounds", "mean", "std", "input_encoding",
                          "opacus_fixed", DATA_HASH, EXTRA_DATA_HASH})


def _card_field_problem(card: dict[str, Any]) -> str | None:
    """What is wrong with the optional fields of a model card that passed the required ones, if
    anything: each is read later (the box, the normalisation, a table's encoding), where a wrong
    type would surface as a traceback."""
    def numbers(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)

    bounds, mean, std = card.get("bounds"), card.get("mean"), card.get("std")
    if bounds is not None and not (numbers(bounds) and len(bounds) == 2 and bounds[0] < bounds[1]):
        return f"bounds must be two finite numbers, low < high; got {bounds!r}"
    if (mean is None) != (std is None):
        return "mean and std must be given together, or both be null"
    channels = card["input_shape"][0]
    if mean is not None and not (numbers(mean) and numbers(std) and len(mean) == len(std) == channels
                                 and all(v > 0 for v in std)):
        return (f"mean and std must be lists of {channels} finite numbers (one per channel), std > 0; got "
                f"mean={mean!r}, std={std!r}")
    unknown = sorted(set(card) - _CARD_FIELDS)
    if unknown:
        return f"unknown field {unknown[0]!r}; a card holds {', '.join(sorted(_CARD_FIELDS))}"
    for name in (DATA_HASH, EXTRA_DATA_HASH):
        recorded = card.get(name)
        if recorded is not None and not (isinstance(recorded, str) and _SHA256.fullmatch(recorded)):
            return f"{name} must be a SHA-256 in 64 hex digits, got {recorded!r}"
    if not isinstance(card.get("opacus_fixed", False), bool):
        return f"opacus_fixed must be true or false, got {card['opacus_fixed']!r}"
    encoding = card.get("input_encoding")
    if encoding is not None:
        from fortify.tabular.schema import Schema

        try:
            Schema.from_dict(encoding)
        except (ConfigError, DataError, TypeError, ValueError) as err:
            return f"its input_encoding is not a table schema ({err})"
    return None


def _card_if_readable(path: Path) -> dict[str, Any] | None:
    """The model card at ``path`` as written, or None: a resumed run writes its card anew, so a
    missing or damaged one only has nothing to say."""
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return card if isinstance(card, dict) else None


def build_training_objective(setup: Setup, train_cfg: TrainConfig) -> Objective:
    """``train_cfg.objective`` with every objective setting of ``train_cfg``."""
    return objective_from_config(train_cfg, setup.threat)


# the sections of a RunConfig that shape a model's weights; a resumed run must keep every one of them
WEIGHT_SETTINGS = ("data", "model", "threat", "train", "dp")
def check_same_settings(directory: Path, config: RunConfig, sections: Sequence[str] = WEIGHT_SETTINGS
                        ) -> None:
    """ConfigError unless the config.yaml in ``directory`` (if any) agrees with ``config`` on
    ``sections``: continuing a run under other settings would mix two runs in one."""
    saved_path = Path(directory) / "config.yaml"
    if not saved_path.is_file():
        return
    saved, now = load_config(saved_path).model_dump(mode="json"), config.model_dump(mode="json")
    before, after = ({s: comparable_settings(run)[s] for s in sections} for run in (saved, now))
    differing = setting_differences(before, after)
    if differing:
        raise ConfigError(f"cannot resume {directory}: {listed(differing)}; give the settings it was "
                          "started with, or start a new run elsewhere")


# what identifies a dataset, as opposed to how it is split into train, val and test
_DATA_SOURCE = ("name", "path", "target", "feature_schema")


def evaluation_config(model_dir: Path, config_path: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """The config to evaluate ``model_dir`` under: its own config.yaml, with ``config_path`` laid over it,
    then the flags' ``overrides``.

    A config file read on its own would put the defaults in every section it leaves out: another data
    split (training examples among the test examples) and a config in robustness.json that describes
    another model. What a config file may change is checked by check_evaluated_as_trained.
    """
    own_path = Path(model_dir) / "config.yaml"
    if not own_path.is_file():
        if config_path is None:
            raise ConfigError(f"{model_dir} has no config.yaml; pass --config")
        return load_config(config_path, overrides)
    own = load_config(own_path)
    in_file = read_yaml_mapping(config_path)
    recorded = own.model_dump(mode="json")
    if recorded["eval"]["preset"] is not None and (_chooses_attacks(in_file) or _chooses_attacks(overrides)):
        # the attacks asked for now replace a preset the model was trained under, as they would
        # replace its attack list; the cascade it forced goes with it
        recorded["eval"].update(preset=None, cascade=EvalConfig.model_fields["cascade"].default)
    layered = config_from_dict(_for_a_preset_in(in_file, recorded), in_file).model_dump(mode="json")
    config = config_from_dict(_for_a_preset_in(overrides, layered), overrides)
    check_evaluated_as_trained(model_dir, own, config)
    return config


def _chooses_attacks(settings: dict[str, Any]) -> bool:
    """Whether ``settings`` (a config file's or the flags') choose attacks or the cascade without
    naming a preset."""
    section = settings.get("eval")
    if not isinstance(section, dict) or "preset" in section:
        return False
    return bool({"attacks", "cascade"} & set(section))


def _for_a_preset_in(settings: dict[str, Any], dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (a config as a mapping) without its attack list and cascade when ``settings`` name a
    preset: the preset replaces them, and given beside it they would be refused as a contradiction."""
    section = settings.get("eval")
    if not (isinstance(section, dict) and section.get("preset") is not None):
        return dumped
    return {**dumped, "eval": {k: v for k, v in dumped["eval"].items() if k not in ("attacks", "cascade")}}


def encoding_for_other_table(model_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    """The encoding of the model's training table (its card's), when ``config`` evaluates the model on
    another table under the same schema setting: that table must be read as the model reads, not with
    bounds and classes fitted on its own rows. None otherwise."""
    own_path, card_path = Path(model_dir) / "config.yaml", Path(model_dir) / MODEL_CARD
    if config.data.name != "csv" or not (own_path.is_file() and card_path.is_file()):
        return None
    own = load_config(own_path).data
    if (own.path, own.target) == (config.data.path, config.data.target) \
            or own.feature_schema != config.data.feature_schema:
        return None
    try:  # load_trained_model checks the card against its hash before any result is written
        return json.loads(card_path.read_text()).get("input_encoding")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def check_evaluated_as_trained(model_dir: Path, own: RunConfig, config: RunConfig) -> None:
    """ConfigError if ``config`` says the model was made otherwise than ``own`` (its config.yaml) says,
    or splits the model's own data another way. Other data may be named: that is a deliberate change."""
    before, now = (comparable_settings(c.model_dump(mode="json")) for c in (own, config))
    sections = ["model", "train", "dp"]
    if all(before["data"].get(key) == now["data"].get(key) for key in _DATA_SOURCE):
        sections.append("data")  # another seed or fraction would test on examples the model trained on
    differing = setting_differences({s: before[s] for s in sections}, {s: now[s] for s in sections})
    if differing:
        raise ConfigError(f"the config given for {model_dir} differs from the one its model was trained "
                          f"with ({Path(model_dir) / 'config.yaml'}): {listed(differing)}; an evaluation "
                          "may change only the threat, eval and analysis sections (or name other data)")


@dataclass
class PreparedTraining:
    """A trainer built and checked for one model, with the training split it fits (canaries
    inserted): everything ``train_model`` does before it writes a file."""

    trainer: Trainer
    config: RunConfig
    train: Split
    canaries: Any = None


def prepare_training(setup: Setup, objective_name: str, model_dir: Path, *, show_progress: bool = False,
                     distributed: DistributedContext | None = None) -> PreparedTraining:
    """Build the trainer for ``objective_name`` and run every check of its settings that needs no
    file (the trainers' own, DP's delta and noise for a target epsilon): a sweep runs it for each of
    its runs before the first trains, as ``train`` does before it writes anything."""
    train_cfg = setup.config.train.model_copy(update={"objective": objective_name})
    model = new_model(setup, train_cfg.seed)
    objective = build_training_objective(setup, train_cfg)
    dp = setup.config.dp
    config = setup.config.model_copy(update={"train": train_cfg})
    # the trainers check their settings when built, before anything is written
    if dp.enabled:
        from fortify.training.dp import DPTrainer

        if distributed is not None:
            raise ConfigError("dp.enabled cannot be combined with torchrun data parallelism")
        trainer: Trainer = DPTrainer(model, objective, train_cfg, dp=dp, threat=setup.threat,
                                     run_dir=model_dir, show_progress=show_progress)
    else:
        trainer = Trainer(model, objective, train_cfg, threat=setup.threat, run_dir=model_dir,
                          show_progress=show_progress, distributed=distributed, extra_data=setup.extra)
    train, canaries = setup.dataset.train, None
    if dp.canaries:
        from fortify.privacy.canaries import insert_canaries

        train, canaries = insert_canaries(train, dp.canaries, setup.dataset.num_classes, seed=train_cfg.seed)
    if dp.enabled:  # delta against n and the noise for a target epsilon, still before any write
        trainer.prepare(train)  # type: ignore[attr-defined]
    return PreparedTraining(trainer, config, train, canaries)


def train_model(setup: Setup, objective_name: str, model_dir: Path, *, resume: bool,
                show_progress: bool, distributed: DistributedContext | None = None
                ) -> tuple[nn.Module, TrainResult]:
    """Train one model into ``model_dir``; resumes an unfinished run, reuses a finished one.

    Under torchrun (``distributed``) every rank trains its share and only rank 0 writes files.
    """
    if resume:
        check_same_settings(model_dir, setup.config.model_copy(update={
            "train": setup.config.train.model_copy(update={"objective": objective_name})}))
        check_data_unchanged(model_dir, setup)
    prepared = prepare_training(setup, objective_name, model_dir, show_progress=show_progress,
                                distributed=distributed)
    trainer, config, dp = prepared.trainer, prepared.config, setup.config.dp
    model_dir.mkdir(parents=True, exist_ok=True)
    if distributed is None or distributed.is_main:
        ckpt.atomic_write_text(model_dir / "config.yaml", config.to_yaml())
        # hashed: evaluate reads the data split from it, and an edited seed would test on training examples
        trainer.record_file("config.yaml", model_dir / "config.yaml")
        # a DP model may have had BatchNorm replaced: loading repeats the replacement
        write_json(model_dir / MODEL_CARD, model_card(setup) | data_records(setup)
                   | ({"opacus_fixed": True} if dp.enabled else {}))
        trainer.record_file(MODEL_CARD, model_dir / MODEL_CARD)
    can_resume = resume and (model_dir / ckpt.STATE_JSON).is_file()
    result = trainer.fit(prepared.train, setup.dataset.val, resume=can_resume)
    if dp.canaries:
        from fortify.training.dp import with_canary_audit

        result = with_canary_audit(result, trainer.model, prepared.canaries, delta=dp.delta,
                                   seed=config.train.seed)
    return trainer.model, result


# -- evaluation --------------------------------------------------------------------------------

AUTOATTACK = PRESETS["autoattack"]
DEFAULT_PGD_STEPS = 20
_ITERATIONS = {"pgd": "steps", "apgd-ce": "n_iter", "apgd-dlr": "n_iter", "apgd-t": "n_iter",
               "fab": "steps", "fab-t": "steps", "fmn": "steps", "cw": "steps"}
_RESTARTS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")
_QUERIES = {"square": "n_queries", "hopskipjump": "max_queries"}
_TARGETED = ("apgd-t", "fab-t")
_EARLY_STOP = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t")


def attack_names(config: EvalConfig) -> list[str]:
    return list(AUTOATTACK) if config.preset == "autoattack" else list(config.attacks)


# the attacks that read each of the generic eval settings (evaluate's --steps, ... flags)
SETTING_READERS = {"steps": (*_ITERATIONS, "transfer"), "restarts": _RESTARTS, "queries": tuple(_QUERIES),
                   "surrogate": ("transfer",)}


def generic_settings_in_file(config_path: Path | None) -> list[tuple[str, str]]:
    """``(how it was given, setting)`` for each generic eval setting a config file gives a value."""
    section = read_yaml_mapping(config_path).get("eval")
    if not isinstance(section, dict):
        return []
    return [(f"eval.{key} in {config_path}", key) for key in SETTING_READERS if section.get(key) is not None]


def check_flags_are_read(config: EvalConfig, given: Sequence[tuple[str, str]]) -> None:
    """ConfigError for a generic setting (``(how it was given, setting)``: a flag, or a config file's
    eval key) that none of the attacks to run reads: it would be dropped silently, and the results
    would not be what was asked for."""
    names = attack_names(config)
    for shown, setting in given:
        if not set(SETTING_READERS[setting]) & set(names):
            raise ConfigError(f"{shown} is read by {', '.join(SETTING_READERS[setting])}; none of the "
                              f"attacks to run ({', '.join(names)}) reads it")


def _attack_options(name: str, config: EvalConfig, num_classes: int) -> dict[str, Any]:
    """The generic flags (steps, restarts, queries) in each attack's own parameter names."""
    options: dict[str, Any] = {}
    if name in _ITERATIONS and (config.steps is not None or name == "pgd"):
        options[_ITERATIONS[name]] = config.steps or DEFAULT_PGD_STEPS
    if name in _RESTARTS and config.restarts is not None:
        options["restarts"] = config.restarts
    if name in _QUERIES and config.queries is not None:
        options[_QUERIES[name]] = config.queries
    if name in _TARGETED:
        options["n_target_classes"] = min(9, num_classes - 1)  # AutoAttack's 9 where K allows
    given = config.attack_options.get(name, {})
    # both keep an example's first success: left out where the options ask for the last iterate
    keeps_first = given.get("keep_first_success", True)
    if name in _EARLY_STOP and keeps_first:
        options["early_stop"] = True  # same points, fewer passes (tests/attacks check both)
    if name == "pgd" and keeps_first:
        options["probe"] = True  # only adds fooled examples; most of a weak model's leave at once
    return options | given


def build_attacks(config: EvalConfig, threat: ThreatModel, num_classes: int,
                  surrogate: nn.Module | None = None) -> list[Attack]:
    """Attacks in evaluation order; each gets its own seed (config.seed + position)."""
    unknown = set(config.attack_options) - set(ATTACKS.names())
    if unknown:
        raise ConfigError(f"attack_options names unknown attacks {sorted(unknown)}; "
                          f"valid names: {', '.join(ATTACKS.names())}")
    names = attack_names(config)
    if config.preset == "autoattack" and threat.constrained:
        raise ConfigError("the autoattack preset holds fab-t, which searches the plain ball and cannot keep "
                          "a feature schema's constraints; under a schema name the attacks instead, e.g. "
                          "--attacks apgd-ce,apgd-t,square --cascade")
    unread = sorted(set(config.attack_options) - set(names))
    if unread:  # they would be dropped silently, and the results would not be what was asked for
        raise ConfigError(f"attack_options set options for {unread}, which are not among the attacks to "
                          f"run ({', '.join(names)})")
    attacks: list[Attack] = []
    for position, name in enumerate(names):
        factory = ATTACKS.get(name)
        seed = config.seed + position
        options = config.attack_options.get(name, {})
        # the transfer attack's source on the surrogate is PGD: it reads --steps and PGD's options
        check_option_types(name, PGD if name == "transfer" else factory, options)
        _check_options_keep_the_attack(name, options)
        if name == "transfer" and surrogate is None:
            raise ConfigError("the transfer attack needs a surrogate: set eval.surrogate "
                              "(--surrogate MODEL_DIR) to a model trained by fortify")
        try:
            if name == "transfer":
                attack: Attack = Transfer(PGD(threat, **{"steps": config.steps or DEFAULT_PGD_STEPS,
                                                         "seed": seed, **options}), surrogate)
            else:
                attack = factory(threat, seed=seed, **_attack_options(name, config, num_classes))
        except FortifyError:
            raise
        except (TypeError, ValueError) as err:  # an unknown option, or a value of the wrong type
            raise ConfigError(f"bad options for attack {name!r}: {err}") from None
        _check_targets(name, attack, num_classes)
        attacks.append(attack)
    return attacks


def _check_options_keep_the_attack(name: str, options: dict[str, Any]) -> None:
    """ConfigError for an option that would make the attack another one than its name says, or that
    the evaluation sets itself: ``apgd-ce: {loss: dlr}`` ran APGD-DLR under the name apgd-ce, and
    ``seed`` failed with Python's own "multiple values" error."""
    if "seed" in options:
        raise ConfigError(f"attack_options for {name!r}: seed is set by eval.seed (each attack gets "
                          "eval.seed + its position); set that instead")
    if name in ("apgd-ce", "apgd-dlr") and "loss" in options:
        raise ConfigError(f"attack_options for {name!r}: the loss is in the attack's name; run "
                          f"{'apgd-dlr' if name == 'apgd-ce' else 'apgd-ce'} for the other one")


def _check_targets(name: str, attack: Attack, num_classes: int) -> None:
    """Fail before any file is written, not after the first attack batch."""
    if attack.targeted:
        raise ConfigError(f"attack_options make {name!r} targeted, but an evaluation has no target "
                          "labels; use apgd-t or fab-t, which pick their targets per example")
    n_targets = getattr(attack, "n_target_classes", None)
    if n_targets is not None and n_targets >= num_classes:
        raise ConfigError(f"n_target_classes={n_targets} for {name!r} is out of range for "
                          f"{num_classes} classes; allowed: 1..{num_classes - 1}")


def default_eps_grid(threat: ThreatModel) -> list[float]:
    limit = threat.bounds[1] - threat.bounds[0]
    grid = [threat.eps * f for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)]
    return [e for e in grid if threat.norm != "linf" or e <= limit]


def evaluate_model(setup: Setup, model: nn.Module, journal_dir: Path | None = None,
                   shard: DistributedContext | None = None) -> RobustnessReport:
    cfg = setup.config.eval
    test = setup.dataset.test.head(cfg.n_examples)
    surrogate = None
    if cfg.surrogate is not None:
        surrogate, _ = load_trained_model(cfg.surrogate, setup.device)
    attacks = build_attacks(cfg, setup.threat, setup.dataset.num_classes, surrogate)
    # the eps curve needs one cheap, strong attack at many eps: PGD when it is in the list, else APGD
    # (the autoattack preset's first); the last attack may be Square's 5,000 queries per example
    curve_attack = next((a for kind in (PGD, APGD) for a in attacks if isinstance(a, kind)), attacks[-1])
    use_channels_last = eval_channels_last(setup, model, test)
    # an empty list asks for no curve, as evaluate() reads it; None for the default grid
    eps_grid = cfg.eps_grid if cfg.eps_grid is not None else default_eps_grid(setup.threat)
    with eval_layout(model, use_channels_last):
        report = evaluate(model, test.x, test.y, attacks, setup.threat, curve_attack=curve_attack,
                          batch_size=cfg.batch_size, cascade=cfg.cascade or cfg.preset == "autoattack",
                          eps_grid=eps_grid,
                          num_classes=setup.dataset.num_classes, journal_dir=journal_dir, shard=shard,
                          amp=cfg.amp, amp_min_agreement=cfg.amp_min_agreement)
    report.channels_last = use_channels_last  # the layout used, not the setting (which may be unset)
    return report


def eval_channels_last(setup: Setup, model: nn.Module, test: Split) -> bool:
    """Whether an evaluation runs ``model`` with channels_last conv weights: as ``eval.channels_last``
    says; unset (the default), where it was measured to pay: on CPU, for a model with 4-D weights that
    runs that way (oneDNN's channels_last pooling and convolutions; the same points up to float
    rounding), checked on two test examples. On GPUs it stays off unless asked for. Set to true for a
    model that cannot run channels_last, this is a ConfigError.
    """
    wanted = setup.config.eval.channels_last
    if wanted is False or (wanted is None and setup.device.type != "cpu"):
        return False
    probe = test.x[:2].to(setup.device)  # two: a view merging the batch axis passes on one alone
    if wanted is None:  # asked once here; a model that cannot is evaluated as it is
        return runs_channels_last(model, probe)
    with channels_last(model, probe=probe):  # ConfigError here for a model that cannot
        # a model without 4-D weights has nothing to convert: it runs, and is recorded, as it is
        return has_4d_tensors(model)


@contextlib.contextmanager
def eval_layout(model: nn.Module, use_channels_last: bool) -> Iterator[nn.Module]:
    """The model as an evaluation runs it, for the duration: with channels_last conv weights when
    ``use_channels_last``, and its linear layers on oneDNN where that pays (on CPU;
    fortify.models.onednn_linear)."""
    parameter = next(model.parameters(), None)
    with contextlib.ExitStack() as stack:
        if use_channels_last:
            stack.enter_context(channels_last(model))
        if parameter is not None and onednn_linear_pays(parameter.device):
            stack.enter_context(onednn_linear(model))
        yield model


def analyse_model(setup: Setup, model: nn.Module, report: RobustnessReport,
                  objective: str | None = None) -> ModelAnalysis:
    """The report's per-model measurements under the evaluation's PGD (or its last attack).

    ``objective`` is what the model trained with (None: unknown); a ``gaussian`` model is certified at
    its own training noise unless ``analysis.certify_sigma`` says otherwise.
    """
    cfg = setup.config.analysis
    test = setup.dataset.test.head(setup.config.eval.n_examples)
    attacks = build_attacks(setup.config.eval, setup.threat, setup.dataset.num_classes,
                            surrogate=nn.Identity() if setup.config.eval.surrogate else None)
    attack = next((a for a in attacks if isinstance(a, PGD)),
                  PGD(setup.threat, steps=DEFAULT_PGD_STEPS, early_stop=True, probe=True,
                      seed=setup.config.eval.seed))
    options = AnalysisOptions(
        margin_examples=cfg.margin_examples, margin_steps=cfg.margin_steps,
        certify_examples=cfg.certify_examples, certify_sigma=certify_sigma(setup.config, objective),
        certify_n=cfg.certify_n, certify_alpha=cfg.certify_alpha, masking_examples=cfg.masking_examples,
        gallery_examples=cfg.gallery_examples, batch_size=setup.config.eval.batch_size,
        seed=setup.config.eval.seed)
    with eval_layout(model, eval_channels_last(setup, model, test)):
        return analyse(model, test.x, test.y, setup.threat, attack=attack, report=report,
                       num_classes=setup.dataset.num_classes, options=options)


def certify_sigma(config: RunConfig, objective: str | None) -> float:
    """The smoothing noise to certify at: as configured, else a ``gaussian`` model's training noise
    (Cohen et al. certify a base classifier at the noise it was trained under), else 0.25."""
    if config.analysis.certify_sigma is not None:
        return config.analysis.certify_sigma
    return config.train.noise_sigma if objective == "gaussian" else DEFAULT_SIGMA


def audit_membership(setup: Setup, model: nn.Module, objective: str | None = None,
                     card: dict[str, Any] | None = None) -> PrivacyReport:
    """Threshold and augmentation membership inference: members = train, non-members = test; with
    ``analysis.reference_models`` LiRA too, its reference models trained as ``model`` was: the
    architecture of its ``card`` (default: the one ``setup`` builds), the run's train and DP
    settings with ``objective`` (None: a model fortify did not train, which LiRA cannot audit)."""
    from fortify.privacy.audit import audit_trained_model

    cfg = setup.config.analysis
    lira: dict[str, Any] = {}
    if cfg.reference_models:
        if objective is None:
            raise ConfigError(LIRA_NEEDS_RECIPE)
        train_cfg = setup.config.train.model_copy(update={"objective": objective})
        lira = {"recipe": lira_recipe(setup, card or model_card(setup), train_cfg),
                "n_reference_models": cfg.reference_models,
                "lira_queries": lira_query_views(cfg.lira_queries, train_cfg.augment, setup)}
    return audit_trained_model(model, audited_dataset(setup), inversion=False, seed=setup.config.train.seed,
                               extra_data=setup.extra, **lira)


LIRA_NEEDS_RECIPE = ("analysis.reference_models: LiRA trains its reference models as the audited model "
                     "was trained, which fortify does not know of a model file; set it to 0")


def lira_recipe(setup: Setup, card: dict[str, Any], train_cfg: TrainConfig) -> TrainerRecipe:
    """How LiRA's reference models train: the audited model's architecture (``card``) and settings,
    under DP-SGD where the run trained so (its DPTrainer replaces BatchNorm as the run's did)."""
    from fortify.privacy.recipe import TrainerRecipe

    dp = setup.config.dp
    return TrainerRecipe.for_model(card["name"], card["input_shape"], card["num_classes"], config=train_cfg,
                                   threat=setup.threat, val=setup.dataset.val, mean=card["mean"],
                                   std=card["std"], device=setup.device, dp=dp if dp.enabled else None)


def lira_query_views(choice: str, augment: AugmentConfig, setup: Setup) -> LiraQueries:
    """The example alone (``single``), or the views the run's augmentation trained on (``training``),
    padded as the Trainer pads its crops (with the box's low end)."""
    from fortify.privacy.lira import SINGLE_QUERY, LiraQueries

    if choice == "single":
        return SINGLE_QUERY
    queries = LiraQueries.like_training(augment, fill=setup.dataset.bounds[0])
    if queries.count == 1:
        warnings.warn("the model trained without flips or crops (train.augment), so LiRA queries each "
                      "example alone", RuntimeWarning, stacklevel=2)
    return queries


def audited_dataset(setup: Setup) -> Dataset:
    """The dataset whose training split holds what the model trained on with its own labels.

    A run with ``dp.canaries`` took 2N training examples out (train_model): N went back in with a
    wrong label, N were never seen. Neither kind is a member in the audit's sense, so both leave the
    members; the canary audit of DP training covers them.
    """
    canaries = setup.config.dp.canaries
    if not canaries:
        return setup.dataset
    from fortify.privacy.canaries import insert_canaries

    train = setup.dataset.train
    trained, _ = insert_canaries(train, canaries, setup.dataset.num_classes, seed=setup.config.train.seed)
    return dataclasses.replace(setup.dataset, train=trained.head(len(train) - 2 * canaries))


# -- run directory -----------------------------------------------------------------------------

def default_out_dir(stem: str) -> Path:
    """``runs/<stem>-<local time>``, the run directory of a command given no --out."""
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def fresh_out_dir(out: Path | None, default_stem: str, resume: bool, *, command: str,
                  marker: str | None = None) -> Path:
    """The run directory to write: a new one under runs/, an empty or new ``out``, or with ``resume``
    an existing ``out`` of ``fortify command`` (holding ``marker`` when given and not empty: an
    unrelated directory, or another command's, is not continued, and so not overwritten)."""
    if out is None:
        if resume:
            raise ConfigError("--resume needs --out naming the run directory to continue")
        return default_out_dir(default_stem)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out names a directory")
    if out.exists() and not _holds_nothing(out, command) and not resume:
        raise ConfigError(f"{out} already exists and is not empty; pass --resume to continue the "
                          "run in it or choose another --out")
    if resume and not out.is_dir():
        raise ConfigError(f"cannot resume: {out} does not exist")
    if resume and marker is not None and not _holds_nothing(out, command) and not (out / marker).is_file():
        raise ConfigError(f"cannot resume: {out} holds no {marker}, so it is not a run to continue")
    if resume:
        check_directory_kind(out, command, "cannot resume")
    if out.is_dir() and _holds_nothing(out, command):
        # an interrupted run's empty models/ and half-written config go, so that what this attempt
        # writes is all its own and a failure discards it whole (discarded_on_error keeps what was
        # there before)
        for entry in out.iterdir():
            entry.rmdir() if entry.is_dir() else entry.unlink()
    return out


# what a run cut off while writing its first file leaves
UNFINISHED_CONFIG = ckpt.written_aside(Path("config.yaml")).name


def _holds_nothing(out: Path, command: str) -> bool:
    """``out`` is empty, or holds only what a run cut off before its config.yaml was in place
    leaves: the empty ``models/`` that ``fortify run`` makes first, and ``config.yaml.tmp``. Such a
    run left nothing to lose and starts again there."""
    entries = [entry for entry in out.iterdir() if not _unfinished_config(entry)]
    if command == "run" and [entry.name for entry in entries] == ["models"]:
        models = entries[0]  # a link is someone's, not the directory run made
        return models.is_dir() and not models.is_symlink() and not any(models.iterdir())
    return not entries


def _unfinished_config(entry: Path) -> bool:
    return entry.name == UNFINISHED_CONFIG and entry.is_file() and not entry.is_symlink()


# Entries that only one command's directory holds at its top, checked in this order (a federation's
# directory holds a trained model's files too). A run's models/<objective> and a sweep's runs are
# train directories of their own.
SWEEP_SUMMARY = ("sweep.json", "sweep.csv", "tradeoff.png")  # what a sweep writes beside its runs
_DIRECTORY_SIGNS = (
    ("federate", ("federation-progress.json", "federated.json")),
    ("sweep", SWEEP_SUMMARY),
    ("run", ("results.json", "models")),
    ("train", (ckpt.STATE_JSON, "model.json", "model.safetensors", "training.json")),
)


def directory_kind(directory: Path) -> str | None:
    """The fortify command whose output ``directory`` holds, by the entries at its top; None when
    none of them is there (a new directory, or one cut off before its first results)."""
    for kind, signs in _DIRECTORY_SIGNS:
        if any((directory / sign).exists() for sign in signs):
            return kind
    return None


def check_directory_kind(directory: Path, command: str, action: str) -> None:
    """Refuses to let ``fortify command`` write into another command's output directory: continuing
    it would train afresh over what that command left there."""
    kind = directory_kind(directory)
    if kind is not None and kind != command:
        raise ConfigError(f"{action}: {directory} holds the output of fortify {kind}, not of fortify "
                          f"{command}; continue it with fortify {kind}, or choose another --out")


@contextlib.contextmanager
def discarded_on_error(out_dir: Path, *, checkpoint: str = ckpt.STATE_JSON) -> Iterator[None]:
    """What the body writes into ``out_dir`` goes again when it fails with an error before any
    checkpoint (a file named ``checkpoint``: a ``state.json``, or a federation's progress record)
    lands there, e.g. a loss that turns NaN in the first epoch: the directory is then as it was, and
    the same command with corrected settings runs in it again.

    Entries that were there before stay; so does everything once a checkpoint exists (``--resume``
    continues from it). An interrupt (Ctrl-C) keeps what was written as well.
    """
    before = set(out_dir.iterdir()) if out_dir.is_dir() else None
    try:
        yield
    except Exception:
        if out_dir.is_dir() and not any(out_dir.rglob(checkpoint)):
            written = [out_dir] if before is None else set(out_dir.iterdir()) - before
            for entry in written:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Standard JSON, written whole or not at: non-finite numbers (an epsilon of a run without
    noise) become null, as the results schema says, where Python would write Infinity or NaN."""
    ckpt.atomic_write_text(path, json.dumps(json_safe(payload), indent=2, allow_nan=False))


def provenance(config: RunConfig, device: torch.device) -> dict[str, Any]:
    return {
        "fortify_version": fortify.__version__, "torch_version": torch.__version__,
        "python_version": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "seed": config.train.seed, "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


_PACKAGE_DIR = Path(__file__).resolve().parent


def _git_commit(package: Path = _PACKAGE_DIR) -> str | None:
    """fortify's commit when ``package`` (this package) runs from a checkout of its own repository.

    An installed package may sit inside some other repository (a virtualenv in the user's project):
    that repository's commit is not fortify's, so the checkout must hold this very package.
    """
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=package)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "src" / "fortify" != package:
        return None
    return lines[1]
