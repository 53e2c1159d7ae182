"""Masking defences: what each transform computes, parity with a real JPEG codec, and why gradients vanish."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.defences import (
    DEFENCES,
    DefensiveDistillation,
    GaussianNoise,
    InputQuantization,
    JPEGCompression,
    RandomResizePad,
    distillation_loss,
)
from fortify.defences.jpeg import _CHROMA_TABLE, _LUMA_TABLE, quality_table
from fortify.errors import ConfigError, DataError, UnknownNameError


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    point = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(point), y, reduction="sum"), point)
    return grad


def test_quantization_rounds_to_the_nearest_of_two_to_the_bits_levels():
    # Prepare
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    defence = InputQuantization(nn.Identity(), bits=2)
    # Execute
    out = defence(x)
    # Assert
    levels = torch.tensor([0, 1 / 3, 2 / 3, 1])
    nearest = levels[(x.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert torch.allclose(out, nearest)
    assert torch.equal(defence(out), out), "quantising twice changes nothing"


@pytest.mark.parametrize(("dtype", "bits"), [(torch.float16, 16), (torch.bfloat16, 8)])
def test_quantization_of_half_precision_inputs_rounds_to_the_float32_levels(dtype, bits):
    # Prepare: half-precision inputs (float16 overflows at x * 65535; bfloat16 rounds x * 255 to
    # another level for about one value in ten)
    values = torch.rand(200, generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.tensor([0.0, 0.9999, 1.0]), values]).to(dtype)
    defence = InputQuantization(nn.Identity(), bits=bits)
    # Execute
    out = defence(x)
    # Assert: the float32 levels, in the input's dtype
    assert out.dtype == dtype
    assert torch.equal(out, defence(x.float()).to(dtype))


def test_quantization_respects_other_bounds_and_rejects_bad_bits():
    x = -1 + 2 * torch.rand(16, 3)
    out = InputQuantization(nn.Identity(), bits=1, bounds=(-1.0, 1.0))(x)
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out, torch.where(x >= 0, 1.0, -1.0))
    for bits in (0, 17, 2.5):
        with pytest.raises(ConfigError, match="bits"):
            InputQuantization(nn.Identity(), bits=bits)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's codecs are deprecated
@pytest.mark.parametrize("quality", [9, 25, 30, 75])  # 9 and 30: libjpeg's integer scaling matters
def test_jpeg_matches_libjpeg_on_grayscale_images(quality):
    # Prepare: 8-bit images, one 8x8 block and one padded 20x13 image
    torchvision_io = pytest.importorskip("torchvision.io")
    gen = torch.Generator().manual_seed(quality)
    defence = JPEGCompression(nn.Identity(), quality=quality)
    for shape in ((40, 1, 8, 8), (6, 1, 20, 13)):
        x = torch.round(torch.rand(shape, generator=gen) * 255) / 255
        # Execute
        ours = defence(x) * 255
        theirs = torch.stack([
            torchvision_io.decode_jpeg(torchvision_io.encode_jpeg((img * 255).round().to(torch.uint8),
                                                                 quality=quality)).float()
            for img in x])
        # Assert: within about one grey level of libjpeg, far closer than either is to the input
        gap = (ours - theirs).abs().mean()
        assert gap <= 1.0
        assert (x * 255 - theirs).abs().mean() > 5 * gap


@pytest.mark.parametrize("quality", [25, 50, 75])
def test_jpeg_matches_libjpeg_on_colour_images(quality):
    # Prepare: 8-bit colour images, one 8x8 block and one padded 20x13 image; libjpeg (through
    # Pillow) without chroma subsampling, as fortify's codec runs
    image_module = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(quality)
    defence = JPEGCompression(nn.Identity(), quality=quality)

    def libjpeg(img):
        buffer = io.BytesIO()
        pixels = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image_module.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
        decoded = image_module.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return torch.from_numpy(np.asarray(decoded).copy()).float()

    gaps, changes = [], []
    for shape in ((12, 3, 8, 8), (4, 3, 20, 13)):
        x = torch.round(torch.rand(shape, generator=gen) * 255) / 255
        # Execute
        ours = defence(x) * 255
        theirs = torch.stack([libjpeg(img) for img in x]).permute(0, 3, 1, 2)
        gaps.append((ours - theirs).abs().flatten())
        changes.append((x * 255 - theirs).abs().flatten())
    # Assert: within about one level of libjpeg on average, far closer than either is to the input
    # (measured 1.20, 0.62 and 1.02 levels at qualities 25, 50 and 75; 2.83, 1.95 and 2.89 before
    # the YCbCr planes were rounded to 8-bit samples as libjpeg's are). libjpeg's integer DCT can round a
    # coefficient across a quantisation step, which moves a whole block: single channels of one
    # size reach 2 levels.
    gap = torch.cat(gaps).mean()
    assert gap <= 1.5, gap
    assert torch.cat(changes).mean() > 10 * gap


def test_jpeg_quantisation_tables_are_libjpegs_at_every_quality():
    # Prepare: libjpeg (through Pillow) writes its scaled tables into every file it encodes
    image_module = pytest.importorskip("PIL.Image")
    base = torch.tensor([_LUMA_TABLE, _CHROMA_TABLE], dtype=torch.float32)
    wrong = []
    for quality in range(1, 101):
        buffer = io.BytesIO()
        image_module.new("RGB", (8, 8)).save(buffer, format="JPEG", quality=quality)
        written = image_module.open(io.BytesIO(buffer.getvalue())).quantization
        theirs = torch.tensor([list(written[0]), list(written[1])], dtype=torch.float32).reshape(2, 8, 8)
        # Execute / Assert: the same table entry for entry (they differ at 34 qualities below 50
        # when 5000 / quality is not truncated as libjpeg truncates it)
        if not torch.equal(quality_table(base, quality), theirs):
            wrong.append(quality)
    assert wrong == []


@pytest.mark.parametrize("precision", ["autocast-bf16", "autocast-fp16", "bf16-input", "fp16-input"])
def test_jpeg_decodes_in_float32_whatever_the_precision_around_it(precision):
    # Prepare: colour images; in bf16 the block transforms alone move pixels by tens of levels
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    defence = JPEGCompression(nn.Identity(), quality=75)
    half = torch.bfloat16 if "bf16" in precision else torch.float16
    # Execute
    if precision.startswith("autocast"):
        reference = defence(x)
        with torch.autocast("cpu", dtype=half):
            out = defence(x)
    else:  # the same rounded input, decoded in float32 for reference
        reference = defence(x.to(half).float()).to(half)
        out = defence(x.to(half))
    # Assert: the same decoded image, in the input's dtype
    assert out.dtype == (x.dtype if precision.startswith("autocast") else half)
    assert torch.equal(out, reference)


def test_jpeg_keeps_shape_box_and_colour_and_rejects_bad_settings():
    x = torch.rand(3, 3, 16, 16)
    out = JPEGCompression(nn.Identity(), quality=90)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() < 0.05  # high quality keeps the image
    assert torch.equal(torch.round(out * 255), out * 255)  # decoded to 8-bit levels
    with pytest.raises(ConfigError, match="quality"):
        JPEGCompression(nn.Identity(), quality=0)
    with pytest.raises(DataError, match="images"):
        JPEGCompression(nn.Identity())(torch.rand(4, 64))


@pytest.mark.parametrize("make", [lambda m: InputQuantization(m, bits=3),
                                  lambda m: JPEGCompression(m, quality=50)], ids=["quantize", "jpeg"])
def test_rounding_defences_have_exactly_zero_input_gradients(make, standard_model, digits):
    x, y = digits.test.x[:64], digits.test.y[:64]
    grad = _input_gradient(make(standard_model), x, y)
    assert torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(_input_gradient(standard_model, x, y)) > 0


def test_random_resize_pad_keeps_shape_and_box_and_is_seeded():
    x = torch.rand(32, 3, 12, 12)
    first = RandomResizePad(nn.Identity(), min_scale=0.7, seed=3)
    again = RandomResizePad(nn.Identity(), min_scale=0.7, seed=3)
    a, b = first(x), first(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, b), "two calls must draw two transforms"
    assert torch.equal(a, again(x)), "the same seed must give the same transforms"
    # a shrunk image leaves a border of the box's lower bound somewhere on each side pair
    border = (a[:, :, 0, :] == 0).all(dim=(1, 2)) | (a[:, :, -1, :] == 0).all(dim=(1, 2))
    assert border.float().mean() > 0.5


def test_random_resize_pad_at_scale_one_is_the_identity_and_pads_with_the_lower_bound():
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(RandomResizePad(nn.Identity(), min_scale=1.0, seed=0)(x), x, atol=1e-6)
    pad = RandomResizePad(nn.Identity(), min_scale=0.5, bounds=(-1.0, 1.0), seed=0)
    shifted = pad(torch.ones(4, 1, 8, 8))
    assert shifted.min() >= -1 - 1e-6 and (shifted == -1).any()


@pytest.mark.parametrize("make", [lambda m: RandomResizePad(m), lambda m: GaussianNoise(m),
                                  lambda m: JPEGCompression(m)], ids=["resize-pad", "noise", "jpeg"])
def test_an_empty_batch_passes_every_randomised_defence(make):
    # affine_grid refused a batch of no images with a ValueError of its own
    assert make(nn.Flatten())(torch.zeros(0, 3, 8, 8)).shape == (0, 192)


def test_gaussian_noise_has_the_stated_spread_and_is_seeded():
    x = torch.full((200, 1, 8, 8), 0.5)
    defence = GaussianNoise(nn.Identity(), sigma=0.3, seed=1)
    noise = defence(x) - x
    assert abs(float(noise.mean())) < 0.01
    assert abs(float(noise.std()) - 0.3) < 0.01
    assert torch.equal(GaussianNoise(nn.Identity(), sigma=0.3, seed=1)(x), x + noise)
    assert not torch.equal(defence(x) - x, noise), "two calls must draw two noises"
    with pytest.raises(ConfigError, match="sigma"):
        GaussianNoise(nn.Identity(), sigma=0.0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: JPEGCompression(nn.Identity(), quality=float("nan")), "quality must be an integer in 1..100"),
    (lambda: JPEGCompression(nn.Identity(), quality=True), "quality must be an integer in 1..100"),
    (lambda: JPEGCompression(nn.Identity(), quality="75"), "quality must be an integer in 1..100"),
    (lambda: InputQuantization(nn.Identity(), bits=None), "bits must be an integer in 1..16"),
    (lambda: InputQuantization(nn.Identity(), bits=float("inf")), "bits must be an integer in 1..16"),
    (lambda: RandomResizePad(nn.Identity(), min_scale=True),
     r"min_scale must be a finite number in \(0, 1\]"),
    (lambda: RandomResizePad(nn.Identity(), min_scale=float("nan")), r"min_scale .* in \(0, 1\]"),
    (lambda: GaussianNoise(nn.Identity(), sigma=True), "sigma must be a finite number > 0"),
    (lambda: GaussianNoise(nn.Identity(), sigma=None), "sigma must be a finite number > 0"),
    (lambda: InputQuantization(nn.Identity(), bounds=(0, 1, 2)), r"bounds must be two finite numbers"),
    (lambda: JPEGCompression(nn.Identity(), bounds=None), r"bounds must be two finite numbers"),
    (lambda: GaussianNoise(nn.Identity(), bounds=(0, float("inf"))), r"bounds must be two finite numbers"),
    (lambda: RandomResizePad(nn.Identity(), bounds=(1, 0)), r"with low < high, got \(1, 0\)"),
    (lambda: DefensiveDistillation(nn.Identity(), temperature=True),
     "temperature must be a finite number > 0"),
    (lambda: GaussianNoise(nn.Identity(), seed="abc"), "seed must be an integer in 0.."),
    (lambda: RandomResizePad(nn.Identity(), seed=1.5), "seed must be an integer in 0.."),
    (lambda: GaussianNoise(nn.Identity(), seed=True), "seed must be an integer in 0.."),
    (lambda: GaussianNoise(nn.Identity(), seed=None), "seed must be an integer in 0.."),
], ids=["jpeg-nan", "jpeg-bool", "jpeg-str", "bits-none", "bits-inf", "scale-bool", "scale-nan",
        "sigma-bool", "sigma-none", "bounds-three", "bounds-none", "bounds-inf", "bounds-reversed",
        "temperature-bool", "seed-text", "seed-fraction", "seed-bool", "seed-none"])
def test_bad_defence_settings_are_config_errors_naming_the_valid_range(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_whole_valued_settings_are_accepted_as_numbers():
    assert JPEGCompression(nn.Identity(), quality=75.0).quality == 75
    assert InputQuantization(nn.Identity(), bits=4.0).bits == 4
    assert RandomResizePad(nn.Identity(), min_scale=1).min_scale == 1.0
    assert DefensiveDistillation(nn.Identity(), temperature=np.float32(100)).temperature == 100.0
    assert InputQuantization(nn.Identity(), bounds=(np.int64(-1), 1.0)).bounds == (-1.0, 1.0)


def test_an_input_transform_defence_refuses_integer_inputs():
    with pytest.raises(DataError, match="takes floating-point inputs"):
        GaussianNoise(nn.Identity())(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("make", [
    lambda: GaussianNoise(nn.Identity()),
    lambda: RandomResizePad(nn.Identity()),
], ids=["gaussian-noise", "random-resize-pad"])
def test_a_random_defence_draws_from_its_own_seeded_stream_and_leaves_the_global_one(make):
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first, again = make()(x), make()(x)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    assert torch.equal(first, again)  # seed 0 unless given: two fresh defences draw alike


@pytest.mark.parametrize("make", [GaussianNoise, RandomResizePad],
                         ids=["gaussian-noise", "random-resize-pad"])
def test_reseeded_copies_of_a_random_defence_draw_apart_and_a_reseed_replays(make):
    # a deep copy carries the generator's state: without reseeding, copies draw what the original does
    x = torch.rand(4, 1, 8, 8)
    original = make(nn.Identity(), seed=3)
    original(x)
    twin, other = copy.deepcopy(original), copy.deepcopy(original).reseed(11)
    assert torch.equal(twin(x), original(x))
    assert other.seed == 11 and not torch.equal(other(x), twin(x))
    assert torch.equal(other.reseed(11)(x), make(nn.Identity(), seed=11)(x))  # as a new defence's first draw
    with pytest.raises(ConfigError, match="seed"):
        original.reseed(-1)


def test_jpeg_stays_jpeg_when_the_module_is_cast_to_half_precision():
    # a bf16 cast rounded the DCT matrix, and 32% of the pixels came out other than JPEG's
    x = torch.rand(4, 3, 16, 16)
    for half in (torch.bfloat16, torch.float16):
        reference = JPEGCompression(nn.Identity(), quality=75)(x.to(half))
        cast = JPEGCompression(nn.Identity(), quality=75).to(half)
        assert cast.dct.dtype == torch.float32
        assert torch.equal(cast(x.to(half)), reference)


def test_distillation_keeps_decisions_and_saturates_the_softmax(standard_model, digits):
    # Prepare
    x, y = digits.test.x, digits.test.y
    distilled = DefensiveDistillation(standard_model, temperature=100)
    # Execute
    logits, plain = distilled(x), standard_model(x)
    zero = (_input_gradient(distilled, x, y).flatten(1) == 0).all(dim=1)
    # Assert: same decisions, logits 100x, and most cross-entropy gradients underflow to zero
    assert torch.equal(logits.argmax(1), plain.argmax(1))
    assert torch.allclose(logits, 100 * plain, rtol=1e-5, atol=1e-4)
    assert zero.float().mean() > 0.5
    assert not (_input_gradient(standard_model, x, y).flatten(1) == 0).all(dim=1).any()


def test_distillation_loss_is_the_soft_label_cross_entropy():
    teacher = torch.randn(8, 5)
    t = 20.0
    soft = F.softmax(teacher / t, dim=1)
    entropy = -(soft * soft.log()).sum(1).mean()
    assert torch.allclose(distillation_loss(teacher, teacher, t), entropy, atol=1e-6)  # its minimum
    student = torch.randn(8, 5, requires_grad=True)
    loss = distillation_loss(student, teacher, t)
    expected = F.kl_div(F.log_softmax(student / t, 1), soft, reduction="batchmean") + entropy
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(ConfigError, match="temperature"):
        distillation_loss(student, teacher, 0)
    with pytest.raises(DataError, match=r"must both have shape \(N, classes\), got \(8, 5\) and \(8, 4\)"):
        distillation_loss(student, teacher[:, :4], t)


def test_the_registry_builds_every_defence_and_lists_names_on_a_miss():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(2, 1, 8, 8)
    for name in DEFENCES:
        assert DEFENCES.get(name)(model)(x).shape == (2, 10)
    with pytest.raises(UnknownNameError, match="jpeg"):
        DEFENCES.get("jpg")


def test_seeds_past_two_to_the_53_stay_distinct_and_the_largest_is_taken():
    # seeds went through float: 2**53 and 2**53 + 1 drew the same noise, and 2**63 - 1 was refused
    x = torch.zeros(1, 4)
    a, b = GaussianNoise(nn.Identity(), seed=2**53), GaussianNoise(nn.Identity(), seed=2**53 + 1)
    assert b.seed == 2**53 + 1 and not torch.equal(a(x), b(x))
    assert GaussianNoise(nn.Identity(), seed=2**63 - 1).seed == 2**63 - 1
    assert RandomResizePad(nn.Identity(), seed=2**63 - 1).seed == 2**63 - 1


def test_resampling_and_the_codec_stay_inside_a_box_whose_faces_round():
    # bilinear weights sum to 1 only to rounding (255.00003 in a 0..255 box); a float64 box face that
    # float32 cannot hold (0.3) came back from the float32 codec as 0.30000001
    resized = RandomResizePad(nn.Identity(), bounds=(0, 255))(torch.full((8, 3, 32, 32), 255.0))
    assert float(resized.max()) <= 255.0
    face = torch.full((1, 1, 8, 8), 0.3, dtype=torch.float64)
    coded = JPEGCompression(nn.Identity(), bounds=(0, 0.3))(face)
    assert float(coded.max()) <= 0.3 and coded.dtype == torch.float64


@pytest.mark.parametrize(("dtype", "bounds"), [(torch.float64, (0.3, 0.9)), (torch.float32, (0.1, 0.7))])
def test_quantization_stays_inside_a_box_whose_faces_round(dtype, bounds):
    # the top level, 1 * (hi - lo) + lo, rounds past hi for these boxes: 0.9000000000000001 in float64,
    # 0.70000005 in float32, where the input's own face is 0.9 and 0.69999999
    lo, hi = bounds
    x = torch.tensor([lo, (lo + hi) / 2, hi], dtype=dtype).clamp(lo, hi)
    out = InputQuantization(nn.Identity(), bits=3, bounds=bounds)(x)
    assert out.dtype == dtype
    assert float(out.min()) >= lo and float(out.max()) <= hi, out.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resize_and_pad_resamples_half_precision_images_in_float32(dtype):
    # the grid in half precision read the wrong pixels and grid_sample gave NaN (6,000 of 150,528)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    identity = RandomResizePad(nn.Identity(), min_scale=1.0)
    out = identity.transform(x.to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), x.to(dtype).float(), rtol=0, atol=1e-2)
    shrunk = RandomResizePad(nn.Identity(), min_scale=0.8, seed=3)
    reference = RandomResizePad(nn.Identity(), min_scale=0.8, seed=3).transform(x)
    torch.testing.assert_close(shrunk.transform(x.to(dtype)).float(), reference, rtol=0, atol=1e-2)


def test_resize_and_pad_under_autocast_applies_the_float32_transform():
    # affine_grid's product ran in bf16 under autocast: even the identity moved pixels by 0.3
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = RandomResizePad(nn.Identity(), min_scale=0.8, seed=1).transform(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = RandomResizePad(nn.Identity(), min_scale=0.8, seed=1).transform(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_an_images_resize_and_pad_does_not_depend_on_its_batchs_size():
    # the draws were all scales, then all shifts: image 0's shift sat at position n of the stream
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    alone = RandomResizePad(nn.Identity(), seed=2).transform(x[:1])
    in_four = RandomResizePad(nn.Identity(), seed=2).transform(x)
    torch.testing.assert_close(in_four[:1], alone)
    empty = torch.rand(2, 3, 0, 8)
    assert RandomResizePad(nn.Identity()).transform(empty) is empty  # was torch's ValueError
