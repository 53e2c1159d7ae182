"""LiRA with augmented queries: the views, the per-query statistics, the end-to-end gain, bad input.

Carlini et al. 2022 query every model on several views of an example (its mirror and small shifts)
and score the example by the sum of the per-view log-likelihood ratios (one Gaussian per view: a
diagonal covariance). With the example alone the scores are LiRA's single-query scores, unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from overfit import overfit_recipe, shuffled_digits
from scipy import stats
from torch import nn

from fortify.config import AugmentConfig
from fortify.data import Dataset, Split
from fortify.errors import ConfigError
from fortify.privacy import audit, membership_result, membership_scores
from fortify.privacy.lira import (
    SINGLE_QUERY,
    LiraQueries,
    ReferenceModels,
    half_assignment,
    lira_attack,
    lira_member_scores,
    lira_scores,
    mirror_image,
    shift_image,
    train_reference_models,
)

# -- the views --------------------------------------------------------------------------------------


def test_a_mirrored_image_is_the_image_flipped_along_its_width():
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    mirrored = mirror_image(x)
    assert torch.equal(mirrored, torch.flip(x, dims=[-1]))
    assert torch.equal(mirrored[..., 0], x[..., 4]) and torch.equal(mirrored[..., 4], x[..., 0])


def _reflected(index: np.ndarray, size: int) -> np.ndarray:
    """Where reflect padding reads a source index outside [0, size): mirrored at the border pixel."""
    index = np.abs(index)
    return np.where(index >= size, 2 * (size - 1) - index, index)


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (0, -2), (2, 1), (-1, -1), (0, 0)])
@pytest.mark.parametrize("padding", ["reflect", "constant"])
def test_a_shift_moves_every_pixel_by_the_stated_amount(dy, dx, padding):
    # Prepare: pixels that all differ, so a pixel's value says where it came from
    h, w = 5, 6
    x = torch.arange(2 * h * w, dtype=torch.float64).reshape(1, 2, h, w)
    # Execute
    shifted = shift_image(x, dy, dx, padding=padding, fill=-1.0 if padding == "constant" else 0.0)
    # Assert: out[i, j] = x[i - dy, j - dx] where that pixel exists; elsewhere the padding
    rows, cols = np.meshgrid(np.arange(h) - dy, np.arange(w) - dx, indexing="ij")
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    assert shifted.shape == x.shape
    assert torch.equal(shifted[..., torch.from_numpy(inside)], x[..., rows[inside], cols[inside]])
    if padding == "constant":
        assert bool((shifted[..., torch.from_numpy(~inside)] == -1.0).all())
    else:
        assert torch.equal(shifted, x[..., _reflected(rows, h), _reflected(cols, w)])


def test_queries_are_every_shift_of_the_image_and_of_its_mirror():
    # Prepare: a random image, so that no two views coincide by accident
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    queries = LiraQueries(mirror=True, max_shift=1)
    # Execute
    views = list(queries.views(x))
    # Assert: 2 bases x 9 shifts, all distinct, the image and its mirror among them once each
    assert queries.count == len(views) == 18
    distinct = {tuple(v.flatten().tolist()) for v in views}
    assert len(distinct) == 18
    assert sum(torch.equal(v, x) for v in views) == 1
    assert sum(torch.equal(v, x.flip(-1)) for v in views) == 1
    assert [v.shape for v in views] == [x.shape] * 18
    assert list(SINGLE_QUERY.views(x))[0] is x and SINGLE_QUERY.count == 1


def test_queries_like_training_are_the_views_its_flips_and_crops_show():
    queries = LiraQueries.like_training(AugmentConfig(crop_padding=2, flip=True, cutout_size=3), fill=0.0)
    assert (queries.mirror, queries.max_shift, queries.padding, queries.count) == (True, 2, "constant", 50)
    assert LiraQueries.like_training(AugmentConfig()).count == 1  # no augmentation: the example alone


# -- the statistics ---------------------------------------------------------------------------------

N_MODELS, N_EXAMPLES, QUERY_SPREADS = 8, 40, (0.5, 1.0, 3.0)


def _fabricated_phi():
    """Reference phi ``(models, examples, queries)`` whose IN models sit 2 higher, each query with
    its own spread, and a target phi per example and query."""
    generator = torch.Generator().manual_seed(3)
    keep = half_assignment(N_MODELS, N_EXAMPLES, generator)
    spreads = torch.tensor(QUERY_SPREADS, dtype=torch.float64)
    difficulty = 4 * torch.randn(1, N_EXAMPLES, 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(N_MODELS, N_EXAMPLES, len(QUERY_SPREADS), generator=generator, dtype=torch.float64)
    reference = difficulty + spreads * noise + 2.0 * keep[..., None]
    target = difficulty[0] + spreads * torch.randn(N_EXAMPLES, len(QUERY_SPREADS), generator=generator,
                                                   dtype=torch.float64) + 1.0
    return target, reference, keep


def _side_fit(values: np.ndarray, mask: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of one query's reference values on one side (scipy's conventions)."""
    means = np.array([values[mask[:, e], e].mean() for e in range(values.shape[1])])
    if not global_variance:
        return means, np.array([values[mask[:, e], e].std(ddof=1) for e in range(values.shape[1])])
    squares = sum(((values[mask[:, e], e] - means[e]) ** 2).sum() for e in range(values.shape[1]))
    dof = sum(int(mask[:, e].sum()) - 1 for e in range(values.shape[1]))
    return means, np.full(values.shape[1], np.sqrt(squares / dof))


