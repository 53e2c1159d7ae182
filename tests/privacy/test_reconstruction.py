"""Reconstruction from gradients: a single digit is recovered from a small MLP's gradient, DP noise
stops it; PSNR/SSIM, label inference, matching and the DP-style gradient checked in closed form."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.errors import ConfigError, DataError
from fortify.privacy import (
    gradient_leakage,
    infer_labels,
    reconstruct,
    reconstruction_quality,
    shared_gradient,
)
from fortify.privacy.reconstruction import _cosine_distance, _loss_gradient, total_variation
from fortify.privacy.similarity import best_assignment, psnr, ssim, ssim_window

NOISE_MULTIPLIER = 0.1  # DP-SGD noise std 0.1 * clip_norm on the summed gradient
CLIP_NORM = 1.0


def _small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _digits_with_distinct_labels(digits, n):
    """The first test digits of n different classes."""
    chosen, seen = [], set()
    for i, label in enumerate(digits.test.y.tolist()):
        if label not in seen:
            chosen.append(i)
            seen.add(label)
        if len(chosen) == n:
            break
    index = torch.tensor(chosen)
    return digits.test.x[index], digits.test.y[index]


@pytest.mark.slow
def test_one_digit_is_recovered_from_its_gradient_and_dp_noise_stops_it(digits):
    # Prepare
    model = _small_mlp()
    x, y = digits.test.x[:1], digits.test.y[:1]
    # Execute: Inverting Gradients, labels inferred from the gradient (iDLG)
    clean = gradient_leakage(model, x, y, method="inverting-gradients", steps=400)
    noisy = gradient_leakage(model, x, y, method="inverting-gradients", steps=400,
                             clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER)
    # Assert
    assert clean.psnr[0] > 30.0
    assert clean.ssim[0] > 0.95
    assert clean.label_accuracy == 1.0
    assert noisy.psnr[0] < clean.psnr[0] - 15.0
    assert noisy.ssim[0] < 0.8


def test_idlg_recovers_one_digit_with_lbfgs(digits):
    model = _small_mlp(1)
    x, y = digits.test.x[1:2], digits.test.y[1:2]
    report = gradient_leakage(model, x, y, method="idlg", steps=10)
    assert report.psnr[0] > 30.0
    assert report.settings["optimizer"] == "lbfgs"


def test_a_smoothed_loss_gives_the_gradient_of_the_smoothed_cross_entropy(digits):
    # Prepare: a batch of two, and the training loss by hand
    model = _small_mlp(2)
    x, y = digits.test.x[:2], digits.test.y[:2]
    loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    # Execute
    shared = shared_gradient(model, x, y, label_smoothing=0.2)
    # Assert
    for ours, theirs in zip(shared, expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(shared[-1], shared_gradient(model, x, y)[-1])
    with pytest.warns(UserWarning, match="label_smoothing=0.2"):  # labels inferred under smoothing
        report = gradient_leakage(model, x[:1], y[:1], method="idlg", steps=10, label_smoothing=0.2)
    assert report.psnr[0] > 30.0 and report.settings["label_smoothing"] == 0.2


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, float("nan")])
def test_label_smoothing_outside_zero_to_one_is_refused(digits, smoothing):
    model = _small_mlp()
    x, y = digits.test.x[:1], digits.test.y[:1]
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\)"):
        shared_gradient(model, x, y, label_smoothing=smoothing)
    gradient = shared_gradient(model, x, y)
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\)"):
        reconstruct(model, gradient, (1, 8, 8), label_smoothing=smoothing)


@pytest.mark.slow
def test_a_batch_of_four_is_recovered_whatever_order_the_reconstruction_comes_in(digits):
    # Prepare
    model = _small_mlp(2)
    x, y = _digits_with_distinct_labels(digits, 4)
    gradient = shared_gradient(model, x, y)
    # Execute
    result = reconstruct(model, gradient, (1, 8, 8), batch_size=4, steps=400)
    report = reconstruction_quality(result, x, y)
    result.images, result.labels = result.images.flip(0), result.labels.flip(0)
    flipped = reconstruction_quality(result, x, y)
    # Assert
    assert sorted(result.labels.tolist()) == sorted(y.tolist())
    assert min(report.psnr) > 25.0
    assert flipped.psnr == pytest.approx(report.psnr)
    assert report.label_accuracy == 1.0


def test_idlg_reads_the_label_off_the_last_layer_for_every_class(digits):
    model = _small_mlp(3)
    x = digits.test.x[:1]
    for label in range(10):
        gradient = shared_gradient(model, x, torch.tensor([label]))
        assert infer_labels(model, gradient, 1, (1, 8, 8)).tolist() == [label]


def test_idlg_reads_the_label_of_a_bias_free_layer_after_features_of_either_sign(digits):
    # Prepare: a last layer without bias after tanh, so the weight rows' sums carry no sign rule
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10, bias=False))
    x = digits.test.x[:1]
    # Execute / Assert: one example, every label
    for label in range(10):
        gradient = shared_gradient(model, x, torch.tensor([label]))
        assert infer_labels(model, gradient, 1, (1, 8, 8)).tolist() == [label]


@pytest.mark.parametrize("seed", range(6))
def test_idlg_reads_both_labels_of_a_two_class_layer_without_bias(seed):
    # the two weight rows are mirror images of one length, and rounding picked the "longest": half
    # of the labels came out wrong; their sign tells them apart where the features are non-negative
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2, bias=False))
    x = torch.rand(1, 4)
    for label in (0, 1):
        gradient = shared_gradient(model, x, torch.tensor([label]))
        assert infer_labels(model, gradient, 1, (4,)).tolist() == [label]


@pytest.mark.parametrize("method", ["dlg", "idlg", "inverting-gradients"])
def test_gradient_leakage_takes_float64_data_or_model_and_narrow_labels(method):
    # float64 data from numpy met a float32 model (and a float32 start met a float64 model) in the
    # first layer; int32 labels failed in the cross-entropy
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([1], dtype=torch.int32)
    single = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    for model, data in ((single, x.double()), (copy.deepcopy(single).double(), x.double()), (single, x)):
        report = gradient_leakage(model, data, y, method=method, steps=2, known_labels=method == "dlg")
        # a linear layer with a bias gives one image away exactly (PSNR inf), in the model's dtype
        assert all(p > 20 for p in report.psnr) and report.images.dtype == next(model.parameters()).dtype


def test_idlg_recovers_distinct_labels_of_a_batch_from_an_unsure_model(digits):
    # Prepare: near-uniform predictions (small last layer), three examples of different classes
    model = _small_mlp(5)
    with torch.no_grad():
        model[-1].weight.mul_(0.01)
    x, y = _digits_with_distinct_labels(digits, 3)
    # Execute
    inferred = infer_labels(model, shared_gradient(model, x, y), 3, (1, 8, 8))
    # Assert
    assert sorted(inferred.tolist()) == sorted(y.tolist())


def test_dp_gradient_clips_each_example_and_adds_noise_of_the_stated_size(digits):
    # Prepare
    model = _small_mlp(4)
    x, y = digits.test.x[:2], digits.test.y[:2]
    # Execute
    clipped = shared_gradient(model, x[:1], y[:1], clip_norm=1e-3)
    clean_mean = shared_gradient(model, x, y, clip_norm=1e-3)
    noisy = shared_gradient(model, x, y, clip_norm=1e-3, noise_multiplier=1000.0,
                            generator=torch.Generator().manual_seed(0))
    # Assert: one example's gradient has exactly the clip norm (its own is far larger)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in clipped))
    assert norm.item() == pytest.approx(1e-3, rel=1e-5)
    per_example = [shared_gradient(model, x[i:i + 1], y[i:i + 1], clip_norm=1e-3) for i in range(2)]
    for mean, a, b in zip(clean_mean, *per_example):
        assert torch.allclose(mean, (a + b) / 2, atol=1e-9)
    residual = torch.cat([(n - c).flatten() for n, c in zip(noisy, clean_mean)])
    assert residual.std().item() == pytest.approx(1000.0 * 1e-3 / 2, rel=0.05)  # sigma * C / B
    assert residual.mean().abs().item() < 0.05


def test_noise_without_clipping_is_refused(digits):
    model = _small_mlp()
    with pytest.raises(ConfigError, match="needs clip_norm"):
        shared_gradient(model, digits.test.x[:1], digits.test.y[:1], noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="valid: dlg, idlg, inverting-gradients"):
        reconstruct(model, [], (1, 8, 8), method="deep-leakage")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="the gradient has 0 tensors"):
        reconstruct(model, [], (1, 8, 8))


# -- image similarity ---------------------------------------------------------------------------

def test_psnr_of_a_uniform_offset_is_its_closed_form():
    a = torch.rand(3, 1, 8, 8) * 0.5
    assert psnr(a + 0.1, a).tolist() == pytest.approx([20.0] * 3)  # -20 log10(0.1)
    assert psnr(a + 0.01, a, data_range=2.0).tolist() == pytest.approx([46.0206] * 3, rel=1e-5)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 16, 16, generator=gen)
    noise = torch.randn(a.shape, generator=gen)
    values = [ssim((a + s * noise).clamp(0, 1), a).mean().item() for s in (0.0, 0.05, 0.2)]
    assert values[0] == pytest.approx(1.0)
    assert values[0] > values[1] > values[2]
    assert ssim(a, a.flip(0)).tolist() == pytest.approx(ssim(a.flip(0), a).tolist())  # symmetric


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 16, 20), (2, 1, 8, 8)])
def test_ssim_matches_scikit_image(shape):
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(shape, generator=gen, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    _, sigma = ssim_window(*shape[2:])
    expected = [metrics.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0,
                                              gaussian_weights=True, sigma=sigma,
                                              use_sample_covariance=False, channel_axis=0)
                for i in range(shape[0])]
    assert ssim(a, b).tolist() == pytest.approx(expected, abs=1e-6)


def test_best_assignment_undoes_a_permutation():
    originals = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    noisy = originals[permutation] + 0.01 * torch.randn(6, 1, 8, 8)
    order = best_assignment(noisy, originals)
    assert torch.equal(permutation[order], torch.arange(6))


def test_quality_refuses_a_reconstruction_of_another_shape(digits):
    model = _small_mlp()
    gradient = shared_gradient(model, digits.test.x[:1], digits.test.y[:1])
    result = reconstruct(model, gradient, (1, 8, 8), batch_size=1, steps=1)
    with pytest.raises(DataError, match="shape"):
        reconstruction_quality(result, digits.test.x[:2], digits.test.y[:2])
    assert F.mse_loss(result.images, result.images.clamp(0, 1)) == 0  # inside the box


def test_the_recorded_loss_is_that_of_the_returned_images(digits):
    # Prepare: two Adam steps of Inverting Gradients, labels known
    model = _small_mlp()
    x, y = digits.test.x[:2], digits.test.y[:2]
    gradient = shared_gradient(model, x, y)
    # Execute
    result = reconstruct(model, gradient, (1, 8, 8), batch_size=2, labels=y, method="inverting-gradients",
                         steps=2, tv_weight=1e-2)
    # Assert: restarts are ranked by final_loss, so it must be the loss where the search ended
    at_images = (_cosine_distance(_loss_gradient(model, result.images, y), gradient)
                 + 1e-2 * total_variation(result.images).mean())
    assert result.final_loss == pytest.approx(float(at_images), rel=1e-5)


class _HeadFirst(nn.Module):
    """A model that registers its output layer before its body, as hand-written models often do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(32, 10)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_idlg_reads_the_label_off_the_layer_that_makes_the_output_whatever_its_registration(digits):
    model = _HeadFirst()
    x = digits.test.x[:1]
    for label in (3, 7):
        gradient = shared_gradient(model, x, torch.tensor([label]))
        assert infer_labels(model, gradient, 1, (1, 8, 8)).tolist() == [label]
    # DLG guesses soft labels over the model's 10 outputs, not the hidden layer's 32
    result = reconstruct(model, gradient, (1, 8, 8), method="dlg", steps=2)
    assert result.labels.shape == (1,) and 0 <= int(result.labels) < 10


