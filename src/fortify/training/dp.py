"""Differentially private (adversarial) training with Opacus' DP-SGD.

``DPTrainer`` is the Trainer with Opacus' PrivacyEngine around model, optimiser and data: Poisson
sampling of each logical batch, per-example gradients clipped to ``max_grad_norm``, Gaussian noise
of ``noise_multiplier * max_grad_norm`` on their sum, and an accountant (PRV or RDP) that turns the
steps taken into the epsilon spent, recorded after every epoch.

Adversarial objectives need two things Opacus does not do on its own:

- **Attack passes must not reach the per-sample-gradient hooks.** An attack differentiates the
  loss with respect to the input; with the hooks on, that backward pass would try to turn the
  attack's gradients into per-sample parameter gradients. Attacks always run in eval mode (see
  ``fortify.attacks.base.attacking``), so the model handed to the objective switches the hooks off
  whenever it leaves training mode and back on when it returns.
- **A loss that calls the model more than once** (TRADES, MART: clean and adversarial passes) must
  give each example the gradient of its own loss. Opacus' hooks sum the per-sample gradients of all
  forward passes of one batch before clipping, which is that gradient; the tests check it against
  a loop over single examples for every objective.

Privacy holds because each example's clipped gradient depends on that example alone: the attacks
used in training perturb every example independently, and BatchNorm (which mixes examples) is
replaced by GroupNorm: through ``ModuleValidator.fix``, and by fortify for the BatchNorms that
``fix`` passes over (those without trainable parameters).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fortify.config import DPConfig, TrainConfig
from fortify.data.base import Split
from fortify.errors import CheckpointError, ConfigError, DataError, MissingDependencyError
from fortify.privacy.canaries import Canaries, CanaryAudit, audit_canaries
from fortify.threat import ThreatModel
from fortify.training import checkpoint as ckpt
from fortify.training.batches import check_dp_batch_settings
from fortify.training.objectives import Objective
from fortify.training.trainer import EpochCallback, EpochRecord, Trainer, TrainResult, with_int64_labels

try:
    from opacus import GradSampleModule, PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from opacus.validators import ModuleValidator
except ImportError:  # opacus is the optional `dp` extra
    GradSampleModule = PrivacyEngine = DPDataLoader = BatchMemoryManager = ModuleValidator = None

# Objectives whose per-example loss depends on that example alone and that take one optimiser step
# per batch (fgsm and pgd-mix pass clean and adversarial points separately, so no batch mixes them).
# Excluded: free (replays a batch: several noisy steps per sample), awp-* (perturbs weights with an
# unclipped, noiseless gradient of the private batch).
DP_OBJECTIVES: tuple[str, ...] = ("standard", "fgsm", "fgsm-rs", "pgd", "trades", "mart", "pgd-mix")
DP_STATE_JSON = "dp_state.json"
TRAIN_STATE = "state.safetensors"  # the Trainer's checkpoint, where the generators' states go
DP_RNG_KEYS = ("rng.dp.sampling", "rng.dp.noise")
# every generator the private data's passes draw from: dropped from a finished run's checkpoint
SECRET_RNG_KEYS = (*DP_RNG_KEYS, "rng.objective", "rng.torch", "rng.cuda")


def require_opacus() -> None:
    if PrivacyEngine is None:
        raise MissingDependencyError("differentially private training needs opacus: "
                                     "pip install 'fortify[dp]'")


def check_objective(objective: Objective) -> None:
    if objective.name not in DP_OBJECTIVES or objective.replays != 1:
        raise ConfigError(f"objective {objective.name!r} cannot be trained with DP; "
                          f"valid: {', '.join(DP_OBJECTIVES)}")


def check_delta(delta: float, n_train: int) -> None:
    """delta < 1/n: publishing each example with probability delta is (0, delta)-DP, and at delta >= 1/n
    that mechanism publishes one whole training example on average."""
    if not 0 < delta < 1 / n_train:
        raise ConfigError(f"dp delta={delta:g} must be in (0, 1/n) = (0, {1 / n_train:.3g}) for "
                          f"n={n_train} training examples")


def poisson_loader(train: Split, batch_size: int, generator: torch.Generator) -> Any:
    """Opacus' Poisson-sampling loader of ``train``: ``ceil(n / batch_size)`` batches an epoch, each
    example in each batch with probability one over that count.

    ``DPDataLoader.from_data_loader`` builds the same loader, but its sampler takes
    ``int(1 / sample_rate)`` steps, which floating point makes one short for some counts
    (``1 / (1 / 93) < 93``; 391, CIFAR-10's 50,000 examples at batch 128, is another); Opacus then
    accounts at one over that shorter count. Setting the count keeps the sampler, the accountant and
    the Trainer's schedule on the same rate and steps.
    """
    steps = math.ceil(len(train) / batch_size)
    loader = DPDataLoader(TensorDataset(train.x, train.y), sample_rate=1 / steps, generator=generator)
    loader.batch_sampler.steps = steps
    return loader


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` that Opacus accepts, and the names of the modules ``fix`` replaced.

    BatchNorm becomes GroupNorm (it mixes the examples of a batch, so no per-example gradient
    exists); anything Opacus cannot fix is a ConfigError naming the modules.
    """
    require_opacus()
    model.train()
    before = {name: type(m) for name, m in model.named_modules()}
    fixed = _replace_untrained_batch_norms(ModuleValidator.fix(model))
    tracking = [name for name, m in fixed.named_modules()
                if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats]
    if tracking:  # Opacus refuses these only when affine, and accepts them silently otherwise
        raise ConfigError(f"InstanceNorm with track_running_stats=True ({', '.join(tracking)}) keeps running "
                          "statistics of the private training data, published without noise; build it "
                          "with track_running_stats=False for DP training")
    problems = ModuleValidator.validate(fixed, strict=False)
    problems += GradSampleModule.validate(fixed, strict=False)  # trainable layers holding buffers
    if problems:
        details = "; ".join(str(p) for p in problems)
        raise ConfigError(f"the model has modules DP-SGD cannot train and Opacus cannot replace: {details}")
    replaced = [f"{name}: {before[name].__name__} -> {type(m).__name__}"
                for name, m in fixed.named_modules() if name in before and type(m) is not before[name]]
    return fixed, replaced


def _replace_untrained_batch_norms(model: nn.Module) -> nn.Module:
    """GroupNorm for each BatchNorm that ``ModuleValidator.fix`` left in place.

    Opacus fixes and validates only modules with trainable parameters, so a BatchNorm without affine
    parameters, or with frozen ones, passed through: in training it normalises each example by the
    batch's statistics (its clipped gradient then depends on other examples) and its running
    statistics publish the private data without noise. Replaced by Opacus' own rule,
    ``GroupNorm(gcd(32, C), C)``, with the BatchNorm's affine setting and frozen parameters kept frozen.
    """
    def group_norm(norm: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
        # on the BatchNorm's device and in its dtype (a model on a GPU would otherwise get a CPU layer)
        like = next((t for t in [*norm.parameters(), *norm.buffers()] if t.is_floating_point()), None)
        group = nn.GroupNorm(math.gcd(32, norm.num_features), norm.num_features, eps=norm.eps,
                             affine=norm.affine, device=None if like is None else like.device,
                             dtype=None if like is None else like.dtype)
        if norm.affine:
            group.weight.requires_grad_(norm.weight.requires_grad)
            group.bias.requires_grad_(norm.bias.requires_grad)
        return group

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return group_norm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, group_norm(child))
    return model


class HooksInTrainingOnly(nn.Module):
    """A GradSampleModule whose per-sample-gradient hooks are on only in training mode.

    Attacks put the model in eval mode while they differentiate with respect to the input, so their
    backward passes never touch the per-sample gradients being accumulated for the batch.
    """

    def __init__(self, grad_sample_module: nn.Module) -> None:
        super().__init__()
        self.gsm = grad_sample_module

    def forward(self, x: Tensor) -> Tensor:
        return self.gsm(x)

    def train(self, mode: bool = True) -> HooksInTrainingOnly:
        super().train(mode)
        if mode:
            self.gsm.enable_hooks()
        else:
            self.gsm.disable_hooks()
        return self


@dataclass
class PrivacySpent:
    """The DP settings of a run and the epsilon its accountant gives for ``delta``."""

    accountant: str
    epsilon: float  # an upper bound; inf without noise
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    # what Opacus divides the noisy sum of clipped gradients by: int(n * sample_rate), not n * sample_rate
    expected_batch_size: float
    max_physical_batch_size: int | None
    steps: int
    poisson_sampling: bool = True
    replaced_modules: list[str] = field(default_factory=list)


@dataclass
class DPTrainResult(TrainResult):
    privacy: PrivacySpent | None = None  # None: trained without DP (a canary audit may still run)
    canary_audit: CanaryAudit | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_canary_audit(result: TrainResult, model: nn.Module, canaries: Canaries, *, delta: float,
                      seed: int) -> DPTrainResult:
    """``result`` plus the canary audit of ``model``, set beside the accountant's epsilon if any."""
    privacy = getattr(result, "privacy", None)
    audit = audit_canaries(model, canaries, delta=delta, seed=seed,
                           epsilon_upper=None if privacy is None else privacy.epsilon)
    fields = {k: v for k, v in vars(result).items() if k not in ("privacy", "canary_audit")}
    return DPTrainResult(**fields, privacy=privacy, canary_audit=audit)


class DPTrainer(Trainer):
    """The Trainer with DP-SGD; ``self.model`` is the (possibly fixed) plain module to save and use.

    ``prepare(train)`` wraps model, optimiser and data with the PrivacyEngine; ``fit`` calls it.
    """

    # Opacus' per-example gradients were not measured in channels_last; train.channels_last: true is
    # refused (check_dp_batch_settings), unset trains in the default layout
    AUTO_CHANNELS_LAST = False
    # Opacus computes per-example gradients of the layer types it knows, matched exactly
    ONEDNN_LINEAR = False

    def __init__(self, model: nn.Module, objective: Objective, config: TrainConfig, *, dp: DPConfig,
                 threat: ThreatModel, run_dir: Path | None = None,
                 callbacks: tuple[EpochCallback, ...] = (), show_progress: bool = True) -> None:
        check_objective(objective)
        check_dp_batch_settings(config)
        if config.amp or config.grad_clip is not None:
            raise ConfigError("train.amp and train.grad_clip do not apply to DP training (DP-SGD clips "
                              f"each example's gradient to dp.max_grad_norm); got amp={config.amp}, "
                              f"grad_clip={config.grad_clip}")
        fixed, self.replaced_modules = make_dp_compatible(model)
        super().__init__(fixed, objective, config, threat=threat, run_dir=run_dir,
                         callbacks=callbacks, show_progress=show_progress)
        self.dp = dp
        self.engine: Any = None
        self._released = False  # fit gave the model back without Opacus' hooks
        self._missing_noise_state: list[str] = []  # DP generators a resumed checkpoint lacks

    # -- wrapping ------------------------------------------------------------------------------

    def prepare(self, train: Split) -> None:
        """Wrap model, optimiser and a Poisson-sampled loader of ``train`` (once)."""
        if self.engine is not None:
            return
        if len(train) == 0:  # before check_delta, whose bound 1/n does not exist then
            raise DataError("DP training needs a non-empty training split")
        check_delta(self.dp.delta, len(train))
        seed = self._secret_seed = private_seed(self.dp.noise_seed, self.config.seed)
        # their states go into the checkpoint (not into the settings), so that a resumed run goes on
        # drawing what the interrupted one would have
        self.sampling_rng = torch.Generator().manual_seed(seed)
        self.noise_rng = torch.Generator(device=self.device).manual_seed((seed + 1) % 2**63)
        loader = poisson_loader(with_int64_labels(train), self.config.batch_size, self.sampling_rng)
        with warnings.catch_warnings():
            # the secure-RNG notice; docs/DP.md says when to retrain with a cryptographic RNG
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=self.dp.accountant)
        # poisson_sampling=False: the loader samples already; Opacus takes it as it is and accounts
        # at 1/len(loader), the rate it samples at
        common = {"module": self.model, "optimizer": self.optimizer, "data_loader": loader,
                  "max_grad_norm": self.dp.max_grad_norm, "poisson_sampling": False,
                  "noise_generator": self.noise_rng}
        noise = self.dp.noise_multiplier
        if self.dp.target_epsilon is not None:
            noise = noise_for_target_epsilon(self.dp.target_epsilon, self.dp.delta, 1 / len(loader),
                                             self.config.epochs * len(loader), self.dp.accountant)
        gsm, self.optimizer, self.loader = self.engine.make_private(**common, noise_multiplier=noise)
        gsm.forbid_grad_accumulation()  # what make_private does under its own Poisson sampling
        self.private_model = HooksInTrainingOnly(gsm)
        self.sample_rate = 1 / len(loader)

    def steps_taken(self) -> int:
        """Noisy steps the accountant has seen (``len(accountant)`` counts its history entries)."""
        return sum(int(steps) for _, _, steps in self.engine.accountant.history)

    def epsilon(self) -> float:
        if self.optimizer.noise_multiplier == 0:
            return math.inf
        if self.steps_taken() == 0:
            return 0.0
        return spent_epsilon(self.engine.accountant.history, self.dp.delta, self.dp.accountant)

    def privacy_spent(self) -> PrivacySpent:
        return PrivacySpent(
            accountant=self.dp.accountant, epsilon=self.epsilon(), delta=self.dp.delta,
            noise_multiplier=float(self.optimizer.noise_multiplier),
            max_grad_norm=self.dp.max_grad_norm, sample_rate=self.sample_rate,
            expected_batch_size=self.optimizer.expected_batch_size,
            max_physical_batch_size=self.dp.max_physical_batch_size,
            steps=self.steps_taken(), replaced_modules=list(self.replaced_modules))

    # -- training ------------------------------------------------------------------------------

    def fit(self, train: Split, val: Split, *, resume: bool = False) -> DPTrainResult:
        if self._released:
            raise ConfigError("this DPTrainer has trained its model; build a new DPTrainer to train again")
        self.prepare(train)
        try:
            result = super().fit(train, val, resume=resume)
        finally:
            self._release_model()
        return DPTrainResult(**vars(result), privacy=self.privacy_spent())

    def _release_model(self) -> None:
        """Take Opacus' per-sample-gradient hooks and buffers off the trained model: the model is
        given back plain, so that attacks and other backward passes on it do not run them."""
        self.private_model.gsm.cleanup()
        self._released = True

    def _physical_batches(self) -> contextlib.AbstractContextManager[Any]:
        """The Poisson loader, split into physical batches of at most max_physical_batch_size."""
        if self.dp.max_physical_batch_size is None:
            return contextlib.nullcontext(self.loader)
        return BatchMemoryManager(data_loader=self.loader, optimizer=self.optimizer,
                                  max_physical_batch_size=self.dp.max_physical_batch_size)

    def _run_private_epoch(self, train: Split, val: Split, steps_per_epoch: int, bar: Progress
                           ) -> EpochRecord:
        start = time.perf_counter()
        self.private_model.train()
        total_steps = steps_per_epoch * self.config.epochs
        loss_sum, seen = torch.zeros((), device=self.device), 0
        lr, eps = self.optimizer.param_groups[0]["lr"], self.threat.eps
        batches = bar.add_task(f"epoch {self.state.epoch + 1}", total=steps_per_epoch)
        with self._physical_batches() as loader:
            for x, y in loader:
                lr = self._set_lr(self.state.step, total_steps)
                eps = self._warm_eps(self.state.step / steps_per_epoch)
                steps_before = self.steps_taken()
                if len(x) == 0:
                    self._noise_only_step()
                else:
                    loss = self._train_step(x.to(self.device), y.to(self.device))
                    loss_sum += loss.detach() * len(x)
                    seen += len(x)
                # a physical batch that only accumulated (BatchMemoryManager) is not a step of its own
                if self.steps_taken() > steps_before:
                    self.state.step += 1
                    bar.update(batches, advance=1)
        bar.remove_task(batches)
        if not torch.isfinite(loss_sum):
            raise ConfigError(f"training loss became {float(loss_sum)} in epoch {self.state.epoch + 1}; "
                              "lower the learning rate or check the data")
        clean, robust = self._validate(val)
        self.state.seconds += time.perf_counter() - start
        return EpochRecord(epoch=self.state.epoch + 1, lr=lr, eps=eps,
                           train_loss=float(loss_sum) / max(seen, 1), val_clean_accuracy=clean,
                           val_robust_accuracy=robust, seconds=time.perf_counter() - start,
                           epsilon=self.epsilon())

    def _noise_only_step(self) -> None:
        """The step for a batch Poisson sampling left empty: noise alone, counted by the accountant.

        Skipping it would reveal that the batch was empty, which the accounting does not allow for.
        One all-zero per-sample gradient adds nothing to the clipped sum.
        """
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def _train_step(self, x: Tensor, y: Tensor, weight: float = 1.0) -> Tensor:
        loss = self.objective(self.private_model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # the inputs never require grad here; Opacus' hooks only need the output gradients
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        self.objective.after_backward(self.private_model)
        self.optimizer.step()  # clips each example's gradient, adds noise, steps (or accumulates)
        return loss

    def _validate(self, val: Split) -> tuple[float, float | None]:
        # validation attacks the plain module, which carries the same hooks
        self.private_model.gsm.disable_hooks()
        try:
            return super()._validate(val)
        finally:
            self.private_model.gsm.enable_hooks()

    # -- checkpoints: the accountant's history travels with the weights ------------------------

    def _extra_rng_state(self) -> dict[str, Tensor]:
        return {"rng.dp.sampling": self.sampling_rng.get_state(), "rng.dp.noise": self.noise_rng.get_state()}

    def _load_extra_rng_state(self, tensors: dict[str, Tensor]) -> None:
        self._missing_noise_state = [k for k in DP_RNG_KEYS if k not in tensors]
        if not self._missing_noise_state:
            self.sampling_rng.set_state(tensors["rng.dp.sampling"])
            self.noise_rng.set_state(tensors["rng.dp.noise"])

    def _seed_generators(self) -> None:
        # The attack's random starts and dropout masks are the mechanism's internal randomness, so
        # they come from the secret seed, not from train.seed, which config.yaml publishes. Drawn in
        # order down a batch from a known generator, each example's draw would depend on its position:
        # one example more or less would change the others' clipped gradients, and every later step,
        # by more than the clip norm the accountant assumes.
        torch.manual_seed((self._secret_seed + 2) % 2**63)
        starts = torch.Generator(device=self.device).manual_seed((self._secret_seed + 3) % 2**63)
        self.objective.set_rng_state(starts.get_state(), self.device)

    def _run_epoch(self, train: Split, val: Split, steps_per_epoch: int, bar: Progress) -> EpochRecord:
        # a finished run drops the generators (_finish); resuming it is fine as long as nothing is drawn
        if self._missing_noise_state:
            raise CheckpointError(f"cannot resume {self.run_dir} with DP: its checkpoint holds no "
                                  f"{' or '.join(self._missing_noise_state)} (the state of DP's sampling "
                                  "and noise)")
        return self._run_private_epoch(train, val, steps_per_epoch, bar)

    def _finish(self) -> None:
        # a torch generator's state holds its seed: whoever held the finished directory could
        # recompute every noise draw, Poisson batch, random start and dropout mask, so the states go
        # once no step is left
        if self._writes_files:
            self._drop_noise_state()
        super()._finish()

    def _drop_noise_state(self) -> None:
        assert self.run_dir is not None
        tensors = ckpt.load_tensors(self.run_dir / TRAIN_STATE, "train-state", self._hashes[TRAIN_STATE])
        kept = {k: v for k, v in tensors.items() if k not in SECRET_RNG_KEYS}
        # staged: it commits with model.safetensors in the finished run's state.json (Trainer._finish),
        # so a kill before that commit resumes from the checkpoint that still holds the generators
        self._stage_tensors(TRAIN_STATE, kept, kind="train-state")

    def _save_checkpoint(self) -> None:
        # the accountant before the trainer's checkpoint: a run killed between the two writes
        # resumes from the previous checkpoint with a history holding more steps, which _restore
        # cuts back; the other order would resume with steps taken that no accountant has seen
        if self.run_dir is not None:
            self._write_dp_state()
        super()._save_checkpoint()

    def _write_dp_state(self) -> None:
        assert self.run_dir is not None
        state = {"dp": self.dp.model_dump(mode="json"),
                 "accountant": {"mechanism": self.engine.accountant.mechanism(),
                                "history": [list(h) for h in self.engine.accountant.history]}}
        ckpt.atomic_write_text(self.run_dir / DP_STATE_JSON, json.dumps(state))

    def _restore(self) -> None:
        super()._restore()
        assert self.run_dir is not None
        path = self.run_dir / DP_STATE_JSON
        if not path.is_file():
            raise CheckpointError(f"cannot resume {self.run_dir} with DP: {DP_STATE_JSON} is missing")
        state = ckpt.read_json(path)
        if not isinstance(state, dict) or state.get("dp") != self.dp.model_dump(mode="json"):
            raise CheckpointError(f"cannot resume {self.run_dir}: its DP settings differ from the ones "
                                  "given now")
        try:
            accountant = state["accountant"]
            history = [tuple(h) for h in accountant["history"]]
            mechanism = accountant["mechanism"]
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"cannot resume {self.run_dir}: {DP_STATE_JSON} is damaged (its accountant "
                                  f"needs 'mechanism' and 'history'; {type(err).__name__}: {err})") from err
        problem = _accounting_problem(mechanism, history, self.engine.accountant.mechanism(),
                                      float(self.optimizer.noise_multiplier), self.sample_rate)
        if problem is not None:  # an edited record would change the epsilon reported for the run
            raise CheckpointError(f"cannot resume {self.run_dir}: {DP_STATE_JSON} is damaged ({problem})")
        self.engine.accountant.load_state_dict({
            "mechanism": mechanism,
            # the trainer counts exactly the accountant's steps (see _run_epoch)
            "history": history_up_to(history, self.state.step, self.run_dir)})