def _closed_form(target, reference, keep, *, online: bool, global_variance: bool) -> np.ndarray:
    """Sum over queries of each query's own LiRA score, by scipy.stats.norm."""
    target, reference, keep = target.numpy(), reference.numpy(), keep.numpy()
    total = np.zeros(target.shape[0])
    for q in range(target.shape[1]):
        mu_out, sd_out = _side_fit(reference[..., q], ~keep, global_variance)
        if not online:
            total += stats.norm.logcdf(target[:, q], mu_out, sd_out)
            continue
        mu_in, sd_in = _side_fit(reference[..., q], keep, global_variance)
        log_in = stats.norm.logpdf(target[:, q], mu_in, sd_in)
        total += log_in - stats.norm.logpdf(target[:, q], mu_out, sd_out)
    return total if online else -np.log(-total)  # offline ranks by -log(-sum of log P)


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("global_variance", [False, True])
def test_each_query_gets_its_own_gaussians_and_the_ratios_add_up(online, global_variance):
    # Prepare
    target, reference, keep = _fabricated_phi()
    # Execute
    scores = lira_scores(target, reference, keep, online=online, global_variance=global_variance)
    # Assert: the sum of per-query log-likelihood ratios (or of log tail probabilities offline) with each
    # query's own means and (per-example or per-query global) stds
    expected = _closed_form(target, reference, keep, online=online, global_variance=global_variance)
    assert scores.shape == (N_EXAMPLES,)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_one_query_with_a_query_axis_scores_as_lira_without_one():
    target, reference, keep = _fabricated_phi()
    for online in (True, False):
        for global_variance in (True, False):
            plain = lira_scores(target[:, 1], reference[..., 1], keep, online=online,
                                global_variance=global_variance)
            with_axis = lira_scores(target[:, 1:2], reference[..., 1:2], keep, online=online,
                                    global_variance=global_variance)
            assert torch.equal(plain, with_axis)


# -- models queried on their views ------------------------------------------------------------------

