"""Bad attack settings stop with a FortifyError that names the value and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from fortify.attacks import APGD, ATTACKS, FGSM, FMN, PGD, CarliniWagnerL2, HopSkipJump, Square
from fortify.cli import app
from fortify.config import EvalConfig, RunConfig, load_config
from fortify.errors import ConfigError, DataError, FortifyError
from fortify.pipeline import build_attacks
from fortify.threat import ThreatModel

LINF, L2 = ThreatModel("linf", 0.2), ThreatModel("l2", 1.0)
TARGETED = [
    lambda: FGSM(LINF, targeted=True),
    lambda: PGD(LINF, steps=2, targeted=True),
    lambda: APGD(LINF, n_iter=2, targeted=True),
    lambda: Square(LINF, n_queries=2, targeted=True),
    lambda: FMN(L2, steps=2, targeted=True),
    lambda: CarliniWagnerL2(L2, steps=2, targeted=True),
]


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        return self.linear(x.flatten(1))


def _batch():
    return torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("make", TARGETED)
@pytest.mark.parametrize("bad", [3, -1])
def test_a_target_outside_the_models_classes_is_named(make, bad):
    x, y = _batch()
    target = torch.tensor([1, bad, 0, 1])
    with pytest.raises(DataError, match=rf"target labels range over \[{min(bad, 0)}, {max(bad, 1)}\] but "
                                        r"the model has 3 classes \(allowed: 0\.\.2\)"):
        make()(_Counting(), x, y, target=target)


def test_minimal_norm_search_checks_its_targets_too():
    x, y = _batch()
    with pytest.raises(DataError, match="target labels"):
        FMN(L2, steps=2, targeted=True).minimal(_Counting(), x, y, target=torch.full((4,), 7))


def test_the_target_check_costs_one_single_example_pass_and_only_with_targets():
    # Prepare
    x, y = _batch()
    model = _Counting()
    # Execute
    FGSM(LINF)(model, x, y)
    untargeted = model.passes
    FGSM(LINF, targeted=True)(model, x, y, target=torch.tensor([1, 2, 0, 1]))
    # Assert: FGSM needs one pass; the targeted call adds exactly one (on one example)
    assert untargeted == 1 and model.passes == 3


@pytest.mark.parametrize("options, fragment", [
    ({"apgd-t": {"n_target_classes": 10}}, "n_target_classes=10 for 'apgd-t' is out of range for 10 "
                                          "classes; allowed: 1..9"),
    ({"fab-t": {"n_target_classes": 12}}, "n_target_classes=12 for 'fab-t'"),
    ({"pgd": {"targeted": True}}, "an evaluation has no target labels; use apgd-t or fab-t"),
])
def test_target_settings_fail_when_the_attacks_are_built(options, fragment):
    config = EvalConfig(attacks=list(options), attack_options=options)
    with pytest.raises(ConfigError, match=fragment):
        build_attacks(config, LINF, num_classes=10)


def test_a_targeted_transfer_attack_fails_when_the_attacks_are_built():
    # its source is a PGD on the surrogate: a targeted one had passed here and failed mid-evaluation
    config = EvalConfig(attacks=["transfer"], surrogate="elsewhere",
                        attack_options={"transfer": {"targeted": True}})
    with pytest.raises(ConfigError, match="make 'transfer' targeted, but an evaluation has no target"):
        build_attacks(config, LINF, num_classes=10, surrogate=nn.Linear(2, 2))


@pytest.mark.parametrize("options, fragment", [
    ({"square": {"n_queries": 0}}, "n_queries must be an integer >= 1, got 0"),
    ({"hopskipjump": {"max_queries": -5}}, "max_queries must be an integer >= 1, got -5"),
])
def test_a_query_budget_below_one_is_rejected_when_building(options, fragment):
    config = EvalConfig(attacks=list(options), attack_options=options)
    with pytest.raises(ConfigError, match=fragment):
        build_attacks(config, LINF, num_classes=10)


@pytest.mark.parametrize("options, fragment", [
    ({"pgd": {"random_start": "no"}}, "random_start='no' must be true or false"),
    ({"pgd": {"steps": 2.5}}, "steps=2.5 must be a whole number"),
    ({"pgd": {"step_size": True}}, "step_size=True must be a number, not true or false"),
    ({"square": {"p_init": "0.1"}}, "p_init='0.1' must be a number"),
    ({"fgsm": {"random_start": None}}, "random_start=None may not be null"),
    ({"fgsm": {"step_size": -1}}, "step_size must be > 0, got -1"),
    ({"fgsm": {"eps": 0.9}}, "unknown option 'eps'; it takes step_size, random_start, targeted, seed"),
    ({"cw": {"warm_start": "yes"}}, "warm_start='yes' must be true or false"),
    # each was Python's own error, or ran another attack under the name
    ({"pgd": {"seed": 3}}, "seed is set by eval.seed"),
    ({"apgd-ce": {"loss": "dlr"}}, "the loss is in the attack's name; run apgd-dlr"),
    ({"pgd": {"restarts": 3, "random_start": False}}, "restarts=3 needs random_start"),
])
def test_attack_options_of_the_wrong_type_or_range_are_refused_by_name(options, fragment):
    # YAML hands these over as written: "no" would read as true, a bool as the number 1
    config = EvalConfig(attacks=list(options), attack_options=options)
    threat = L2 if "cw" in options else LINF
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        build_attacks(config, threat, num_classes=10)


def test_pgd_keeping_its_last_iterate_is_built_without_early_stop_and_probe():
    # both keep an example's first success, so with keep_first_success false the evaluation's own
    # early_stop made every such option fail, naming early_stop, which the user never set
    config = EvalConfig(attacks=["pgd"], attack_options={"pgd": {"keep_first_success": False}})
    (attack,) = build_attacks(config, LINF, num_classes=10)
    assert (attack.keep_first_success, attack.early_stop, attack.probe) == (False, False, False)
    (default,) = build_attacks(EvalConfig(attacks=["pgd"]), LINF, num_classes=10)
    assert (default.early_stop, default.probe) == (True, True)


def test_a_pgd_step_that_is_not_finite_is_refused():
    # an infinite L2 step gave NaN points
    with pytest.raises(ConfigError, match="step_size must be a finite number > 0"):
        PGD(L2, step_size=float("inf"))


def test_cw_warm_start_reaches_the_attack_from_the_configuration():
    config = EvalConfig(attacks=["cw"], attack_options={"cw": {"warm_start": True, "steps": 30}})
    (attack,) = build_attacks(config, L2, num_classes=10)
    assert attack.warm_start is True and attack.steps == 30


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_attack_option_is_refused_with_the_config(value):
    # refused on reading: a later dump of the config to JSON would turn NaN into null, i.e. the default
    with pytest.raises(ConfigError, match="pgd.step_size must be a finite number"):
        load_config(overrides={"eval": {"attack_options": {"pgd": {"step_size": value}}}})


def test_a_query_budget_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.queries"):
        load_config(overrides={"eval": {"queries": 0}})


@pytest.mark.parametrize("name", ["cw"])
def test_an_attack_without_the_norm_names_the_supported_ones(name):
    assert ATTACKS.get(name).supported_norms == ("l2",)
    with pytest.raises(ConfigError, match=f"attack '{name}' does not support norm 'linf'; supported: l2"):
        build_attacks(EvalConfig(attacks=[name]), LINF, num_classes=10)


@pytest.mark.parametrize("flags, fragment", [
    (["--attacks", "cw", "--norm", "linf"], "does not support norm 'linf'; supported: l2"),
    (["--attacks", "square", "--queries", "0"], "eval.queries"),
])
def test_the_cli_prints_the_error_and_exits_2(tmp_path, flags, fragment):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(RunConfig().model_dump(mode="json")))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), *flags])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert isinstance(result.exception, SystemExit) and not isinstance(result.exception, FortifyError)


# -- labels, models and modes that a call gets wrong ------------------------------------------

UNTARGETED = {
    "pgd": lambda: PGD(LINF, steps=2),
    "fgsm": lambda: FGSM(LINF),
    "apgd-dlr": lambda: APGD(LINF, n_iter=2, loss="dlr"),
    "square": lambda: Square(LINF, n_queries=2),
    "fmn": lambda: FMN(L2, steps=2),
    "cw": lambda: CarliniWagnerL2(L2, steps=2, binary_search_steps=1),
    "hopskipjump": lambda: HopSkipJump(LINF, max_queries=20),
}
MINIMAL = ("fmn", "cw", "hopskipjump")


@pytest.mark.parametrize("name", sorted(UNTARGETED))
@pytest.mark.parametrize("labels, fragment", [
    (torch.tensor([0, 1, 3, 0]), r"labels range over \[0, 3\] but the model has 3 classes"),
    (torch.tensor([0, 1, -1, 0]), "labels must be class indices 0..K-1, got -1"),
    (torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer class indices, got dtype torch.float32"),
])
def test_bad_labels_are_named_by_every_attack(name, labels, fragment):
    x, _ = _batch()
    with pytest.raises(DataError, match=fragment):
        UNTARGETED[name]()(_Counting(), x, labels)


@pytest.mark.parametrize("name", MINIMAL)
def test_a_label_past_the_models_classes_is_named_by_minimal_searches(name):
    # Prepare: a 3-class model and a label 3
    x, _ = _batch()
    labels = torch.tensor([0, 1, 3, 0])
    # Execute / Assert: the same DataError as the attack's call, not a bare torch error or distance 0
    with pytest.raises(DataError, match=r"labels range over \[0, 3\] but the model has 3 classes "
                                        r"\(allowed: 0\.\.2\)"):
        UNTARGETED[name]().minimal(_Counting(), x, labels)


def test_int32_labels_give_the_points_of_int64_ones():
    x, y = _batch()
    model = _Counting()
    assert torch.equal(PGD(LINF, steps=3)(model, x, y.int()), PGD(LINF, steps=3)(model, x, y))


def test_a_target_given_to_an_untargeted_attack_is_refused():
    x, y = _batch()
    with pytest.raises(ConfigError, match="untargeted and would ignore target="):
        PGD(LINF, steps=2)(_Counting(), x, y, target=(y + 1) % 3)


@pytest.mark.parametrize("model, x, fragment", [
    (_Counting(), torch.rand(4, 1, 2, 2, dtype=torch.float64), "does not run on these inputs"),
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0)), torch.rand(4, 1, 2, 2),
     "must return logits of shape"),
])
def test_a_model_that_cannot_serve_the_attack_is_named(model, x, fragment):
    with pytest.raises(DataError, match=fragment):
        PGD(LINF, steps=2)(model, x, torch.tensor([0, 1, 2, 0]))


class _FrozenNorm(nn.Module):
    """A model in training mode whose batch norm is frozen (eval), as in fine-tuning."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        self.train()
        self.body[2].eval()


