"""DP-SGD training: per-sample gradients of every objective, accounting, batch splitting, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fortify.config import DPConfig, TrainConfig, load_config
from fortify.data import Dataset
from fortify.data.base import Split
from fortify.errors import CheckpointError, ConfigError, DataError
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.dp import DP_OBJECTIVES, DP_STATE_JSON, DPTrainer, make_dp_compatible, spent_epsilon
from fortify.training.methods import MethodOptions
from fortify.training.objectives import build_objective
from fortify.training.trainer import EpochCallback, EpochRecord, Trainer

pytest.importorskip("opacus")

THREAT = ThreatModel("linf", 0.1)


def _trainer(model: nn.Module, objective: str = "standard", *, epochs: int = 1, run_dir: Path | None = None,
             callbacks: tuple[EpochCallback, ...] = (), **dp: object) -> DPTrainer:
    settings = {"enabled": True, "noise_multiplier": 1.0} | dp
    config = TrainConfig(objective=objective, epochs=epochs, batch_size=64, lr=0.5, momentum=0.0,
                         weight_decay=0.0, early_stopping=False, val_attack_steps=3)
    built = build_objective(objective, MethodOptions(THREAT, attack_steps=3, seed=0))
    return DPTrainer(model, built, config, dp=DPConfig(**settings), threat=THREAT, run_dir=run_dir,
                     callbacks=callbacks, show_progress=False)


def _head(digits: Dataset, n: int = 256) -> Split:
    return Split(digits.train.x[:n], digits.train.y[:n])


def _mlp(digits: Dataset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", digits.input_shape, digits.num_classes)


# -- per-sample gradients ----------------------------------------------------------------------

def _record_crafted(objective: object) -> list[torch.Tensor]:
    """Spy on the objective's attack: keep every x_adv it crafts."""
    crafted: list[torch.Tensor] = []
    if not hasattr(objective, "craft"):
        return crafted
    original = objective.craft

    def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        crafted.append(original(model, x, y))
        return crafted[-1]

    objective.craft = craft  # type: ignore[attr-defined]
    return crafted


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", DP_OBJECTIVES)
def test_per_sample_gradients_equal_a_loop_over_single_examples(digits: Dataset, name: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a small CNN (conv and linear grad samplers), its plain twin, a batch of 6
    torch.manual_seed(0)
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    reference = copy.deepcopy(model)
    trainer = _trainer(model, name)
    trainer.prepare(digits.train)
    x, y = digits.train.x[:6], digits.train.y[:6]
    crafted = _record_crafted(trainer.objective)
    # Execute: the real attack runs inside the objective, on the hooked model
    trainer.private_model.train()
    trainer.objective(trainer.private_model, x, y).backward()
    per_sample = [p.grad_sample for p in trainer.model.parameters()]
    # Assert: each row is the gradient of that example's own loss at the same adversarial point
    if trainer.objective.adversarial:
        assert len(crafted) == 1 and (crafted[0] - x).abs().max() > 0.05
        batch_adv = crafted[0]
        trainer.objective.craft = lambda m, xi, yi: batch_adv[index:index + 1]  # type: ignore[attr-defined]
        # the plain twin would let TRADES craft from its one clean pass instead (the hooked model
        # takes the paper's two passes through ``craft``)
        monkeypatch.setattr("fortify.training.trades.runs_alike_in_both_modes", lambda model: False)
    for index in range(len(x)):
        loss = trainer.objective(reference, x[index:index + 1], y[index:index + 1])
        expected = torch.autograd.grad(loss, list(reference.parameters()))
        for got, want in zip(per_sample, expected):
            torch.testing.assert_close(got[index], want, rtol=1e-4, atol=1e-6)


def test_attack_with_hooks_on_breaks_the_per_sample_gradients(digits: Dataset) -> None:
    """Why the hooks go off in eval mode: an attack pass through live hooks cannot be accounted."""
    trainer = _trainer(_mlp(digits), "pgd")
    trainer.prepare(digits.train)
    gsm = trainer.private_model.gsm
    gsm.train()
    gsm(digits.train.x[:4])  # leaves activations from a training pass behind, as a loop would
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        trainer.objective(gsm, digits.train.x[:4], digits.train.y[:4])


# -- training, accounting and batch splitting -------------------------------------------------

@pytest.mark.slow
def test_target_epsilon_is_spent_by_the_last_epoch_and_the_model_learns(digits: Dataset) -> None:
    trainer = _trainer(_mlp(digits), epochs=2, target_epsilon=4.0, noise_multiplier=None, accountant="rdp")
    result = trainer.fit(digits.train, digits.val)
    spent = [record.epsilon for record in result.history]
    assert all(a < b for a, b in zip(spent, spent[1:]))
    # the noise is searched to 0.01 in epsilon, from below: the target is never exceeded
    assert 4.0 - 0.01 <= spent[-1] <= 4.0
    assert result.privacy is not None and result.privacy.epsilon == spent[-1]
    assert result.privacy.steps == 2 * 20  # ceil(1258 / 64) noisy steps per epoch
    assert result.history[-1].val_clean_accuracy > 0.5  # chance is 0.1


# 372 examples in batches of 4: 93 batches an epoch, one of the counts for which 1 / (1 / k) < k in
# floating point, so that a sampler taking int(1 / sample_rate) steps takes 92
N_93, BATCH_93 = 372, 4


def _random_split(n: int, *, seed: int = 0, label_dtype: torch.dtype = torch.long) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(torch.rand(n, 1, 8, 8, generator=generator),
                 torch.randint(0, 10, (n,), generator=generator).to(label_dtype))


def _linear_trainer(*, epochs: int = 1, batch_size: int = BATCH_93, run_dir: Path | None = None,
                    callbacks: tuple[EpochCallback, ...] = (), **dp: object) -> DPTrainer:
    torch.manual_seed(0)
    settings = {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-4, "noise_seed": 7} | dp
    config = TrainConfig(objective="standard", epochs=epochs, batch_size=batch_size, lr=0.1, momentum=0.0,
                         weight_decay=0.0, early_stopping=False, schedule="cosine")
    return DPTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                     build_objective("standard", MethodOptions(THREAT, seed=0)), config,
                     dp=DPConfig(**settings), threat=THREAT, run_dir=run_dir, callbacks=callbacks,
                     show_progress=False)


