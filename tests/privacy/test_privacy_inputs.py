"""Input the membership attacks must refuse with its problem, or take as the model takes it.

Tiny untrained models: what is checked is the handling of the input, not what an attack finds.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from fortify import errors
from fortify.data import Split
from fortify.errors import DataError
from fortify.privacy import (
    augmentation_attack,
    augmentation_scores,
    boundary_distance_attack,
    hopskipjump_boundary_distance,
    pgd_boundary_distance,
    random_direction_distance,
    shadow_attack,
    threshold_attack,
    train_reference_models,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def _inputs(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def _halves(x: torch.Tensor, y: torch.Tensor) -> tuple[Split, Split]:
    half = len(x) // 2
    return Split(x[:half], y[:half]), Split(x[half:], y[half:])


LABEL_ONLY = {
    "augmentation_scores": lambda m, x, y: augmentation_scores(m, Split(x, y)),
    "augmentation_attack": lambda m, x, y: augmentation_attack(m, *_halves(x, y)),
    "pgd_boundary_distance": lambda m, x, y: pgd_boundary_distance(m, x, y, steps=2),
    "hopskipjump_boundary_distance": lambda m, x, y: hopskipjump_boundary_distance(m, x, y, max_queries=20),
    "random_direction_distance": lambda m, x, y: random_direction_distance(m, x, y, directions=2),
    "boundary_distance_attack": lambda m, x, y: boundary_distance_attack(
        m, *_halves(x, y), distance_fn=lambda model, xs, ys: torch.zeros(len(xs))),
}


@pytest.mark.parametrize("label", [7, -1])
@pytest.mark.parametrize("entry", LABEL_ONLY)
def test_label_only_attacks_refuse_labels_the_model_cannot_output(entry, label):
    # Prepare: every label out of a 3-class model's reach, so every example would look misclassified
    x = _inputs()
    y = torch.full((len(x),), label)
    # Execute / Assert: refused, where a distance of 0 for all once gave an AUC of 0.5 ("no leak")
    with pytest.raises(DataError, match=r"labels range over .* 3 outputs \(allowed: 0\.\.2\)"):
        LABEL_ONLY[entry](_model(), x, y)


def _fitting_recipe(train: Split, *, seed: int) -> nn.Module:
    """A few full-batch steps of SGD, in the model's float32 whatever the data's dtype."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.x), train.y).backward()
        optimizer.step()
    return model


def _shadow(model: nn.Module, members: Split, non_members: Split):
    pool = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(2)).to(members.x.dtype)
    return shadow_attack(model, members, non_members, shadow_pool=Split(pool, torch.arange(10) % 3),
                         recipe=_fitting_recipe, n_shadows=2)


