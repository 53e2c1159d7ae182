"""Mixed-precision evaluation: autocast keeps the attack contract, and the fp32 check reports agreement."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from fortify.attacks import FGSM, PGD
from fortify.attacks.adaptive import EOT
from fortify.cli import app
from fortify.config import RunConfig, TrainConfig, load_config
from fortify.defences import GaussianNoise
from fortify.errors import ConfigError
from fortify.evaluation import RobustnessReport, evaluate, precision
from fortify.evaluation.gradients import ZeroGradientPath
from fortify.evaluation.precision import AutocastModel, check_against_fp32
from fortify.pipeline import evaluate_model, prepare
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

CPU = torch.device("cpu")
THREAT = ThreatModel("linf", 0.2)


class _NearTie(nn.Module):
    """Logits about 256 and 257: bf16 keeps 8 significant bits, so both round to 256 and tie."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 2)
        with torch.no_grad():
            self.linear.weight.fill_(1e-3)
            self.linear.bias.copy_(torch.tensor([256.0, 257.0]))

    def forward(self, x):
        return self.linear(x.flatten(1))


class _OutputDtype(nn.Module):
    """Records the dtype of the wrapped model's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        out = self.model(x)
        self.seen.append(out.dtype)
        return out


def test_the_network_runs_in_bf16_while_the_attack_keeps_its_contract(standard_model, digits):
    # Prepare
    recorder = _OutputDtype(standard_model)
    amp_model = AutocastModel(recorder, "bf16", CPU)
    x, y = digits.test.x[:32], digits.test.y[:32]
    # Execute
    logits = amp_model(x)
    x_adv = PGD(THREAT, steps=5)(amp_model, x, y)
    # Assert: bf16 inside, the input's dtype outside, and the point inside the threat model
    assert set(recorder.seen) == {torch.bfloat16}
    assert logits.dtype == torch.float32
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert bool(THREAT.contains(x_adv, x).all())
    assert not bool(torch.equal(x_adv, x))


def test_bf16_evaluation_agrees_with_fp32_on_a_trained_model(standard_model, digits):
    # Prepare
    x, y = digits.test.x[:160], digits.test.y[:160]
    attacks = [PGD(THREAT, steps=10)]
    # Execute
    fp32 = evaluate(standard_model, x, y, attacks, THREAT)
    bf16 = evaluate(standard_model, x, y, attacks, THREAT, amp="bf16", batch_size=100)
    # Assert: the check ran on the first batch, agreed, and stayed silent
    check = bf16.precision
    assert check is not None and fp32.precision is None
    assert (check.amp, check.examples, check.attack) == ("bf16", 100, "pgd-10")
    assert check.attacked >= 90  # the clean-correct examples of the sample
    assert check.clean_agreement >= 0.98 and check.robust_agreement >= 0.95
    assert not any("autocast" in w for w in bf16.warnings)
    assert abs(bf16.clean_accuracy - fp32.clean_accuracy) <= 0.02
    assert abs(bf16.worst_case_accuracy - fp32.worst_case_accuracy) <= 0.05


def test_a_precision_sensitive_model_gets_a_warning():
    # Prepare: fp32 predicts class 1 everywhere, bf16 ties and argmax picks class 0
    model = _NearTie().eval()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.ones(20, dtype=torch.long)
    # Execute
    report = evaluate(model, x, y, [FGSM(THREAT)], THREAT, amp="bf16")
    # Assert
    check = report.precision
    assert check.clean_agreement == 0.0 and check.attacked == 0 and check.robust_agreement is None
    assert any("agree with fp32 on only 0.0% of 20 examples" in w for w in report.warnings)
    assert report.clean_accuracy == 0.0  # the bf16 number, which the warning puts in doubt


class _TippingPoint(nn.Module):
    """Class 1 scores 260. Class 0 scores 257.5 on the clean grey image and 259.6 after an eps=0.2
    L-inf step: still below 260 in fp32, but bf16 (steps of 2 above 256) rounds it up to a tie that
    argmax resolves to class 0. So the clean predictions agree and the attack's outcome does not."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([torch.full((64,), 0.164), torch.zeros(64)]))
            self.linear.bias.copy_(torch.tensor([252.25, 260.0]))

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_an_attack_outcome_that_depends_on_precision_gets_a_warning():
    x = torch.full((10, 1, 8, 8), 0.5)
    y = torch.ones(10, dtype=torch.long)
    report = evaluate(_TippingPoint().eval(), x, y, [FGSM(THREAT)], THREAT, amp="bf16")
    check = report.precision
    assert (check.clean_agreement, check.attacked, check.robust_agreement) == (1.0, 10, 0.0)
    assert any("fgsm leaves the same examples robust as in fp32 on only 0.0% of 10" in w
               for w in report.warnings)


def test_report_round_trip_keeps_the_check():
    model = _NearTie().eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    report = evaluate(model, x, torch.ones(8, dtype=torch.long), [FGSM(THREAT)], THREAT, amp="bf16")
    again = RobustnessReport.from_dict(report.to_dict())
    assert again == report and again.precision.amp == "bf16"