def test_an_epoch_takes_ceil_n_over_b_steps_at_the_rate_reported_even_where_one_over_it_rounds_down() -> None:
    lrs: list[float] = []
    trainer = _linear_trainer(callbacks=(lambda record: lrs.append(record.lr),))
    result = trainer.fit(_random_split(N_93), _random_split(20, seed=1))
    assert result.privacy is not None
    # the accountant charged what the report says: 93 steps at 1/93
    assert trainer.engine.accountant.history == [(1.0, 1 / 93, 93)]
    assert (result.privacy.sample_rate, result.privacy.steps) == (1 / 93, 93)
    again = spent_epsilon([(1.0, result.privacy.sample_rate, result.privacy.steps)], 1e-4, "prv")
    assert again == result.privacy.epsilon
    # the cosine schedule reached its last step (a step short, it ends at 1.1e-5 of the rate, not 0)
    assert lrs[-1] == pytest.approx(0.1 * (1 + math.cos(math.pi * 92 / 93)) / 2)


def test_a_target_epsilon_is_not_exceeded_where_one_over_the_sample_rate_rounds_down() -> None:
    result = _linear_trainer(noise_multiplier=None, target_epsilon=4.0, accountant="rdp").fit(
        _random_split(N_93), _random_split(20, seed=1))
    assert result.privacy is not None and 4.0 - 0.01 <= result.privacy.epsilon <= 4.0


def test_an_interrupted_run_resumes_where_one_over_the_sample_rate_rounds_down(tmp_path: Path) -> None:
    train, val = _random_split(N_93), _random_split(20, seed=1)
    full = _linear_trainer(epochs=2, run_dir=tmp_path / "full").fit(train, val)
    with pytest.raises(Interrupted):
        cut = _linear_trainer(epochs=2, run_dir=tmp_path / "cut", callbacks=(_kill_after_first_epoch,))
        cut.fit(train, val)
    resumed = _linear_trainer(epochs=2, run_dir=tmp_path / "cut").fit(train, val, resume=True)
    assert resumed.privacy is not None and full.privacy is not None
    assert resumed.privacy.steps == full.privacy.steps == 2 * 93
    assert resumed.privacy.epsilon == full.privacy.epsilon