ATTACKS = {
    "threshold": threshold_attack,
    "shadow": _shadow,
    "augmentation": functools.partial(augmentation_attack, noise_std=0.1, noise_copies=2),
    "boundary (pgd)": functools.partial(boundary_distance_attack,
                                        distance_fn=functools.partial(pgd_boundary_distance, steps=3)),
    "boundary (custom)": functools.partial(boundary_distance_attack,
                                           distance_fn=lambda m, x, y: m(x).max(1).values.detach()),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_float64_inputs_are_attacked_as_the_float32_model_reads_them(attack):
    # Prepare: float32 data and its float64 copy, as torch.from_numpy would hand it over
    x, y = _inputs(), torch.arange(12) % 3
    # Execute
    as_float32 = ATTACKS[attack](_model(), *_halves(x, y))
    as_float64 = ATTACKS[attack](_model(), *_halves(x.double(), y))
    # Assert: cast to the model's dtype, the same inputs and the same result
    assert as_float64.auc == as_float32.auc


class RecordingRecipe:
    """Trains nothing; records the size of each training split it is handed."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, train: Split, *, seed: int) -> nn.Module:
        self.sizes.append(len(train))
        return _model()


def test_pools_of_copies_of_one_input_are_refused():
    # Prepare: six rows, one distinct input: any halves of its distinct inputs leave one side empty
    copies = Split(_inputs(1).repeat(6, 1, 1, 1), torch.zeros(6, dtype=torch.long))
    members, non_members = _halves(_inputs(), torch.zeros(12, dtype=torch.long))
    recipe = RecordingRecipe()
    # Execute / Assert
    too_few = r"pool needs at least 2 distinct inputs .* got 1 \(in 6 rows\)"
    with pytest.raises(DataError, match="shadow " + too_few):
        shadow_attack(_model(), members, non_members, shadow_pool=copies, recipe=recipe, n_shadows=1)
    with pytest.raises(DataError, match="reference " + too_few):
        train_reference_models(copies, recipe, n_models=1)
    assert recipe.sizes == []  # no model was asked to train on nothing


def test_a_reference_model_that_would_draw_no_input_is_refused():
    # Prepare: two distinct inputs and two models; seed 0 puts both inputs in model 1's half
    pool = Split(_inputs(2), torch.tensor([0, 1]))
    recipe = RecordingRecipe()
    # Execute / Assert
    with pytest.raises(DataError, match=r"reference model\(s\) \[0\] drew none of the pool's 2 distinct"):
        train_reference_models(pool, recipe, n_models=2, seed=0)
    assert recipe.sizes == []
    assert train_reference_models(pool, recipe, n_models=2, seed=1).keep.tolist() == [[False, True],
                                                                                     [True, False]]


def test_lira_reference_models_train_on_a_float64_pool_as_on_its_float32_copy():
    # Prepare: the default recipe (fortify's Trainer) on a float32 model
    from fortify.config import TrainConfig
    from fortify.privacy.recipe import TrainerRecipe
    from fortify.threat import ThreatModel

    x, y = _inputs(), torch.arange(12) % 3
    recipe = TrainerRecipe(_model, TrainConfig(objective="standard", epochs=1, batch_size=4),
                           ThreatModel("linf", 0.1))
    # Execute
    from64 = train_reference_models(Split(x.double(), y), recipe, n_models=2)
    from32 = train_reference_models(Split(x, y), recipe, n_models=2)
    # Assert: the same weights (the cast is what the model reads anyway)
    for a, b in zip(from64.models, from32.models, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_noise_copies_are_the_same_draws_for_float32_and_float64_data():
    # one seed, one noise, whichever dtype the data arrive in (numpy hands over float64)
    from fortify.privacy.label_only import augmented_copies

    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    as_float32, as_float64 = (augmented_copies(data, max_shift=0, noise_std=0.3, noise_copies=2,
                                               generator=torch.Generator().manual_seed(0))
                              for data in (x, x.double()))
    for a, b in zip(as_float32, as_float64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6)


class _NaNForBrightInputs(nn.Module):
    """A linear model whose logits are NaN for inputs with a first value above 0.9."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return torch.where(x.flatten(1)[:, :1] > 0.9, torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("statistic", ["loss", "confidence", "modified-entropy"])
def test_a_nan_row_scores_as_the_least_likely_member(statistic):
    # Prepare: 40 inputs, some of them with NaN logits
    from fortify.privacy import membership_scores, threshold_attack

    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(40) % 3
    nan_rows = x.flatten(1)[:, 0] > 0.9
    assert 0 < int(nan_rows.sum()) < 40
    # Execute
    scores = membership_scores(_NaNForBrightInputs(), Split(x, y), statistic=statistic)
    result = threshold_attack(_NaNForBrightInputs(), Split(x[:20], y[:20]), Split(x[20:], y[20:]),
                              statistic=statistic, fprs=())
    # Assert: such a row predicts no class, so it is scored below every other; the audit runs
    assert bool((scores[nan_rows] == -math.inf).all()) and bool(torch.isfinite(scores[~nan_rows]).all())
    assert 0.0 <= result.auc <= 1.0


def test_a_nan_row_lies_on_the_boundary_for_the_label_only_distance():
    from fortify.privacy.label_only import hopskipjump_boundary_distance

    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x[:3, 0, 0, 0] = 0.95  # NaN logits: misclassified, at distance 0
    x[3:, 0, 0, 0] = 0.5
    model = _NaNForBrightInputs()
    with torch.no_grad():
        y = model(x).nan_to_num().argmax(dim=1)  # the others classified as labelled
    found = hopskipjump_boundary_distance(model, x, y, max_queries=200)
    assert torch.equal(found[:3], torch.zeros(3)) and bool((found[3:] > 0).all())


def test_only_a_nan_logit_row_is_scored_as_no_member():
    # a +inf logit on the true class is the most confident answer there is, never "no class"
    from fortify.privacy import membership_scores

    class Certain(nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 3)
            out[0, 0] = math.inf
            return out

    data = Split(torch.zeros(2, 4), torch.tensor([0, 1]))
    assert membership_scores(Certain(), data, statistic="confidence")[0] == math.inf
    # modified entropy has no finite value there: left NaN, for the metrics to refuse loudly
    assert math.isnan(membership_scores(Certain(), data, statistic="modified-entropy")[0])


# -- settings and inputs the attacks refuse --------------------------------------------------------

@pytest.mark.parametrize("call, fragment", [
    (lambda m, x, y: augmentation_attack(m, *_halves(x, y), noise_std=float("nan"), noise_copies=2),
     "noise_std a finite number >= 0"),
    (lambda m, x, y: augmentation_attack(m, *_halves(x, y), noise_std=0.1, noise_copies=2.5),
     "noise_copies must be whole numbers >= 0"),
    (lambda m, x, y: random_direction_distance(m, x, y, directions=2, max_distance=-0.5),
     "max_distance must be a finite number > 0"),
    (lambda m, x, y: random_direction_distance(m, x, y, directions=2, max_distance=float("nan")),
     "max_distance must be a finite number > 0"),
    (lambda m, x, y: pgd_boundary_distance(m, x, y, steps=2, bisection_steps=-3), "bisection_steps"),
    (lambda m, x, y: threshold_attack(m, *_halves(x, y), batch_size=0), "batch_size"),
    (lambda m, x, y: boundary_distance_attack(m, *_halves(x, y), batch_size=0), "batch_size"),
], ids=["noise-nan", "copies-fraction", "distance-negative", "distance-nan", "bisection-negative",
        "threshold-batch", "boundary-batch"])
def test_bad_attack_settings_are_config_errors(call, fragment):
    from fortify.errors import ConfigError

    x = _inputs()
    with pytest.raises(ConfigError, match=fragment):
        call(_model(), x, torch.arange(12) % 3)


def test_the_augmentation_attack_refuses_data_outside_its_box():
    # its copies are clipped to the box: pixels in [0, 255] would score their own clipping
    x = 255 * _inputs()
    with pytest.raises(DataError, match=r"outside the declared box \[0, 1\]"):
        augmentation_attack(_model(), *_halves(x, torch.arange(12) % 3), noise_std=0.1, noise_copies=2)


def test_augmented_copies_come_one_at_a_time_with_the_same_scores():
    # all copies at once took 22 times the data's memory; one at a time the scores are the same
    from fortify.privacy.label_only import augmented_copies

    x, y = _inputs(), torch.arange(12) % 3
    copies = augmented_copies(x, max_shift=1, noise_std=0.2, noise_copies=3,
                              generator=torch.Generator().manual_seed(0))
    assert not isinstance(copies, list)
    listed = list(copies)
    model = _model()
    with torch.no_grad():
        by_hand = torch.stack([model(c).argmax(1) == y for c in listed]).double().mean(0)
    assert len(listed) == 9 + 3
    assert torch.equal(augmentation_scores(model, Split(x, y), max_shift=1, noise_std=0.2, noise_copies=3),
                       by_hand)


def test_a_shadow_model_leaves_the_callers_random_state_as_it_was():
    x, y, target = _inputs(24), torch.arange(24) % 3, _model()  # _model() seeds the global stream
    members, non_members = _halves(x, y)
    pool = Split(_inputs(40) * 0.9, torch.arange(40) % 3)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    shadow_attack(target, members, non_members, shadow_pool=pool, n_shadows=1)
    assert torch.equal(torch.rand(3), expected)


def test_the_audit_refuses_data_outside_its_box_and_a_reversed_box():
    from fortify.errors import ConfigError
    from fortify.privacy import audit

    x, y = _inputs(), torch.arange(12) % 3
    with pytest.raises(DataError, match=r"outside the declared box \[0, 1\]"):
        audit(_model(), *_halves(255 * x, y), attacks=["loss"])
    with pytest.raises(ConfigError, match=r"bounds must be two finite numbers with low < high, got \(1, 0\)"):
        audit(_model(), *_halves(x, y), attacks=["loss"], bounds=(1, 0))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("statistic", ["loss", "confidence", "modified-entropy"])
def test_narrow_integer_labels_give_the_int64_membership_result(statistic, dtype):
    # they passed the label check, then failed in gather or one_hot
    x = _inputs(40)
    y = torch.arange(40) % 3
    wide = threshold_attack(_model(), *_halves(x, y), statistic=statistic, fprs=())
    narrow = threshold_attack(_model(), *_halves(x, y.to(dtype)), statistic=statistic, fprs=())
    assert narrow.to_dict() | {"seconds": 0} == wide.to_dict() | {"seconds": 0}


def _lira_scores(target: nn.Module, references: list[nn.Module], bright: list[int]) -> torch.Tensor:
    """Online LiRA scores of 40 candidates, the pool of the references; ``bright`` rows get a first
    value above 0.9, where ``_NaNForBrightInputs`` returns NaN logits."""
    from fortify.privacy import ReferenceModels, lira_member_scores
    from fortify.privacy.lira import half_assignment

    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x[:, 0, 0, 0] = 0.5
    x[bright, 0, 0, 0] = 0.95
    y = torch.arange(40) % 3
    refs = ReferenceModels(references, Split(x, y), half_assignment(len(references), 40,
                                                                    torch.Generator().manual_seed(0)))
    return lira_member_scores(target, Split(x, y), refs, online=True)


def test_a_nan_row_of_the_target_gets_the_least_member_like_lira_score():
    # LiRA let the NaN through to the metrics, which refused it without naming a model or example
    scores = _lira_scores(_NaNForBrightInputs(), [_model() for _ in range(4)], bright=[0, 1, 2])
    assert bool((scores[:3] == -math.inf).all()) and bool(torch.isfinite(scores[3:]).all())


def test_a_reference_model_with_nan_logits_is_named():
    with pytest.raises(DataError, match="reference model 2 returns NaN logits for candidate 5"):
        _lira_scores(_model(), [_model(), _model(), _NaNForBrightInputs(), _model()], bright=[5])


class _Memoriser(nn.Module):
    """Logit 3 higher for the inputs it was given than for others, on top of a per-input offset all
    such models share: a stand-in for an overfit model whose LiRA scores depend on the IN/OUT mask."""

    def __init__(self, seen: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("seen", seen.double().flatten(1))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.double().flatten(1)
        known = (torch.cdist(flat, self.seen).min(dim=1).values < 1e-6).double()
        offset = flat.sum(dim=1)
        return torch.stack([offset + 3 * known * self.scale, torch.zeros_like(offset)], dim=1).float()


def _memorised_pool(candidates_dtype: torch.dtype, relabel: int = 0):
    from fortify.privacy import ReferenceModels
    from fortify.privacy.lira import half_assignment

    x = torch.rand(40, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(40, dtype=torch.long)
    keep = half_assignment(8, 40, torch.Generator().manual_seed(0))
    refs = ReferenceModels([_Memoriser(x[keep[m]]) for m in range(8)], Split(x, y), keep)
    candidates_y = y.clone()
    candidates_y[:relabel] = 1
    return refs, Split(x.to(candidates_dtype), candidates_y)


def _memorised_lira(candidates_dtype: torch.dtype, relabel: int = 0, online: bool = True) -> torch.Tensor:
    from fortify.privacy import lira_member_scores

    refs, candidates = _memorised_pool(candidates_dtype, relabel)
    return lira_member_scores(_Memoriser(refs.pool.x[:20]), candidates, refs, online=online,
                              variance="per-example")


@pytest.mark.parametrize("online", [True, False])
def test_lira_finds_float32_candidates_in_a_float64_pool(online):
    # online they were "not in the reference pool"; offline every model, IN ones too, was fitted as OUT
    torch.testing.assert_close(_memorised_lira(torch.float32, online=online),
                               _memorised_lira(torch.float64, online=online), rtol=0, atol=1e-4)


def test_a_candidate_in_the_pool_under_another_label_is_no_out_example_for_the_models_that_saw_it():
    # offline: the models that trained on the input under its pool label stay out of its OUT fit
    from fortify.privacy.lira import _in_mask

    refs, candidates = _memorised_pool(torch.float64, relabel=5)
    assert torch.equal(_in_mask(refs, candidates, online=False), refs.keep)
    assert bool(torch.isfinite(_memorised_lira(torch.float64, relabel=5, online=False)).all())
    # online: no model trained on it as labelled, so there is no IN fit to make
    with pytest.raises(DataError, match="5 of the 40 .* under another label only"):
        _memorised_lira(torch.float64, relabel=5, online=True)


def test_bfloat16_inputs_are_compared_like_any_other_dtype():
    # numpy has no bfloat16: the row digests raised a TypeError before any attack ran
    x = _inputs(40).bfloat16()
    y = torch.arange(40) % 3
    result = threshold_attack(_model().bfloat16(), *_halves(x, y), fprs=())
    assert 0.0 <= result.auc <= 1.0
    with pytest.raises(DataError, match="among both members and non-members"):
        threshold_attack(_model().bfloat16(), Split(x[:20], y[:20]), Split(x[10:30], y[10:30]))


def _linear_images() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return _model(), _inputs(4), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(("call", "error", "message"), [
    # the largest eps is the distance of an example never fooled: 0 ranked it as misclassified
    (lambda m, x, y: pgd_boundary_distance(m, x, y, eps_grid=[0.0]), "ConfigError", "eps_grid"),
    (lambda m, x, y: pgd_boundary_distance(m, x, y, eps_grid=[-1.0]), "ConfigError", "eps_grid"),
    (lambda m, x, y: pgd_boundary_distance(m, x, y, eps_grid=[math.nan]), "ConfigError", "eps_grid"),
    # outside the box the rays measured the distance to their own clipping
    (lambda m, x, y: random_direction_distance(m, x * 5, y), "DataError", "outside the declared box"),
    (lambda m, x, y: _privacy("model_inversion")(m, Split(x * 5, y), steps=1), "DataError",
     "outside the declared box"),
    # NaN passed every check and shared a plain gradient; inf made the shared gradient inf
    (lambda m, x, y: _privacy("shared_gradient")(m, x, y, clip_norm=1.0, noise_multiplier=math.nan),
     "ConfigError", "noise_multiplier"),
    (lambda m, x, y: _privacy("shared_gradient")(m, x, y, clip_norm=math.inf, noise_multiplier=1.0),
     "ConfigError", "clip_norm"),
    (lambda m, x, y: _privacy("leakage_sweep")(m, x, y, batch_sizes=()), "ConfigError", "at least one batch"),
    (lambda m, x, y: _privacy("gradient_leakage")(m, x.masked_fill(x > 0.9, math.nan), y, steps=1),
     "DataError", "NaN"),
    (lambda m, x, y: threshold_attack(m, *_halves(x, y), fprs=0.05), "ConfigError", "fprs must be a list"),
])
def test_bad_privacy_input_is_refused_by_name(call, error, message):
    model, x, y = _linear_images()
    with pytest.raises(getattr(errors, error), match=message):
        call(model, x, y)


def _privacy(name: str):
    import fortify.privacy

    return getattr(fortify.privacy, name)


def test_a_reconstruction_that_diverged_to_nan_is_the_worst_match_not_an_error():
    from fortify.privacy.reconstruction import GradientReconstruction, reconstruction_quality

    _, x, y = _linear_images()
    images = x.clone()
    images[1] = math.nan
    report = reconstruction_quality(GradientReconstruction(images, y, "dlg", math.nan, {}), x, y)
    assert math.isnan(report.psnr[1]) and all(math.isinf(v) for i, v in enumerate(report.psnr) if i != 1)


def test_canaries_of_labels_past_the_classes_are_refused():
    from fortify.privacy.canaries import audit_canaries, insert_canaries

    x, y = _inputs(40), torch.arange(40) % 3
    with pytest.raises(errors.DataError, match="label"):
        insert_canaries(Split(x, y + 5), 4, 3, seed=0)
    _, canaries = insert_canaries(Split(x, y), 4, 5, seed=0)  # of a 5-class task, audited on 3 classes
    with pytest.raises(errors.DataError, match="label"):
        audit_canaries(_model(), canaries, delta=1e-5)
