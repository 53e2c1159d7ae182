"""Client pieces: FedProx's term, poisoned updates, and what an update tells a curious server."""

from __future__ import annotations

import pytest
import torch
from fedkit import small_run
from torch import nn

from fortify.config import TrainConfig
from fortify.data.base import Split
from fortify.errors import ConfigError, DataError
from fortify.federated.client import (
    LocalResult,
    LocalTraining,
    ProximalObjective,
    build_local_objective,
    local_train_config,
    poison,
    reply_metrics,
    train_locally,
)
from fortify.federated.privacy import composed_epsilon, reconstruct_from_update, update_to_gradient
from fortify.privacy.reconstruction import reconstruction_quality, shared_gradient
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective

THREAT = ThreatModel("linf", 0.1)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_proximal_objective_adds_half_mu_times_the_squared_distance_to_the_global_weights(digits):
    model = _mlp()
    x, y = digits.train.x[:16], digits.train.y[:16]
    settings = LocalTraining(TrainConfig(objective="standard"), THREAT, proximal_mu=0.3)
    objective = build_local_objective(model, settings)
    assert isinstance(objective, ProximalObjective)
    plain = build_objective("standard", ObjectiveOptions(THREAT))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # every parameter moves by 0.01 from the anchor
    n_params = sum(p.numel() for p in model.parameters())
    expected = plain(model, x, y) + 0.3 / 2 * n_params * 0.01 ** 2
    assert objective(model, x, y).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_fedprox_keeps_local_weights_closer_to_the_global_ones(digits):
    shard = digits.train.head(128)

    def drift(mu: float) -> float:
        model = _mlp()
        start = _state(model)
        train_locally(model, shard, LocalTraining(
            TrainConfig(objective="standard", epochs=2, lr=0.1, early_stopping=False), THREAT,
            proximal_mu=mu))
        return sum(float((v - start[k]).pow(2).sum()) for k, v in model.state_dict().items()) ** 0.5

    assert drift(5.0) < 0.7 * drift(0.0)


def test_poisoned_updates_are_the_boosted_or_reversed_honest_update():
    glob = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    local = {"w": torch.tensor([1.5, 1.0]), "steps": torch.tensor(4)}
    scaled = poison(glob, local, mode="scale", scale=10.0)
    flipped = poison(glob, local, mode="flip", scale=2.0)
    assert scaled["w"].tolist() == pytest.approx([6.0, -8.0])  # 1 + 10 * 0.5, 2 + 10 * -1
    assert flipped["w"].tolist() == pytest.approx([0.0, 4.0])  # 1 - 2 * 0.5, 2 - 2 * -1
    assert int(scaled["steps"]) == 4  # integer buffers are passed through
    with pytest.raises(ConfigError, match="valid: flip, scale"):
        poison(glob, local, mode="noise", scale=1.0)


def _one_step_update(digits, index: int = 0, lr: float = 0.1, label_smoothing: float = 0.0,
                     momentum: float = 0.0, weight_decay: float = 0.0):
    """A client holding one digit takes one SGD step: the update a server receives."""
    model = _mlp(1)
    global_state = _state(model)
    shard = Split(digits.test.x[index:index + 1], digits.test.y[index:index + 1])
    config = TrainConfig(objective="standard", epochs=1, batch_size=1, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, schedule="constant", early_stopping=False,
                         label_smoothing=label_smoothing)
    train_locally(model, shard, LocalTraining(config, THREAT))
    local_state = _state(model)
    model.load_state_dict(global_state)  # the server's copy holds the global weights
    return model, global_state, local_state, shard