def test_int32_labels_train_under_dp_as_they_do_without() -> None:
    train, val = _random_split(40, label_dtype=torch.int32), _random_split(20, seed=1)
    result = _linear_trainer(batch_size=8, delta=1e-3).fit(train, val)
    assert result.privacy is not None and result.privacy.steps == 5


def test_an_empty_training_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match="non-empty training split"):
        _linear_trainer().fit(_random_split(0), _random_split(20, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_group_norm_in_place_of_a_frozen_batch_norm_is_on_its_device_and_in_its_dtype(
        dtype: torch.dtype) -> None:
    # the meta device stands in for a GPU: a layer left on the CPU there fails the first forward pass
    norm = nn.BatchNorm2d(4)
    norm.requires_grad_(False)  # frozen, as when fine-tuning a pretrained network
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.Flatten(), nn.Linear(4 * 64, 10))
    fixed, replaced = make_dp_compatible(model.to("meta", dtype))
    assert replaced == ["1: BatchNorm2d -> GroupNorm"]
    assert {(p.device.type, p.dtype) for p in fixed.parameters()} == {("meta", dtype)}


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [0.64, 2.04, 8.0])
def test_the_noise_for_a_target_spends_at_most_it_over_the_steps_taken(accountant: str,
                                                                       target: float) -> None:
    from fortify.training.dp import noise_for_target_epsilon, spent_epsilon

    # 3 epochs of 75 batches: Opacus' search counted int(3 / (1 / 75)) = 224 steps for the 225 taken,
    # and its noise for 0.64 (1.5625) spends 0.6409 over them
    noise = noise_for_target_epsilon(target, 1e-5, 1 / 75, 225, accountant)
    spent = spent_epsilon([(noise, 1 / 75, 225)], 1e-5, accountant)
    assert target - 0.01 <= spent <= target


def test_a_large_target_with_prv_is_found_without_prv_grids_that_fill_the_memory() -> None:
    from fortify.training.dp import PRV_BELOW, noise_for_target_epsilon, spent_epsilon

    # Opacus' PRV search at this target needed 3.2 GiB and 76 s (a MemoryError under a 6 GiB limit);
    # above PRV_BELOW the bound reported is RDP's, and the search uses the same bound
    noise = noise_for_target_epsilon(200.0, 1e-5, 1 / 20, 300, "prv")
    assert 199.99 <= spent_epsilon([(noise, 1 / 20, 300)], 1e-5, "prv") <= 200.0
    assert PRV_BELOW < 200.0


def test_epsilon_matches_a_fresh_accountant_for_the_same_steps(digits: Dataset) -> None:
    trainer = _trainer(_mlp(digits), epochs=1, noise_multiplier=1.3, accountant="rdp")
    result = trainer.fit(digits.train, digits.val)
    from opacus.accountants import RDPAccountant

    fresh = RDPAccountant()
    fresh.history = [(1.3, 1 / 20, 20)]
    assert result.privacy is not None and result.privacy.steps == 20
    assert result.privacy.epsilon == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)


def test_prv_is_never_above_rdp_and_rdp_stands_where_prv_would_not_fit_in_memory() -> None:
    # Prepare: a usual noise level, and noise 0.1 over 285 steps, where PRV's grid needs more than
    # 4 GiB (or the OOM killer) and RDP's bound is in the thousands
    from opacus.accountants import PRVAccountant, RDPAccountant

    from fortify.training.dp import PRV_BELOW, spent_epsilon

    usual, tiny_noise = [(1.0, 1 / 20, 200)], [(0.1, 1 / 19, 285)]
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = rdp.history = usual
    # Execute
    accounted = spent_epsilon(usual, 1e-5, "prv"), spent_epsilon(tiny_noise, 1e-5, "prv")
    # Assert: PRV's tighter bound where it is cheap, RDP's (finite, at once) where it is not
    assert accounted[0] == pytest.approx(prv.get_epsilon(1e-5), rel=1e-9)
    assert accounted[0] < rdp.get_epsilon(1e-5)
    rdp.history = tiny_noise
    assert accounted[1] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert accounted[1] > PRV_BELOW