def test_the_pipeline_passes_eval_amp_through(standard_model):
    config = RunConfig.model_validate({"eval": {"attacks": ["fgsm"], "n_examples": 40, "amp": "bf16",
                                                "eps_grid": [0.1]}})
    setup = prepare(config, "cpu")
    report = evaluate_model(setup, standard_model)
    assert report.precision is not None and report.precision.amp == "bf16"
    assert report.precision.examples == 40


@pytest.mark.parametrize("overrides, fragment", [
    ({"amp": "bf8"}, "eval.amp"),
    ({"amp_min_agreement": 0}, "eval.amp_min_agreement"),
])
def test_bad_amp_settings_are_config_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides={"eval": overrides})


def test_unknown_precision_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown amp precision 'int8'; valid: bf16, fp16"):
        AutocastModel(nn.Linear(2, 2), "int8", CPU)
    with pytest.raises(ConfigError, match=r"min_agreement must be in \(0, 1\]"):
        check_against_fp32(nn.Linear(2, 2), AutocastModel(nn.Linear(2, 2), "bf16", CPU),
                           torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), FGSM(THREAT),
                           amp="bf16", min_agreement=1.5)


def test_cli_rejects_an_unknown_amp_without_a_traceback(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(RunConfig().model_dump(mode="json")))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--amp", "bf8"])
    assert result.exit_code == 2, result.output
    assert "eval.amp" in result.output and "bf16" in result.output
    assert isinstance(result.exception, SystemExit)


def test_a_journal_written_under_autocast_is_not_resumed_in_full_precision():
    from fortify.evaluation.journal import fingerprint

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    attacks = [FGSM(ThreatModel("linf", 0.1))]
    same = {"model": nn.Linear(2, 2), "clean_correct": torch.ones(4, dtype=torch.bool)}
    plain = fingerprint(x, y, attacks, False, 256, **same)
    assert fingerprint(x, y, attacks, False, 256, amp=None, **same) == plain
    bf16 = fingerprint(x, y, attacks, False, 256, amp="bf16", **same)
    assert bf16 != plain and bf16 != fingerprint(x, y, attacks, False, 256, amp="fp16", **same)


@pytest.mark.parametrize("wrap", ["autocast", "zero-gradient-path", "both"])
def test_wrappers_keep_eots_mean_loss(wrap):
    # Prepare: EOT over strong Gaussian noise, where the mean of the per-sample losses and the loss of
    # the mean logits differ clearly; the attacks look average_objective up on the model they get
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    pgd = PGD(THREAT, steps=3)

    def eot():
        return EOT(GaussianNoise(net, sigma=2.0, seed=0), 4)

    def wrapped():
        model = eot()
        if wrap in ("autocast", "both"):
            model = AutocastModel(model, "bf16", CPU)
        return ZeroGradientPath(model) if wrap in ("zero-gradient-path", "both") else model

    # Execute
    mean_loss, _ = pgd.loss_and_logits(eot(), x, y, None)
    point = x.clone().requires_grad_(True)
    through, logits = pgd.loss_and_logits(wrapped(), point, y, None)
    loss_of_mean = F.cross_entropy(eot()(x), y, reduction="none")
    # Assert: the wrapped model's loss is EOT's mean loss (to bf16 rounding), not the mean logits' loss,
    # in the input's dtype, with a gradient back to the input
    assert (mean_loss - loss_of_mean).abs().max() > 0.05
    torch.testing.assert_close(through, mean_loss, atol=0.03, rtol=0.03)
    assert through.dtype == logits.dtype == torch.float32
    (grad,) = torch.autograd.grad(through.sum(), point)
    assert grad.shape == x.shape


# -- CPUs without oneDNN kernels for the precision ----------------------------------------------

@pytest.mark.parametrize("has_kernels", [True, False])
def test_eval_amp_warns_on_a_cpu_without_kernels_for_it(monkeypatch, has_kernels):
    monkeypatch.setattr(precision, "cpu_has_kernels_for", lambda amp: has_kernels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.check_amp_support("bf16", torch.device("cpu")) == torch.bfloat16
    slow = [w for w in caught if "no oneDNN bf16 kernels" in str(w.message)]
    assert len(slow) == (0 if has_kernels else 1)
    assert not slow or "eval.amp" in str(slow[0].message)


@pytest.mark.parametrize("has_kernels", [True, False])
def test_train_amp_warns_on_a_cpu_without_bf16_kernels(monkeypatch, has_kernels):
    monkeypatch.setattr(precision, "cpu_has_kernels_for", lambda amp: has_kernels)
    model = nn.Linear(4, 2)
    config = TrainConfig(objective="standard", epochs=1, amp=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model, build_objective("standard", ObjectiveOptions(ThreatModel("linf", 0.1))), config,
                threat=ThreatModel("linf", 0.1), show_progress=False)
    slow = [w for w in caught if "train.amp" in str(w.message)]
    assert len(slow) == (0 if has_kernels else 1)