def test_a_one_step_update_is_exactly_the_clients_gradient(digits):
    model, global_state, local_state, shard = _one_step_update(digits)
    from_update = update_to_gradient(model, global_state, local_state, lr=0.1)
    direct = shared_gradient(model, shard.x, shard.y)
    for a, b in zip(from_update, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_decay_of_a_default_sgd_step_is_undone_exactly(digits):
    # Prepare: the training defaults, momentum 0.9 and weight decay 5e-4, on a fresh optimizer
    model, global_state, local_state, shard = _one_step_update(digits, momentum=0.9, weight_decay=5e-4)
    direct = shared_gradient(model, shard.x, shard.y)
    # Execute
    undone = update_to_gradient(model, global_state, local_state, lr=0.1, weight_decay=5e-4)
    kept = update_to_gradient(model, global_state, local_state, lr=0.1)
    # Assert: exact with the decay taken off; the decay left in is far outside the tolerance
    for a, b in zip(undone, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(AssertionError):
        for a, b in zip(kept, direct, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_decay_over_several_local_steps_is_refused(digits):
    model = _mlp()
    state = _state(model)
    with pytest.raises(ConfigError, match="one local step only, got local_steps=3"):
        update_to_gradient(model, state, state, lr=0.1, local_steps=3, weight_decay=5e-4)
    with pytest.raises(ConfigError, match="weight_decay must be finite and >= 0"):
        update_to_gradient(model, state, state, lr=0.1, weight_decay=-1.0)


def test_a_curious_server_reconstructs_the_clients_digit_from_its_update(digits):
    model, global_state, local_state, shard = _one_step_update(digits, index=1)
    result = reconstruct_from_update(model, global_state, local_state, (1, 8, 8), lr=0.1,
                                     method="idlg", steps=10)
    report = reconstruction_quality(result, shard.x, shard.y)
    assert report.label_accuracy == 1.0
    assert report.psnr[0] > 30.0  # a random guess scores about 5 dB on digits


def test_a_curious_server_matches_the_clients_label_smoothing(digits):
    # Prepare: the client's loss smooths its labels by 0.3, as train.label_smoothing says
    model, global_state, local_state, shard = _one_step_update(digits, index=1, label_smoothing=0.3)
    # Execute: the server attacks with the run's label smoothing, and with plain cross-entropy
    with pytest.warns(UserWarning, match="labels inferred from a gradient taken with label_smoothing=0.3"):
        matched = reconstruct_from_update(model, global_state, local_state, (1, 8, 8), lr=0.1,
                                          method="idlg", steps=10, label_smoothing=0.3)
    plain = reconstruct_from_update(model, global_state, local_state, (1, 8, 8), lr=0.1, method="idlg",
                                    steps=10)
    # Assert: only the client's own loss gives its gradient back from its digit (measured: about
    # 100 dB matched, 17 dB plain)
    assert reconstruction_quality(matched, shard.x, shard.y).psnr[0] > 30.0
    assert reconstruction_quality(plain, shard.x, shard.y).psnr[0] < 25.0
    assert matched.settings["label_smoothing"] == 0.3


def test_update_to_gradient_refuses_bad_lr_and_foreign_updates(digits):
    model = _mlp()
    state = _state(model)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        update_to_gradient(model, state, state, lr=0.0)
    with pytest.raises(DataError, match="lacks the model's parameters"):
        update_to_gradient(model, {"w": torch.zeros(1)}, state, lr=0.1)


def test_client_side_dp_hides_the_digit_from_a_curious_server(digits):
    # Prepare: the same one-example client as above, now training with DP-SGD
    from fortify.config import DPConfig

    model = _mlp(1)
    global_state = _state(model)
    shard = Split(digits.test.x[1:2], digits.test.y[1:2])
    config = TrainConfig(objective="standard", epochs=1, batch_size=1, lr=0.1, momentum=0.0,
                         weight_decay=0.0, schedule="constant", early_stopping=False)
    dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    # Execute
    result = train_locally(model, shard, LocalTraining(config, THREAT, dp=dp, server_round=3))
    local_state = _state(model)
    model.load_state_dict(global_state)
    attempt = reconstruct_from_update(model, global_state, local_state, (1, 8, 8), lr=0.1,
                                      method="idlg", steps=10)
    # Assert: the update moved, its privacy is accounted over three rounds, and the digit is lost
    assert any(not torch.equal(global_state[k], local_state[k]) for k in global_state)
    assert result.dp_epsilon is not None and 0 < result.dp_epsilon < float("inf")
    assert result.dp_epsilon > composed_epsilon(1.0, 1.0, 1, 1e-5)
    # by the accountant the clients' DP-SGD trainers use (PRV by default): one step a round, three rounds
    assert result.dp_epsilon == pytest.approx(_accountant_epsilon("prv", [(1.0, 1.0, 3)]), rel=1e-9)
    assert reconstruction_quality(attempt, shard.x, shard.y).psnr[0] < 20.0  # 30+ dB without DP


def test_fedprox_pulls_a_dp_client_towards_the_global_weights_too(digits):
    # Prepare: DP-SGD replaces each gradient with the noised per-example sum Opacus' hooks saw; the
    # proximal term flows through no layer, so it must be added after the noise to count at all
    from fortify.config import DPConfig

    shard = digits.train.head(64)
    config = TrainConfig(objective="standard", epochs=3, batch_size=16, lr=0.1, momentum=0.0,
                         weight_decay=0.0, schedule="constant", early_stopping=False)
    dp = DPConfig(enabled=True, noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5, noise_seed=0)

    def drift(mu: float) -> float:
        model = _mlp()
        start = _state(model)
        train_locally(model, shard, LocalTraining(config, THREAT, proximal_mu=mu, dp=dp))
        return sum((model.state_dict()[k] - start[k]).pow(2).sum() for k in start).sqrt().item()

    # Execute / Assert: same noise seed, so the same batches and noise; only the proximal pull differs
    assert drift(5.0) < 0.5 * drift(0.0)


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_fedprox_adds_exactly_mu_times_the_distance_to_the_global_weights_to_each_step(digits, private):
    # Prepare: one whole-shard batch a step (DP-SGD: sample rate 1, every example in every batch) and
    # the same noise seed, so that the first step is the same with and without the term (w = w_global
    # there) and the second differs only by it: lr * mu * (w_1 - w_global)
    from fortify.config import DPConfig

    shard = digits.train.head(8)
    lr, mu = 0.5, 2.0
    dp = DPConfig(enabled=True, noise_multiplier=0.3, max_grad_norm=1.0, delta=1e-3, noise_seed=5)

    def trained(epochs: int, proximal_mu: float) -> dict[str, torch.Tensor]:
        model = _mlp()
        config = TrainConfig(objective="standard", epochs=epochs, batch_size=8, lr=lr, momentum=0.0,
                             weight_decay=0.0, schedule="constant", early_stopping=False)
        train_locally(model, shard, LocalTraining(config, THREAT, proximal_mu=proximal_mu,
                                                  dp=dp if private else None))
        return _state(model)

    anchor, first = _state(_mlp()), trained(1, 0.0)
    # Execute
    without, with_term = trained(2, 0.0), trained(2, mu)
    # Assert: neither mu / 2 nor a term counted twice (once by autograd, once after the noise)
    for k in anchor:
        assert not torch.equal(first[k], anchor[k])
        torch.testing.assert_close(with_term[k] - without[k], -lr * mu * (first[k] - anchor[k]),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.os_entropy
def test_a_server_that_knows_every_setting_cannot_replay_a_dp_clients_noise(digits):
    # Prepare: one client round trained twice with exactly the settings the server sent (seed included)
    from fortify.config import DPConfig

    shard = digits.train.head(32)
    config = TrainConfig(objective="standard", epochs=1, batch_size=16, lr=0.1, momentum=0.0,
                         weight_decay=0.0, schedule="constant", early_stopping=False, seed=7)
    dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)

    def update() -> dict[str, torch.Tensor]:
        model = _mlp()
        train_locally(model, shard, LocalTraining(config, THREAT, dp=dp, server_round=2))
        return _state(model)

    # Execute / Assert: the noise (and the Poisson batches) come from the client's OS entropy
    first, second = update(), update()
    assert all(not torch.equal(first[k], second[k]) for k in first)


def test_a_dp_clients_reply_holds_no_metric_of_its_private_examples():
    private = LocalResult(train_loss=2.3, local_clean_accuracy=0.5, local_robust_accuracy=0.25,
                          dp_epsilon=1.5)
    assert reply_metrics(private, 40, 1) == {"partition-id": 1, "num-examples": 40, "dp-epsilon": 1.5}
    plain = LocalResult(train_loss=2.3, local_clean_accuracy=0.5, local_robust_accuracy=0.25)
    assert reply_metrics(plain, 40, 1) == {"partition-id": 1, "num-examples": 40, "train-loss": 2.3,
                                           "local-clean-accuracy": 0.5, "local-robust-accuracy": 0.25}


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_composed_epsilon_is_the_accountants_for_rounds_in_sequence(accountant: str):
    three_rounds = [(1.1, 0.1, 50), (1.1, 0.1, 50), (1.1, 0.1, 50)]  # of 50 steps each
    composed = composed_epsilon(1.1, 0.1, 150, 1e-5, accountant)
    assert composed == pytest.approx(_accountant_epsilon(accountant, three_rounds), rel=1e-6)
    assert composed_epsilon(1.1, 0.1, 300, 1e-5, accountant) > composed
    assert composed_epsilon(0.0, 0.1, 10, 1e-5, accountant) == float("inf")


def test_an_unknown_accountant_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown accountant 'gdp2'; valid: prv, rdp"):
        composed_epsilon(1.0, 0.1, 10, 1e-5, "gdp2")


def test_prv_and_rdp_give_different_epsilons_for_the_same_steps():
    # the tighter PRV bound is below RDP's, so reporting one as the other would be visible
    prv, rdp = (composed_epsilon(1.0, 0.05, 100, 1e-5, name) for name in ("prv", "rdp"))
    assert prv < 0.95 * rdp


def _accountant_epsilon(accountant: str, history: list[tuple[float, float, int]]) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    reference = PRVAccountant() if accountant == "prv" else RDPAccountant()
    reference.history = history
    return float(reference.get_epsilon(1e-5))


def test_federated_dp_needs_a_fixed_noise_level(digits):
    from fortify.config import DPConfig

    shard = Split(digits.test.x[:8], digits.test.y[:8])
    config = TrainConfig(objective="standard", epochs=1, batch_size=4, early_stopping=False)
    dp = DPConfig(enabled=True, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        train_locally(_mlp(), shard, LocalTraining(config, THREAT, dp=dp))


@pytest.mark.parametrize("clients", [4, 1500])
def test_every_client_and_round_trains_with_its_own_seed(clients):
    # the seed was seed + 1000 * round + client: with 1,000 clients or more, client 1000 of round 1
    # drew the noise and batches of client 0 of round 2
    run = small_run(clients=clients, rounds=3)
    seeds = {local_train_config(run, server_round, partition).seed
             for server_round in range(1, 4) for partition in range(clients)}
    assert len(seeds) == 3 * clients


def test_a_node_that_cuts_the_data_into_another_number_of_shards_is_refused():
    from fortify.federated.client import client_shard

    run = small_run(clients=3)
    assert len(client_shard(run, 2, 3)) > 0
    with pytest.raises(ConfigError, match="num-partitions=2, but the run has federation.clients=3"):
        client_shard(run, 0, 2)
    with pytest.raises(ConfigError, match=r"partition-id must be in \[0, 3\), got 3"):
        client_shard(run, 3, 3)