@pytest.mark.parametrize("name", sorted(UNTARGETED))
def test_an_attack_gives_every_submodule_its_mode_back(name):
    model = _FrozenNorm()
    x, y = _batch()
    UNTARGETED[name]()(model.body, x, y)
    assert model.training and model.body.training and not model.body[2].training


@pytest.mark.parametrize("minimal", [
    lambda m, x, y: HopSkipJump(LINF, max_queries=40).minimal(m, x, y)[1],
    lambda m, x, y: FMN(LINF, steps=3).minimal(m, x, y),
    lambda m, x, y: CarliniWagnerL2(L2, steps=3, binary_search_steps=1).minimal(m, x, y),
], ids=["hopskipjump", "fmn", "cw"])
def test_minimal_distance_searches_give_every_submodule_its_mode_back(minimal):
    model = _FrozenNorm()
    x, y = _batch()
    minimal(model.body, x, y)
    assert model.training and model.body.training and not model.body[2].training


@pytest.mark.parametrize("name", ["fgsm", "square"])
def test_l2_attacks_in_float16_return_finite_points_in_the_ball(name):
    # a zero gradient (FGSM) or window (Square) was divided by a norm clamped at 1e-12: 0 in float16
    threat = ThreatModel("l2", 1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model[1].weight.data.mul_(1e-9)  # gradients that vanish in float16
    model = model.half().eval()
    x = torch.zeros(4, 1, 8, 8, dtype=torch.half)
    x[:, :, 2:6, 2:6] = 0.5
    attack = FGSM(threat) if name == "fgsm" else Square(threat, n_queries=50)
    x_adv = attack(model, x, model(x).argmax(1))
    assert torch.isfinite(x_adv).all() and threat.contains(x_adv, x).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cw_moves_pixels_on_the_box_faces_in_half_precision(dtype):
    # atanh of a face pixel was infinite in half precision: every pixel of a binary image froze
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = (torch.rand(16, 1, 8, 8) > 0.5).float()
    y = model(x).argmax(1)
    attack = CarliniWagnerL2(ThreatModel("l2", 5.0), steps=300, binary_search_steps=1, initial_const=10.0,
                             abort_early=False, learning_rate=0.1)
    _, full = attack.minimal(model, x, y)
    _, half = attack.minimal(model.to(dtype), x.to(dtype), y)
    assert torch.isfinite(full).all() and torch.isfinite(half).all()
    # a recorded point must fool by more than rounding, four units in the last place of the largest
    # logit in half precision: in bf16 (8 bits) that asks for a wider gap, so norms up to 0.05 longer
    extra = 0.06 if dtype == torch.bfloat16 else 0.0
    assert (half.float() >= full * 0.98 - 0.01).all()  # abs: a bf16 step near 1
    assert (half.float() <= full * 1.02 + 0.01 + extra).all()


def test_cw_runs_on_a_float16_model():
    # its binary search's 'unbounded' constant (1e10) overflowed float16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).half().eval()
    x = torch.rand(8, 1, 8, 8).half()
    x_adv, norms = CarliniWagnerL2(L2, steps=5, binary_search_steps=2).minimal(model, x, model(x).argmax(1))
    assert x_adv.dtype == torch.float16 and torch.isfinite(x_adv).all()
    assert not torch.isnan(norms).any()


def _buildable(name: str, norm: str) -> bool:
    try:
        ATTACKS.get(name)(ThreatModel(norm, 0.1))
    except ConfigError:  # the attack does not take this norm
        return False
    return True


@pytest.mark.parametrize(("name", "norm"), [(n, norm) for n in ATTACKS.names() for norm in ("linf", "l2")
                                            if n != "transfer" and _buildable(n, norm)])  # transfer: own test
def test_with_threat_is_the_attack_built_for_that_threat(name, norm):
    # an eps sweep re-targets one attack: every setting derived from eps (step sizes) must follow it
    factory = ATTACKS.get(name)
    moved = factory(ThreatModel(norm, 0.1)).with_threat(ThreatModel(norm, 0.4))
    assert moved.describe() == pytest.approx(factory(ThreatModel(norm, 0.4)).describe())


def test_with_threat_keeps_the_norm_the_attack_was_built_for():
    with pytest.raises(ConfigError, match="built for l2; build a new attack for linf"):
        CarliniWagnerL2(L2).with_threat(LINF)


@pytest.mark.parametrize("seed", [0.5, None, 2**64, True, float("nan")])
def test_an_attack_seed_that_is_no_integer_torch_takes_is_refused(seed):
    # 0.5 was truncated to 0 in silence, 2**64 failed inside torch at the first call
    with pytest.raises(ConfigError, match="seed must be an integer"):
        PGD(LINF, seed=seed)
    assert PGD(LINF, seed=4.0).seed == 4 and PGD(LINF, seed=-1).seed == -1



class _SquareRoot(nn.Module):
    """A model of sqrt(x): its input gradient is infinite wherever a pixel is exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.sqrt())


@pytest.mark.parametrize("make", [lambda t: FGSM(t), lambda t: PGD(t, steps=5), lambda t: APGD(t, n_iter=5),
                                  lambda t: APGD(t, n_iter=5, loss="dlr")],
                         ids=["fgsm", "pgd", "apgd-ce", "apgd-dlr"])
def test_an_infinite_input_gradient_gives_finite_l2_points(make):
    # inf / inf made the L2 step NaN, the NaN point (no class) was recorded as adversarial, and the
    # evaluation then stopped on it outside the threat model
    model = _SquareRoot()
    x = torch.rand(16, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    x[:, :, 0, 0] = 0.0
    y = model(x).argmax(1)
    threat = ThreatModel("l2", 0.5)
    x_adv = make(threat)(model, x, y)
    assert bool(torch.isfinite(x_adv).all()) and bool(threat.contains(x_adv, x).all())


def test_the_dlr_loss_of_tied_top_logits_is_finite_in_float16():
    # DLR_EPS (1e-12) is 0 in float16: tied top logits gave 0 / 0
    from fortify.attacks.apgd import dlr_loss, dlr_targeted_loss

    logits = torch.ones(2, 4, dtype=torch.float16)
    y, target = torch.tensor([0, 1]), torch.tensor([2, 3])
    assert bool(torch.isfinite(dlr_loss(logits, y)).all())
    assert bool(torch.isfinite(dlr_targeted_loss(logits, y, target)).all())


def test_fab_names_inputs_the_model_cannot_take_and_refuses_a_nan_search_count():
    # FAB.minimal let torch's RuntimeError through where FMN's names the inputs; NaN hit int()
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(5, 1, 2, 2).double(), torch.zeros(5, dtype=torch.long)
    with pytest.raises(DataError, match="the model does not run on these inputs"):
        ATTACKS.get("fab")(LINF).minimal(model, x, y)
    with pytest.raises(ConfigError, match="search_steps must be an integer >= 0"):
        ATTACKS.get("fab")(LINF, search_steps=float("nan"))


@pytest.mark.parametrize("model, x, fragment", [
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.rand(4, 1, 2, 2).double(),
     "the model does not run on these inputs"),
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0)), torch.rand(4, 1, 2, 2),
     "the model must return logits of shape (N, classes)"),
], ids=["float64-into-float32", "no-class-axis"])
def test_hopskipjump_minimal_names_inputs_and_outputs_the_model_cannot_take(model, x, fragment):
    # minimal skips Attack.run, and let torch's RuntimeError and IndexError through
    with pytest.raises(DataError, match=re.escape(fragment)):
        HopSkipJump(L2, max_queries=20).minimal(model, x, torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("name, advice", [("pgd", "build it with targeted=True"),
                                          ("hopskipjump", "it has no targeted form"),
                                          ("fab", "it has no targeted form")])
def test_target_labels_for_an_untargeted_attack_get_advice_that_can_be_followed(name, advice):
    # HopSkipJump was told to build itself with targeted=True, which its constructor does not take
    x, y = _batch()
    with pytest.raises(ConfigError, match=f"untargeted and would ignore target=; {advice}"):
        ATTACKS.get(name)(LINF)(_Counting(), x, y, target=torch.zeros_like(y))
