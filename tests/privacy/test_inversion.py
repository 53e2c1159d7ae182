"""MI-Face model inversion: reconstructions of a digits CNN are recognised by a separately trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fortify.config import TrainConfig
from fortify.data import Split
from fortify.errors import ConfigError, DataError
from fortify.evaluation.metrics import json_safe
from fortify.privacy import TrainerRecipe, evaluate_inversion, invert_classes, model_inversion
from fortify.privacy.inversion import InversionReport, class_means
from fortify.privacy.similarity import total_variation
from fortify.threat import ThreatModel
from scaling import Scale


@pytest.fixture(scope="module")
def evaluator(digits) -> nn.Module:
    """An MLP trained on its own (other architecture, other seed) to judge the reconstructions."""
    config = TrainConfig(objective="standard", epochs=8, early_stopping=False)
    recipe = TrainerRecipe.for_model("mlp", digits.input_shape, digits.num_classes, config=config,
                                     threat=ThreatModel("linf", 0.2), val=digits.val)
    model = recipe(digits.train, seed=11)
    accuracy = (model(digits.test.x).argmax(1) == digits.test.y).float().mean()
    assert accuracy > 0.9  # a judge must know the digits itself
    return model


@pytest.mark.slow  # trains the shared standard model and the judge when run alone
def test_inverted_classes_are_recognised_by_a_separately_trained_model(standard_model, digits,
                                                                       evaluator):
    # Execute
    report = model_inversion(standard_model, digits.train, evaluator=evaluator)
    # Assert: the reconstructions carry the class, not just a pattern the target alone responds to
    assert report.images.shape == (10, 1, 8, 8)
    assert report.evaluator_accuracy >= 0.5 > report.chance_accuracy
    assert min(report.target_confidence) > 0.9
    assert report.nearest_mean_accuracy > report.chance_accuracy
    assert report.images.min() >= 0.0 and report.images.max() <= 1.0
    assert report.to_dict()["mean_ssim"] == pytest.approx(report.mean_ssim)
    assert "images" not in report.to_dict()


def test_an_untrained_model_reveals_no_class(digits, evaluator):
    # Prepare: random weights know nothing about digits
    torch.manual_seed(5)
    untrained = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    # Execute
    report = model_inversion(untrained, digits.train, evaluator=evaluator)
    # Assert: whatever the inversion climbs towards, the judge sees no digit of that class in it
    assert report.evaluator_accuracy <= 0.3


def test_inversion_is_deterministic_and_leaves_the_model_alone(standard_model):
    grads = [None if p.grad is None else p.grad.clone() for p in standard_model.parameters()]
    standard_model.train()
    try:
        first = invert_classes(standard_model, [3, 7], (1, 8, 8), steps=20)
        second = invert_classes(standard_model, [3, 7], (1, 8, 8), steps=20)
        assert standard_model.training  # the caller's mode is restored
    finally:
        standard_model.eval()
    assert torch.equal(first, second)
    for before, p in zip(grads, standard_model.parameters()):  # the model's gradients untouched
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)


def test_class_means_are_the_per_class_averages():
    train = Split(torch.tensor([[0.0], [2.0], [4.0], [10.0]]), torch.tensor([0, 0, 0, 1]))
    assert class_means(train, [1, 0]).tolist() == [[10.0], [2.0]]
    with pytest.raises(DataError, match="class 2 has no training examples"):
        class_means(train, [2])


def test_bad_inversion_settings_are_refused(standard_model, digits):
    with pytest.raises(ConfigError, match="valid: probability, log-probability, logit"):
        invert_classes(standard_model, [0], (1, 8, 8), objective="entropy")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="start must have shape"):
        invert_classes(standard_model, [0, 1], (1, 8, 8), start=torch.zeros(1, 1, 8, 8))
    images = invert_classes(standard_model, [0], (1, 8, 8), steps=2)
    report = evaluate_inversion(standard_model, images, [0], digits.train)
    assert report.evaluator_accuracy is None and report.evaluator_predictions is None


def test_classes_the_model_has_no_output_for_are_refused():
    # Prepare: a 3-class model, and training data whose labels go up to 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    train = Split(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    # Execute / Assert
    for classes in ([5], [-1], [0, 3]):
        with pytest.raises(ConfigError, match=r"classes \[-?\d\] are not among the model's 3 outputs "
                                              r"\(allowed: 0\.\.2\)"):
            invert_classes(model, classes, (1, 4, 4), steps=2)
    with pytest.raises(ConfigError, match="classes is empty"):
        invert_classes(model, [], (1, 4, 4), steps=2)
    with pytest.raises(ConfigError, match="classes is empty"):
        model_inversion(model, train, classes=[], steps=2)
    with pytest.raises(DataError, match=r"training data: labels range over \[0, 4\] .* 3 outputs"):
        model_inversion(model, Split(x, torch.tensor([0, 1, 2, 3, 4, 4])), steps=2)
    with pytest.raises(ConfigError, match=r"classes \[3\] are not among"):
        evaluate_inversion(model, torch.rand(1, 1, 4, 4), [3], train)


def test_a_report_read_back_from_privacy_json_still_has_its_means():
    # Prepare: tabular data, whose SSIM is NaN, which privacy.json holds as null
    torch.manual_seed(0)
    report = model_inversion(nn.Linear(6, 3), Split(torch.rand(30, 6), torch.arange(30) % 3), steps=3)
    written = json.loads(json.dumps(json_safe(report.to_dict()), allow_nan=False))
    assert written["ssim_to_class_mean"] == [None, None, None]
    # Execute
    back = InversionReport.from_dict(written)
    # Assert: the means of the report that was written
    assert math.isnan(back.mean_ssim) and all(math.isnan(v) for v in back.ssim_to_class_mean)
    assert back.mean_mse == report.mean_mse


def test_total_variation_of_a_dimension_of_size_one_is_zero():
    # Prepare: one-row images (N, C, 1, W), the same as one-column ones, and a one-channel signal (N, 1, L)
    generator = torch.Generator().manual_seed(0)
    rows, signal = torch.rand(2, 3, 1, 8, generator=generator), torch.rand(2, 1, 8, generator=generator)

    def mean_step_along_last(x):
        return (x[..., 1:] - x[..., :-1]).abs().reshape(len(x), -1).mean(dim=1)

    # Execute / Assert: only the dimension with neighbours counts (the mean over no pairs was NaN)
    assert torch.allclose(total_variation(rows), mean_step_along_last(rows))
    assert torch.allclose(total_variation(rows.transpose(-1, -2)), mean_step_along_last(rows))
    assert torch.allclose(total_variation(signal), mean_step_along_last(signal))


def test_inversion_scores_do_not_depend_on_the_units_of_the_box(digits):
    # Prepare: the same reconstructions and data in [0, 1] and in [0, 255]; a model that reads
    # both alike (it divides by 255 first), so only the scores' normalisation can differ
    recon = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scaled_train = Split(digits.train.x * 255, digits.train.y)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    scaled_model = nn.Sequential(Scale(1 / 255), model)
    # Execute
    unit = evaluate_inversion(model, recon, [0, 1], digits.train)
    wide = evaluate_inversion(scaled_model, recon * 255, [0, 1], scaled_train, bounds=(0.0, 255.0))
    # Assert
    assert wide.ssim_to_class_mean == pytest.approx(unit.ssim_to_class_mean, abs=1e-6)
    assert wide.mse_to_class_mean == pytest.approx(unit.mse_to_class_mean, rel=1e-6)


def test_inversion_itself_does_not_depend_on_the_units_of_the_box():
    # Prepare: one linear model reading [0, 1] inputs, and the same model reading [0, 255] ones
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    scaled_model = nn.Sequential(Scale(1 / 255), model)
    # Execute
    unit = invert_classes(model, [0, 1], (1, 8, 8), steps=50)
    wide = invert_classes(scaled_model, [0, 1], (1, 8, 8), steps=50, bounds=(0.0, 255.0))
    # Assert: the same reconstruction in other units (an absolute step of 0.05 and a TV penalty 255
    # times stronger left the [0, 255] one at the box centre)
    assert (unit - 0.5).abs().mean() > 0.3
    assert torch.allclose(wide / 255, unit, atol=1e-5)