def test_physical_batches_give_the_same_update_as_whole_logical_batches(digits: Dataset) -> None:
    # without noise the update is a deterministic function of the Poisson batches (same seed)
    whole = _trainer(_mlp(digits), noise_multiplier=0.0, noise_seed=0)
    split = _trainer(_mlp(digits), noise_multiplier=0.0, max_physical_batch_size=9, noise_seed=0)
    whole.fit(_head(digits), digits.val)
    result = split.fit(_head(digits), digits.val)
    assert result.privacy is not None and result.privacy.steps == 4
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert result.privacy.epsilon == float("inf")


def test_the_reported_expected_batch_size_is_what_opacus_divides_the_gradient_sum_by(digits: Dataset) -> None:
    # Prepare: n = 250 and batch 64 make 4 Poisson batches an epoch, so n * sample_rate = 62.5 is no
    # integer; no noise and a clip norm no gradient reaches, so the update is the plain gradient sum
    model = _mlp(digits)
    reference = copy.deepcopy(model)
    trainer = _trainer(model, noise_multiplier=0.0, max_grad_norm=1e6)
    trainer.prepare(_head(digits, 250))
    x, y = digits.train.x[:40], digits.train.y[:40]
    summed = torch.nn.functional.cross_entropy(reference(x), y, reduction="sum")
    gradient_sum = torch.autograd.grad(summed, list(reference.parameters()))
    # Execute: one DP-SGD step through the trainer
    trainer.private_model.train()
    trainer._train_step(x, y)
    reported = trainer.privacy_spent().expected_batch_size
    # Assert: the reported divisor is Opacus' own (it truncates n * sample_rate), and the step used it
    assert trainer.sample_rate * 250 == 62.5
    assert reported == trainer.optimizer.expected_batch_size == 62
    for p, want in zip(trainer.model.parameters(), gradient_sum, strict=True):
        torch.testing.assert_close(p.grad * reported, want, rtol=1e-4, atol=1e-5)


def test_batchnorm_is_replaced_and_the_result_says_so(digits: Dataset) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 64, 10))
    trainer = _trainer(model)
    result = trainer.fit(_head(digits), digits.val)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trainer.model.modules())
    assert result.privacy is not None
    assert result.privacy.replaced_modules == ["1: BatchNorm2d -> GroupNorm"]


@pytest.mark.parametrize("frozen", [False, True], ids=["affine=False", "frozen affine"])
def test_a_batchnorm_without_trainable_parameters_is_replaced_too(digits: Dataset, frozen: bool) -> None:
    # Opacus' fix passes over modules without trainable parameters: such a BatchNorm kept mixing the
    # examples of a batch (and publishing their running statistics) under a reported epsilon
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4, affine=frozen)
    if frozen:
        norm.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    trainer = _trainer(model)
    result = trainer.fit(_head(digits), digits.val)
    replacement = trainer.model[1]
    assert isinstance(replacement, nn.GroupNorm) and replacement.affine is frozen
    assert all(not p.requires_grad for p in replacement.parameters())
    assert result.privacy is not None and result.privacy.replaced_modules == ["1: BatchNorm2d -> GroupNorm"]
    # each example's output is its own: changing one input leaves the others' untouched
    x = torch.rand(4, 1, 8, 8)
    changed = x.clone()
    changed[0] = 1 - changed[0]
    trainer.model.train()
    with torch.no_grad():
        assert torch.equal(trainer.model(x)[1:], trainer.model(changed)[1:])


def test_an_instance_norm_that_tracks_running_statistics_is_refused(digits: Dataset) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, track_running_stats=True),
                          nn.Flatten(), nn.Linear(4 * 64, 10))
    with pytest.raises(ConfigError, match=r"InstanceNorm with track_running_stats=True \(1\)"):
        _trainer(model).fit(_head(digits), digits.val)


class Interrupted(Exception):
    pass


def _kill_after_first_epoch(record: EpochRecord) -> None:
    if record.epoch == 1:
        raise Interrupted