def _accounting_problem(mechanism: Any, history: list[tuple[Any, ...]], accountant: str, noise: float,
                        sample_rate: float) -> str | None:
    """What in a saved accountant state this run could not have written, or None."""
    if mechanism != accountant:
        return f"its accountant is {mechanism!r}, this run's {accountant!r}"
    for entry in history:
        if len(entry) != 3 or not all(ckpt.is_finite_number(value) for value in entry) \
                or not (isinstance(entry[2], int) and entry[2] >= 0):
            return f"each accountant record must be [noise_multiplier, sample_rate, steps], got {list(entry)}"
        if (entry[0], entry[1]) != (noise, sample_rate):
            return (f"it accounts steps at noise multiplier {entry[0]!r} and sample rate {entry[1]!r}; this "
                    f"run takes them at {noise!r} and {sample_rate!r}")
    return None


# Above this RDP epsilon (no guarantee worth the name) PRV's discretised privacy-loss distribution
# needs gigabytes (a MemoryError at 6 GiB for noise 0.2 and 2,000 steps at sample rate 1/19) or
# gives inf, for at most about 10% less; RDP's bound stands there
PRV_BELOW = 100.0


def spent_epsilon(history: list[tuple[Any, ...]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the DP-SGD steps in ``history`` (Opacus' ``(noise_multiplier,
    sample_rate, steps)`` entries) by ``accountant``. For ``prv`` the smaller of its bound and RDP's:
    both are upper bounds, and PRV is tried only where RDP's is below PRV_BELOW."""
    from opacus.accountants import create_accountant

    def bound(name: str) -> float:
        counted = create_accountant(name)
        counted.history = list(history)
        with warnings.catch_warnings():
            # PRV bounds its domain with RDP, whose orders run out for very small epsilon: harmless
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(counted.get_epsilon(delta))

    rdp = bound("rdp")
    if accountant == "rdp" or rdp >= PRV_BELOW:
        return rdp
    try:
        return min(bound("prv"), rdp)
    except (MemoryError, ValueError, RuntimeError):  # the grid still too large, or its root search failed
        return rdp


# Opacus' bounds for its own noise search: the first upper guess, and the noise past which no budget is met
_FIRST_NOISE, _MOST_NOISE = 10.0, 1e6
_BISECTIONS = 60


def noise_for_target_epsilon(target: float, delta: float, sample_rate: float, steps: int, accountant: str,
                             tolerance: float = 0.01) -> float:
    """The noise multiplier whose ``steps`` steps at ``sample_rate`` spend at most ``target`` (and at
    least ``target - tolerance``) by ``spent_epsilon``, the bound the run reports.

    Opacus' ``make_private_with_epsilon`` bisects the same way but counts ``int(epochs / sample_rate)``
    steps, which rounds to one step short for some loader lengths (3 epochs of 75 batches: 224), so its
    answer could end above the target after the last step; and its PRV search at a large target
    needed gigabytes, which ``spent_epsilon`` avoids.
    """
    def epsilon(noise: float) -> float:
        with warnings.catch_warnings():
            # the search probes noise levels far off the answer, where RDP's orders run out either way
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return spent_epsilon([(noise, sample_rate, steps)], delta, accountant)

    low, high = 0.0, _FIRST_NOISE
    spent = epsilon(high)
    while spent > target:
        high *= 2
        if high > _MOST_NOISE:
            raise ConfigError(f"dp.target_epsilon={target:g} cannot be met with delta={delta:g} over {steps} "
                              "steps: raise it, or train for fewer epochs")
        spent = epsilon(high)
    # bounded: where the reported bound jumps (PRV taking over from RDP below PRV_BELOW) no noise may
    # land within the tolerance, and ``high`` (at most the target) is then the answer
    for _ in range(_BISECTIONS):
        if target - spent <= tolerance:
            break
        middle = (low + high) / 2
        spent_at_middle = epsilon(middle)
        if spent_at_middle <= target:
            high, spent = middle, spent_at_middle
        else:
            low = middle
    return high


def private_seed(noise_seed: int | None, train_seed: int) -> int:
    """The seed of DP's sampling and noise: from the OS's entropy unless ``noise_seed`` is given
    (then mixed with the training seed, so that a federation's clients and rounds draw apart)."""
    if noise_seed is None:
        return secrets.randbits(63)
    return (noise_seed * 1_000_003 + train_seed) % 2**63


def history_up_to(history: list[tuple[Any, ...]], steps: int, run_dir: Path) -> list[tuple[Any, ...]]:
    """The accountant's ``(noise_multiplier, sample_rate, steps)`` history cut to its first ``steps``
    steps, those of the checkpoint being resumed; fewer steps than that cannot be accounted."""
    kept, left = [], steps
    for noise_multiplier, sample_rate, count in history:
        if left == 0:
            break
        taken = min(int(count), left)
        kept.append((noise_multiplier, sample_rate, taken))
        left -= taken
    if left > 0:
        raise CheckpointError(f"cannot resume {run_dir} with DP: {DP_STATE_JSON} accounts for "
                              f"{steps - left} noisy steps, the checkpoint was taken after {steps}")
    return kept