def test_labels_the_model_cannot_output_are_refused(digits):
    model = _small_mlp()
    x = digits.test.x[:2]
    with pytest.raises(DataError, match=r"labels range over \[0, 10\] but the model has 10 outputs"):
        shared_gradient(model, x, torch.tensor([0, 10]))
    gradient = shared_gradient(model, x, digits.test.y[:2])
    with pytest.raises(DataError, match=r"labels range over \[-1, 3\]"):
        reconstruct(model, gradient, (1, 8, 8), batch_size=2, labels=torch.tensor([3, -1]), steps=1)


def test_dlg_reports_the_loss_of_the_point_it_returns(digits):
    # Prepare: iDLG's L-BFGS runs unconstrained and its iterate leaves the box
    model = _small_mlp(1)
    x, y = digits.test.x[:1], digits.test.y[:1]
    gradient = shared_gradient(model, x, y)
    # Execute
    result = reconstruct(model, gradient, (1, 8, 8), method="idlg", steps=5)
    # Assert: the loss is the gradient distance at the returned (boxed) images
    at_images = sum((a - b).pow(2).sum() for a, b in zip(
        _loss_gradient(model.eval(), result.images, result.labels), gradient, strict=True))
    assert result.final_loss == pytest.approx(float(at_images), rel=1e-4)