def test_resumed_run_equals_an_uninterrupted_one(digits: Dataset, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the same settings twice, with the same entropy for DP's generators; the second run is
    # killed after its first epoch, and the run that resumes it draws other entropy, which the
    # checkpoint's generator states must override
    entropy = iter([11, 11, 22])
    monkeypatch.setattr("secrets.randbits", lambda _bits: next(entropy))
    full = _trainer(_mlp(digits), epochs=2, run_dir=tmp_path / "full", accountant="rdp")
    cut = _trainer(_mlp(digits), epochs=2, run_dir=tmp_path / "cut", callbacks=(_kill_after_first_epoch,),
                   accountant="rdp")
    # Execute
    expected = full.fit(_head(digits), digits.val)
    with pytest.raises(Interrupted):
        cut.fit(_head(digits), digits.val)
    resumed = _trainer(_mlp(digits), epochs=2, run_dir=tmp_path / "cut", accountant="rdp")
    result = resumed.fit(_head(digits), digits.val, resume=True)
    # Assert: same weights, same privacy spent after each epoch (the accountant came back too)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [r.epsilon for r in result.history] == [r.epsilon for r in expected.history]
    assert result.privacy is not None and result.privacy.steps == 8


@pytest.mark.os_entropy
def test_the_noise_cannot_be_recomputed_from_the_settings_unless_a_noise_seed_is_given(
        digits: Dataset, tmp_path: Path) -> None:
    # two runs with the same settings (training seed included): the noise and the Poisson batches
    # come from the OS's entropy, so a server or reader of config.yaml cannot replay them
    def trained(**dp: object) -> list[torch.Tensor]:
        trainer = _trainer(_mlp(digits), **dp)
        trainer.fit(_head(digits), digits.val)
        return [p.detach().clone() for p in trainer.model.parameters()]

    first, second = trained(), trained()
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    seeded, again = trained(noise_seed=3), trained(noise_seed=3)
    assert all(torch.equal(a, b) for a, b in zip(seeded, again, strict=True))


def test_a_finished_directory_holds_no_state_of_the_noise_and_still_resumes(digits: Dataset,
                                                                           tmp_path: Path) -> None:
    # Prepare
    from safetensors import safe_open

    trainer = _trainer(_mlp(digits), epochs=2, run_dir=tmp_path)
    # Execute
    trained = trainer.fit(_head(digits), digits.val)
    again = _trainer(_mlp(digits), epochs=2, run_dir=tmp_path).fit(_head(digits), digits.val, resume=True)
    # Assert: a generator's state holds its seed, so no generator the private data met may be left on
    # disk (sampling, noise, the attack's random starts, dropout's global one); resuming the finished
    # run draws nothing and loads (its hashes were brought up to date)
    with safe_open(tmp_path / "state.safetensors", framework="pt") as saved:
        names = set(saved.keys())
    assert not {"rng.dp.sampling", "rng.dp.noise", "rng.objective", "rng.torch"} & names
    assert "rng.shuffle" in names
    assert again.privacy is not None and trained.privacy is not None
    assert again.privacy.steps == trained.privacy.steps == 8


@pytest.mark.os_entropy
@pytest.mark.parametrize("objective", ["pgd", "trades"])
def test_the_attacks_random_starts_and_dropout_draw_from_the_secret_seed(digits: Dataset,
                                                                         objective: str) -> None:
    # train.seed is published in config.yaml; from it, each example's random start was known and moved
    # with its position in the Poisson batch, so one example more or less changed the others' clipped
    # gradients (by 2.6 times the clip norm in a 64-example PGD-AT batch) and every later step
    def starts_and_global(**dp: object) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = _trainer(_mlp(digits), objective, **dp)
        trainer.prepare(_head(digits))
        trainer._seed_generators()  # what fit does for a fresh run
        return trainer.objective.rng_state(), torch.get_rng_state()

    public = torch.Generator().manual_seed(0).get_state()  # the objective's seed without DP
    first, second = starts_and_global(), starts_and_global()
    assert not torch.equal(first[0], public) and not torch.equal(first[1], public)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    seeded, again = starts_and_global(noise_seed=3), starts_and_global(noise_seed=3)
    assert torch.equal(seeded[0], again[0]) and torch.equal(seeded[1], again[1])


def test_the_trained_model_comes_back_without_opacus_hooks(digits: Dataset) -> None:
    # Prepare
    from fortify.attacks import PGD

    trainer = _trainer(_mlp(digits))
    trainer.fit(_head(digits), digits.val)
    model = trainer.model.eval()
    x, y = digits.test.x[:16], digits.test.y[:16]
    # Execute: an attack and a plain backward pass, as `fortify run` makes after training
    x_adv = PGD(THREAT, steps=3).run(model, x, y)
    torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    # Assert: no per-sample gradient was made, and the trainer will not train the released model again
    assert (x_adv - x).abs().max() <= THREAT.eps + 1e-6
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    with pytest.raises(ConfigError, match="build a new DPTrainer"):
        trainer.fit(_head(digits), digits.val)


@pytest.mark.parametrize("killed", ["before", "after"])
def test_a_run_killed_between_its_two_checkpoint_writes_accounts_every_step(
        digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed: str) -> None:
    # Prepare: the uninterrupted run, then one that dies at epoch 2's checkpoint, before or after
    # the trainer's own files (state.json) but after or before dp_state.json
    expected = _trainer(_mlp(digits), epochs=3, run_dir=tmp_path / "full", accountant="rdp").fit(
        _head(digits), digits.val)
    trainer_save = Trainer._save_checkpoint

    def save_and_die(self: Trainer) -> None:
        if killed == "after":
            trainer_save(self)
        if self.state.epoch == 2:
            raise Interrupted
        if killed == "before":
            trainer_save(self)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_and_die)
    with pytest.raises(Interrupted):
        _trainer(_mlp(digits), epochs=3, run_dir=tmp_path / "cut", accountant="rdp").fit(
            _head(digits), digits.val)
    monkeypatch.undo()
    # Execute
    result = _trainer(_mlp(digits), epochs=3, run_dir=tmp_path / "cut", accountant="rdp").fit(
        _head(digits), digits.val, resume=True)
    # Assert: every noisy step behind the released weights is accounted for, none twice
    assert expected.privacy is not None and result.privacy is not None
    assert result.privacy.steps == expected.privacy.steps == 12
    assert result.privacy.epsilon == expected.privacy.epsilon


