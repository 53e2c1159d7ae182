"""Batch augmentations: box and shape kept, identities, the exact crop/paste geometry, seeding, and
the mixing distribution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fortify.errors import ConfigError, DataError
from fortify.training.augment import (
    Augment,
    MixedBatch,
    cutmix,
    cutout,
    mixup,
    random_crop,
    random_flip,
    sample_beta,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 16, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(99))


def _constant_images(n: int = 8, h: int = 8, w: int = 8) -> torch.Tensor:
    """Image i is filled with (i + 1) / (n + 1): every pixel says which image it came from."""
    levels = (torch.arange(n, dtype=torch.float32) + 1) / (n + 1)
    return levels[:, None, None, None].expand(n, 1, h, w).clone()


AUGMENTATIONS = {
    "crop": lambda x, g: random_crop(x, 2, generator=g),
    "flip": lambda x, g: random_flip(x, generator=g),
    "cutout": lambda x, g: cutout(x, 3, generator=g),
    "mixup": lambda x, g: mixup(x, torch.arange(x.shape[0]), alpha=0.4, generator=g).x,
    "cutmix": lambda x, g: cutmix(x, torch.arange(x.shape[0]), generator=g).x,
    "pipeline": lambda x, g: Augment(crop_padding=2, flip=True, cutout_size=3)(x, generator=g),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_keep_shape_dtype_and_the_box(name):
    x = _images()
    out = AUGMENTATIONS[name](x, _gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_the_same_seed_gives_the_same_result_and_another_seed_another(name):
    x = _images()
    augment = AUGMENTATIONS[name]
    assert torch.equal(augment(x, _gen(1)), augment(x, _gen(1)))
    assert not torch.equal(augment(x, _gen(1)), augment(x, _gen(2)))


def test_crop_with_padding_zero_is_the_identity():
    x = _images()
    assert torch.equal(random_crop(x, 0, generator=_gen()), x)


def test_each_crop_is_a_window_of_the_zero_padded_image():
    # Prepare
    x, padding = _images(n=6, h=5, w=7), 2
    padded = F.pad(x, (padding,) * 4)
    # Execute
    out = random_crop(x, padding, generator=_gen(4))
    # Assert: exactly one offset explains each example; offsets cover more than one value
    offsets = []
    for i in range(x.shape[0]):
        matches = [(top, left) for top in range(2 * padding + 1) for left in range(2 * padding + 1)
                   if torch.equal(out[i], padded[i, :, top:top + 5, left:left + 7])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1


def test_flip_twice_with_the_same_draws_is_the_identity():
    x = _images()
    once = random_flip(x, generator=_gen(3))
    twice = random_flip(once, generator=_gen(3))
    assert not torch.equal(once, x)
    assert torch.equal(twice, x)


def test_flip_probability_one_mirrors_every_image_and_zero_none():
    x = _images()
    assert torch.equal(random_flip(x, generator=_gen(), p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, generator=_gen(), p=0.0), x)


def test_cutout_fills_one_clipped_square_per_image():
    # Prepare: all-ones images so that the filled pixels are the zeros
    x, size = torch.ones(32, 2, 8, 8), 4
    # Execute
    out = cutout(x, size, generator=_gen(5))
    # Assert: every channel filled alike, in one axis-aligned box of side <= size
    assert torch.equal(out[:, 0], out[:, 1])
    for image in out[:, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        assert rows.numel() > 0
        height = int(rows.max() - rows.min() + 1)
        width = int(cols.max() - cols.min() + 1)
        assert height <= size and width <= size and rows.numel() == height * width
    assert (out == 0).sum(dim=(1, 2, 3)).eq(2 * size * size).any()  # some square lies fully inside


def test_mixup_is_the_convex_combination_its_labels_describe():
    # Prepare
    x = _constant_images()
    y = torch.arange(8)
    # Execute
    batch = mixup(x, y, alpha=1.0, generator=_gen(6))
    # Assert: pixel value = lam * level(y_a) + (1 - lam) * level(y_b)
    levels = (y.float() + 1) / 9
    expected = batch.lam * levels[batch.y_a] + (1 - batch.lam) * levels[batch.y_b]
    assert torch.allclose(batch.x[:, 0, 0, 0], expected)
    assert sorted(batch.y_b.tolist()) == y.tolist()
    assert 0.0 < batch.lam < 1.0


def test_cutmix_lam_is_the_share_of_pixels_kept_from_the_own_image():
    x = _constant_images(h=16, w=16)
    y = torch.arange(8)
    for seed in range(5):
        batch = cutmix(x, y, alpha=1.0, generator=_gen(seed))
        own = (batch.x == x).float().mean(dim=(1, 2, 3))
        moved = batch.y_b != y  # an image paired with itself keeps every pixel
        assert torch.allclose(own[moved], torch.full_like(own[moved], batch.lam))


def test_mixed_batch_loss_is_the_cross_entropy_against_its_soft_labels():
    logits = torch.randn(8, 5, generator=_gen(7))
    batch = MixedBatch(torch.rand(8, 4), torch.randint(0, 5, (8,), generator=_gen(8)),
                       torch.randint(0, 5, (8,), generator=_gen(9)), 0.3)
    soft = batch.soft_labels(5)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert torch.allclose(batch.loss(logits), F.cross_entropy(logits, soft))
    assert torch.equal(batch.dominant, batch.y_b)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 3.0])
def test_sample_beta_follows_the_beta_distribution(alpha):
    stats = pytest.importorskip("scipy.stats")
    gen = _gen(11)
    draws = [sample_beta(alpha, generator=gen) for _ in range(1500)]
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_sample_beta_takes_an_alpha_so_small_that_both_gamma_draws_underflow():
    # Beta(0.002, 0.002) puts almost all its mass at 0 and 1; U ** (1 / alpha) underflowed to 0.0 for
    # both gamma variates in about one draw in 20, and their ratio was 0 / 0 (ZeroDivisionError)
    gen = _gen(3)
    draws = torch.tensor([sample_beta(0.002, generator=gen) for _ in range(2000)], dtype=torch.float64)
    assert bool(((draws >= 0) & (draws <= 1)).all())
    assert 0.45 < float((draws < 0.5).double().mean()) < 0.55  # symmetric about 1/2
    assert float(((draws < 1e-6) | (draws > 1 - 1e-6)).double().mean()) > 0.95


def test_bad_settings_name_the_value_and_what_is_allowed():
    x = _images()
    with pytest.raises(ConfigError, match="crop padding must be an integer >= 0, got -1"):
        random_crop(x, -1, generator=_gen())
    with pytest.raises(ConfigError, match=r"flip probability must be in \[0, 1\], got 2"):
        random_flip(x, generator=_gen(), p=2)
    with pytest.raises(ConfigError, match="mixing alpha must be a finite number > 0, got 0"):
        mixup(x, torch.arange(16), alpha=0, generator=_gen())
    with pytest.raises(DataError, match=r"expected an image batch of shape \(N, C, H, W\), got \(16, 3\)"):
        cutout(torch.rand(16, 3), 2, generator=_gen())
    with pytest.raises(ConfigError, match="explicit torch.Generator"):
        random_flip(x, generator=None)