def test_a_report_read_back_from_json_keeps_a_perfect_psnr_and_an_undefined_ssim():
    import json

    from fortify.evaluation.metrics import json_safe
    from fortify.privacy.reconstruction import ReconstructionReport

    report = ReconstructionReport(method="idlg", batch_size=2, clip_norm=None, noise_multiplier=0.0,
                                  psnr=[float("inf"), 20.0], ssim=[float("nan"), 0.5], label_accuracy=1.0,
                                  settings={}, seconds=1.0)
    loaded = ReconstructionReport.from_dict(json.loads(json.dumps(json_safe(report.to_dict()))))
    assert loaded.mean_psnr == float("inf") and loaded.psnr[1] == 20.0
    assert loaded.ssim is not None and loaded.ssim[1] == 0.5 and loaded.mean_ssim != loaded.mean_ssim  # NaN


def test_batch_statistics_take_the_gradient_as_a_training_step_does_and_keep_the_running_statistics():
    # Prepare: a model with batch norm; the client's gradient is taken in training mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)  # not the batch's statistics
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    client = copy.deepcopy(model).train()
    expected = torch.autograd.grad(F.cross_entropy(client(x), y), list(client.parameters()))
    # Execute
    as_trained = shared_gradient(model, x, y, batch_statistics=True)
    as_evaluated = shared_gradient(model, x, y)
    # Assert: the training step's gradient exactly; eval mode's differs; nothing of the model moved
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(as_trained, expected, strict=True))
    assert float(_cosine_distance(as_evaluated, expected)) > 0.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    with pytest.raises(ConfigError, match="batch_statistics cannot go with clip_norm"):
        shared_gradient(model, x, y, clip_norm=1.0, batch_statistics=True)