def test_resume_with_an_accountant_behind_the_checkpoint_is_refused(digits: Dataset, tmp_path: Path) -> None:
    # Prepare: a finished 2-epoch run whose dp_state.json lost its second epoch's steps
    _trainer(_mlp(digits), epochs=2, run_dir=tmp_path).fit(_head(digits), digits.val)
    path = tmp_path / DP_STATE_JSON
    state = json.loads(path.read_text())
    noise_multiplier, sample_rate, steps = state["accountant"]["history"][0]
    state["accountant"]["history"] = [[noise_multiplier, sample_rate, steps // 2]]
    path.write_text(json.dumps(state))
    # Assert: resuming would report less privacy spent than the weights cost
    with pytest.raises(CheckpointError, match="accounts for 4 noisy steps, the checkpoint was taken after 8"):
        _trainer(_mlp(digits), epochs=2, run_dir=tmp_path).fit(_head(digits), digits.val, resume=True)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda state: state.pop("accountant"), "dp_state.json is damaged"),
    (lambda state: state["accountant"].pop("mechanism"), "dp_state.json is damaged"),
    (lambda state: state["accountant"].update(history=7), "dp_state.json is damaged"),
    # an edited noise level was taken at its word, and the run reported an epsilon of 0.035 for 4.2
    (lambda state: state["accountant"]["history"][0].__setitem__(0, 30.0),
     "accounts steps at noise multiplier 30.0 and sample rate 0.25; this run takes them at 1.0 and 0.25"),
    (lambda state: state["accountant"]["history"][0].pop(), r"must be \[noise_multiplier, sample_rate"),
    (lambda state: state["accountant"]["history"][0].__setitem__(0, "x"), "must be \\[noise_multiplier"),
    (lambda state: state["accountant"].update(mechanism="gdp"), "its accountant is 'gdp', this run's 'prv'"),
])
def test_resume_with_a_damaged_dp_state_is_a_checkpoint_error(digits: Dataset, tmp_path: Path, edit,
                                                              match) -> None:
    _trainer(_mlp(digits), run_dir=tmp_path).fit(_head(digits), digits.val)
    path = tmp_path / DP_STATE_JSON
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=match):
        _trainer(_mlp(digits), run_dir=tmp_path).fit(_head(digits), digits.val, resume=True)