def _quick_recipe(train: Split, *, seed: int) -> nn.Module:
    """A small MLP fitted by 40 full-batch Adam steps: distinct models in well under a second."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.x), train.y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def quick_models(digits: Dataset) -> tuple[nn.Module, Split, ReferenceModels]:
    pool = digits.train.head(60)
    target = _quick_recipe(digits.train.head(30), seed=99)
    return target, pool, train_reference_models(pool, _quick_recipe, n_models=6, seed=5)


def _confidence_phi(models: list[nn.Module], data: Split) -> torch.Tensor:
    return torch.stack([membership_scores(m, data, statistic="confidence") for m in models])


@pytest.mark.parametrize("online", [True, False])
def test_the_default_query_scores_the_example_alone_as_lira_always_did(quick_models, online):
    # Prepare: phi of every model on the plain examples, the statistic LiRA has always fitted
    target, pool, references = quick_models
    phi = _confidence_phi([target, *references.models], pool)
    # Execute
    default = lira_member_scores(target, pool, references, online=online)
    single = lira_member_scores(target, pool, references, online=online, queries=LiraQueries())
    # Assert: bit for bit the single-query scores
    expected = lira_scores(phi[0], phi[1:], references.keep, online=online, global_variance=True)
    assert torch.equal(default, expected) and torch.equal(single, expected)


def test_target_and_reference_models_are_queried_on_the_same_views(quick_models):
    # Prepare: phi of every model on each example and on its mirror, by hand
    target, pool, references = quick_models
    models = [target, *references.models]
    mirrored = Split(pool.x.flip(-1), pool.y)
    phi = torch.stack([_confidence_phi(models, pool), _confidence_phi(models, mirrored)], dim=-1)
    # Execute
    scores = lira_member_scores(target, pool, references, queries=LiraQueries(mirror=True))
    # Assert
    expected = lira_scores(phi[0], phi[1:], references.keep, online=True, global_variance=True)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)


def test_lira_and_the_audit_report_their_queries_in_the_settings(quick_models):
    target, pool, references = quick_models
    members, non_members = Split(pool.x[:30], pool.y[:30]), Split(pool.x[30:], pool.y[30:])
    queries = LiraQueries(mirror=True, max_shift=1, padding="constant")
    result = lira_attack(target, members, non_members, references, queries=queries)
    assert result.settings["queries"] == {"mirror": True, "max_shift": 1, "padding": "constant",
                                          "fill": 0.0, "n_queries": 18}
    report = audit(target, members, non_members, attacks=("lira-offline",), recipe=_quick_recipe,
                   n_reference_models=4, lira_queries=LiraQueries(mirror=True))
    assert report.result("lira-offline").settings["queries"]["n_queries"] == 2


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"padding": "wrap"}, r"unknown LiRA query padding 'wrap'; valid: reflect, constant"),
    ({"max_shift": -1}, r"max_shift must be an integer >= 0, got -1"),
    ({"max_shift": True}, r"max_shift must be an integer >= 0, got True"),
    ({"max_shift": 1.5}, r"max_shift must be an integer >= 0, got 1.5"),
    ({"mirror": "yes"}, r"mirror must be True or False, got 'yes'"),
    ({"padding": "constant", "fill": float("nan")}, r"fill must be a finite number, got nan"),
    ({"fill": 0.5}, r"fill=0.5 applies only to padding='constant'"),
])
def test_bad_query_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        LiraQueries(**settings)


def test_mirror_and_shift_queries_on_tabular_data_are_refused_before_anything_trains():
    # Prepare: tabular data and a recipe that records whether it was asked to train
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 5, generator=generator), torch.arange(40) % 3
    members, non_members = Split(x[:20], y[:20]), Split(x[20:], y[20:])
    trained: list[int] = []

    def recording_recipe(train: Split, *, seed: int) -> nn.Module:
        trained.append(seed)
        return nn.Linear(5, 3)

    references = train_reference_models(Split(x, y), recording_recipe, n_models=4)
    trained.clear()
    # Execute / Assert
    for queries in (LiraQueries(mirror=True), LiraQueries(max_shift=1)):
        with pytest.raises(ConfigError, match=r"image batches \(N, C, H, W\), got inputs of shape \(40, 5\)"):
            lira_member_scores(nn.Linear(5, 3), Split(x, y), references, queries=queries)
        with pytest.raises(ConfigError, match=r"need image batches"):
            audit(nn.Linear(5, 3), members, non_members, attacks=("lira-online",), recipe=recording_recipe,
                  n_reference_models=4, lira_queries=queries)
    assert trained == []


def test_shifts_as_large_as_the_image_and_foreign_query_objects_are_refused(quick_models):
    target, pool, references = quick_models
    with pytest.raises(ConfigError, match=r"max_shift=8 must be smaller than the images' height and width"):
        lira_member_scores(target, pool, references, queries=LiraQueries(max_shift=8))
    with pytest.raises(ConfigError, match=r"LiRA queries must be a LiraQueries, got str"):
        lira_member_scores(target, pool, references, queries="mirror")  # type: ignore[arg-type]


# -- end to end -------------------------------------------------------------------------------------

ZOO_SIZE = 9
AUGMENT = AugmentConfig(crop_padding=1, flip=True)


@pytest.fixture(scope="module")
def augmented_zoo(digits: Dataset) -> tuple[Split, ReferenceModels]:
    """9 MLPs trained, each on a random half of 200 digits, with flips and 1-pixel crops: overfit
    (full-batch Adam, 150 epochs) so that membership leaks, in each example's views as in itself."""
    x, y = shuffled_digits(digits)  # one thread: the privacy tests' autouse fixture
    pool = Split(x[:200], y[:200])
    recipe = overfit_recipe(val=Split(x[200:232], y[200:232]), augment=AUGMENT)
    return pool, train_reference_models(pool, recipe, n_models=ZOO_SIZE, seed=7)


def _pooled_result(pool: Split, zoo: ReferenceModels, queries: LiraQueries):
    """Online LiRA with every zoo model as the target in turn, the others its references, pooled."""
    inside, outside = [], []
    for index in range(ZOO_SIZE):
        rest = torch.arange(ZOO_SIZE) != index
        others = [m for i, m in enumerate(zoo.models) if i != index]
        references = ReferenceModels(others, pool, zoo.keep[rest])
        scores = lira_member_scores(zoo.models[index], pool, references, queries=queries)
        inside.append(scores[zoo.keep[index]])
        outside.append(scores[~zoo.keep[index]])
    return membership_result("lira-online", torch.cat(inside), torch.cat(outside), fprs=(0.01,))


@pytest.mark.slow  # trains 9 models with augmentation (about 6 s on 2 cores)
def test_querying_the_views_a_model_trained_on_finds_more_members(augmented_zoo):
    # Prepare
    pool, zoo = augmented_zoo
    queries = LiraQueries.like_training(AUGMENT)  # the image and its mirror, each shifted by up to 1
    # Execute
    single = _pooled_result(pool, zoo, SINGLE_QUERY)
    augmented = _pooled_result(pool, zoo, queries)
    # Assert: 800 members, 1000 non-members (the AUC's standard error is about 0.013). Across pool
    # draws (seeds 0 to 3) the 18 queries lifted the AUC by 0.07 to 0.11 and TPR at 1% FPR 2.1 to 2.6-fold
    assert queries.count == 18
    assert (single.n_members, single.n_nonmembers) == (800, 1000)
    assert augmented.auc > single.auc + 0.04
    assert augmented.tpr_at_fpr["0.01"] > 1.5 * single.tpr_at_fpr["0.01"]
