"""How the audit builds its shadow and reference models: afresh, never from the target's weights, and on
halves of the distinct inputs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fortify.data import Split
from fortify.errors import ConfigError
from fortify.privacy import audit, shadow_attack
from fortify.privacy.recipe import TrainerRecipe


class _Scale(nn.Module):
    """A layer with a raw parameter and no reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class _Attending(nn.Module):
    """Self-attention over 4 tokens of 8 features; MultiheadAttention resets via _reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(len(x), 4, 8)
        return self.head(self.attention(tokens, tokens, tokens)[0].flatten(1))


def test_every_parameter_of_a_fresh_copy_is_reinitialised():
    # Prepare: a "trained" target, every weight moved far from any initialisation
    torch.manual_seed(0)
    target = _Attending()
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.fill_(7.0)
    # Execute
    fresh = TrainerRecipe.like(target).model_factory()
    # Assert: attention's in-projection (reset only by _reset_parameters) included
    for (name, trained), (_, new) in zip(target.named_parameters(), fresh.named_parameters(), strict=True):
        assert not torch.equal(trained, new), name
    assert (target.attention.in_proj_weight == 7.0).all()  # the target itself is left alone


def test_a_parameter_nothing_can_reinitialise_is_refused_by_name():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), _Scale())
    with pytest.raises(ConfigError, match=r"module\(s\) 2 \(_Scale\).*TrainerRecipe\(model_factory"):
        TrainerRecipe.like(model)


def test_offline_lira_with_one_reference_model_is_refused_before_training():
    x, y = torch.rand(8, 4), torch.arange(8) % 2
    model = nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="lira-offline needs n_reference_models >= 2, got 1"):
        audit(model, Split(x[:4], y[:4]), Split(x[4:], y[4:]), attacks=("lira-offline",),
              n_reference_models=1)


def test_shadow_models_keep_copies_of_one_input_on_the_same_side():
    # Prepare: a shadow pool in which every input occurs twice, and a recipe that records its data
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(10, 4, generator=generator).repeat(2, 1)
    y = torch.arange(10).repeat(2) % 2
    seen: list[Tensor] = []

    def recording_recipe(train: Split, *, seed: int) -> nn.Module:
        seen.append(train.x)
        torch.manual_seed(seed)
        return nn.Linear(4, 2)

    members, non_members = Split(torch.rand(6, 4, generator=generator), torch.arange(6) % 2), \
        Split(torch.rand(6, 4, generator=generator), torch.arange(6) % 2)
    # Execute
    shadow_attack(nn.Linear(4, 2), members, non_members, shadow_pool=Split(x, y), recipe=recording_recipe,
                  n_shadows=4)
    # Assert: each shadow trained on both copies of an input or on neither, and on half the inputs
    for data in seen:
        trained = (x[:, None] == data[None]).all(-1).any(-1)
        assert torch.equal(trained[:10], trained[10:])
        assert int(trained[:10].sum()) == 5


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def test_a_dp_recipe_trains_as_the_dp_trainer_does(digits):
    # A DP run's reference models must be trained as the run was: DP-SGD, BatchNorm replaced
    from fortify.config import DPConfig, TrainConfig
    from fortify.threat import ThreatModel
    from fortify.training.dp import DPTrainer
    from fortify.training.methods import objective_from_config

    train, val = (Split(part.x[:96], part.y[:96]) for part in (digits.train, digits.val))
    threat = ThreatModel("linf", 0.1)
    config = TrainConfig(objective="standard", epochs=1, batch_size=32, lr=0.1, early_stopping=False)
    dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=3)
    recipe = TrainerRecipe(_bn_net, config, threat, val=val, dp=dp)
    # Execute: the recipe, and the DPTrainer by hand with the same seeds
    trained = recipe(train, seed=7)
    torch.manual_seed(7)
    seeded = config.model_copy(update={"seed": 7})
    direct = DPTrainer(_bn_net(), objective_from_config(seeded, threat), seeded, dp=dp, threat=threat,
                       show_progress=False)
    direct.fit(train, val)
    # Assert
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trained.modules())
    assert not trained.training
    weights, expected = trained.state_dict(), direct.model.state_dict()
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        assert torch.equal(value, expected[name]), name
    plain = TrainerRecipe(_bn_net, config, threat, val=val)(train, seed=7)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