def test_resume_with_other_dp_settings_is_refused(digits: Dataset, tmp_path: Path) -> None:
    _trainer(_mlp(digits), noise_multiplier=1.0, run_dir=tmp_path).fit(_head(digits), digits.val)
    other = _trainer(_mlp(digits), noise_multiplier=2.0, run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="DP settings differ"):
        other.fit(_head(digits), digits.val, resume=True)
    assert (tmp_path / DP_STATE_JSON).is_file()


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "match"), [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"delta": 1.0}, "delta"),
    ({"noise_multiplier": 1.0, "target_epsilon": 4.0}, "exactly one of"),
    ({}, "exactly one of"),
])
def test_bad_dp_settings_are_config_errors(overrides: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"dp": {"enabled": True, **overrides}})


def test_delta_at_or_above_one_over_n_is_refused(digits: Dataset) -> None:
    trainer = _trainer(_mlp(digits), delta=1e-3)
    with pytest.raises(ConfigError, match=r"delta=0.001 must be in \(0, 1/n\).*n=1258"):
        trainer.fit(digits.train, digits.val)


@pytest.mark.parametrize("name", ["free", "awp-pgd"])
def test_objectives_dp_cannot_train_are_refused_with_the_valid_list(digits: Dataset, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name!r} cannot be trained with DP; valid: standard, fgsm, "):
        _trainer(_mlp(digits), name)


class _RunningScale(nn.Module):
    """A trainable layer with a buffer it updates: nothing Opacus can make private."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(64))
        self.register_buffer("running", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_a_module_opacus_cannot_fix_is_a_config_error(digits: Dataset) -> None:
    model = nn.Sequential(nn.Flatten(), _RunningScale(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match="cannot train and Opacus cannot replace.*_RunningScale"):
        _trainer(model)


def test_amp_and_global_grad_clip_are_refused(digits: Dataset) -> None:
    built = build_objective("standard", MethodOptions(THREAT))
    with pytest.raises(ConfigError, match="grad_clip=1.0"):
        DPTrainer(_mlp(digits), built, TrainConfig(grad_clip=1.0),
                  dp=DPConfig(enabled=True, noise_multiplier=1.0), threat=THREAT)


def test_batch_settings_dp_cannot_account_for_are_refused_by_the_trainer_itself(digits: Dataset) -> None:
    # the pipeline refuses them before a run; a DPTrainer built directly must refuse them too
    built = build_objective("standard", MethodOptions(THREAT))
    config = TrainConfig(augment={"flip": True}, channels_last=True)
    with pytest.raises(ConfigError, match=r"train\.augment, train\.channels_last cannot be combined"):
        DPTrainer(_mlp(digits), built, config, dp=DPConfig(enabled=True, noise_multiplier=1.0),
                  threat=THREAT)


def test_dp_training_of_a_conv_net_stays_in_the_default_layout_when_unset(digits: Dataset) -> None:
    # unset, the plain Trainer trains a conv net channels_last on CPU; Opacus' per-example gradients
    # were not measured so, and DP-SGD keeps the weights as given
    torch.manual_seed(0)
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    layouts: list[tuple[int, ...]] = []
    # trainer.model: the copy DP-SGD trains (make_dp_compatible), not the model handed in
    trainer = _trainer(model, callbacks=(lambda _record: layouts.append(trainer.model[2].weight.stride()),))
    assert trainer.config.channels_last is None and not trainer.channels_last
    trainer.fit(_head(digits), _head(digits, 64))
    assert layouts == [(32 * 9, 9, 3, 1)]


# -- command line ------------------------------------------------------------------------------

def test_cli_rejects_a_bad_epsilon_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fortify.cli import app

    result = CliRunner().invoke(app, ["train", "--dp", "--target-epsilon", "0", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "dp.target_epsilon" in result.output and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("flags, fragment", [
    (["--objective", "free"], "free"),
    (["--amp", "bf16"], "train.amp"),
    (["--delta", "0.01"], "must be in (0, 1/n)"),  # checked against n, still before any write
    (["--noise-multiplier", "inf"], "dp.noise_multiplier"),  # the last --noise-multiplier wins
])
def test_cli_refuses_dp_settings_before_writing_anything(tmp_path: Path, flags, fragment) -> None:
    from typer.testing import CliRunner

    from fortify.cli import app

    out = tmp_path / "m"
    args = ["train", "--dp", "--noise-multiplier", "1", *flags, "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert isinstance(result.exception, SystemExit)
    assert not out.exists() or not any(out.rglob("*"))  # the same command can be run again, fixed


@pytest.mark.slow
def test_cli_dp_run_records_epsilon_and_audit_and_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from fortify.cli import app
    from fortify.pipeline import load_trained_model
    from fortify.privacy import recipe

    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["train", "--model", "mlp", "--objective", "standard", "--epochs", "1",
                                      "--dp", "--noise-multiplier", "1.0", "--canaries", "20", "--quiet",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "training.json").read_text())
    assert training["history"][0]["epsilon"] == training["privacy"]["epsilon"] > 0
    assert training["canary_audit"]["epsilon_upper"] == training["privacy"]["epsilon"]
    assert training["canary_audit"]["n_inserted"] == 20
    model, card = load_trained_model(out, torch.device("cpu"))
    assert card["opacus_fixed"] is True and sum(p.numel() for p in model.parameters()) > 0
    # LiRA's reference models of a DP run train under DP-SGD too, as the audited model did
    dp_reference_models = []
    train_with_dp = recipe._dp_trainer
    monkeypatch.setattr(recipe, "_dp_trainer", lambda *args: dp_reference_models.append(args[3]) or
                        train_with_dp(*args))
    audited = CliRunner().invoke(app, ["audit", str(out), "--reference-models", "2", "--no-inversion",
                                       "--device", "cpu"])
    assert audited.exit_code == 0, audited.output
    membership = json.loads((out / "privacy.json").read_text())["privacy"]["membership"]
    assert {"lira-online", "lira-offline"} <= {m["attack"] for m in membership}
    assert [dp.noise_multiplier for dp in dp_reference_models] == [1.0, 1.0]


def test_cli_dp_flags_without_dp_and_an_unreachable_epsilon_are_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fortify.cli import app

    runner, out = CliRunner(), tmp_path / "m"
    without_dp = runner.invoke(app, ["train", "--noise-multiplier", "1", "--out", str(out), "--quiet"])
    assert without_dp.exit_code == 2 and "--noise-multiplier only applies to DP training" in without_dp.output
    tiny = runner.invoke(app, ["train", "--dp", "--target-epsilon", "1e-9", "--model", "mlp", "--epochs", "1",
                               "--objective", "standard", "--out", str(out), "--quiet"])
    assert tiny.exit_code == 2 and "dp.target_epsilon=1e-09 cannot be met" in tiny.output, tiny.output
    assert isinstance(without_dp.exception, SystemExit) and isinstance(tiny.exception, SystemExit)
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("section", [{"target_epsilon": 4.0}, {"noise_multiplier": 1.0, "max_grad_norm": 0.5},
                                     {"enabled": False, "delta": 1e-6}])
def test_dp_settings_in_a_config_file_without_dp_enabled_are_refused(tmp_path: Path, section: dict) -> None:
    # they trained a non-private model, exit 0, under a config.yaml that read as private
    from typer.testing import CliRunner

    from fortify.cli import app

    config = tmp_path / "private.yaml"
    config.write_text(yaml.safe_dump({"dp": section}))
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--model", "mlp", "--objective",
                                      "standard", "--epochs", "1", "--quiet", "--out", str(out)])
    named = ", ".join(f"dp.{name}" for name in sorted(section) if name != "enabled")
    assert result.exit_code == 2 and f"{named} only appl" in result.output, result.output
    assert not out.exists()


def test_cli_canaries_without_dp_audit_a_non_private_model(tmp_path: Path) -> None:
    # the baseline of DP.md's table: the canary audit of a model trained without DP
    from typer.testing import CliRunner

    from fortify.cli import app

    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["train", "--canaries", "20", "--model", "mlp", "--objective",
                                      "standard", "--epochs", "1", "--quiet", "--device", "cpu",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    audit = json.loads((out / "training.json").read_text())["canary_audit"]
    assert audit["n_inserted"] == audit["n_held_out"] == 20 and audit["epsilon_upper"] is None
