"""The constrained threat model: every point it or an attack returns satisfies every constraint,
projection is the nearest feasible point under linf, and the constrained set is inside the box ball."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tabular_credit import credit_table
from torch import nn

from fortify.attacks import APGD, FGSM, PGD, Square
from fortify.errors import ConfigError, DataError, ResultsError
from fortify.evaluation import evaluate
from fortify.report.compare import merge_runs
from fortify.tabular import ConstrainedThreatModel, Feature, FeatureSearch, Schema
from fortify.tabular.csv import infer_feature
from fortify.tabular.study import constraint_settings
from fortify.threat import ThreatModel

COSTS = (0.25, 0.5, 1.0, 2.0)


@st.composite
def features(draw, index: int) -> Feature:
    kind = draw(st.sampled_from(("continuous", "integer", "binary", "categorical")))
    name, mutable, cost = f"f{index}", draw(st.booleans()), draw(st.sampled_from(COSTS))
    if kind == "categorical":
        k = draw(st.integers(2, 4))
        return Feature(name, kind, categories=tuple(f"c{i}" for i in range(k)), mutable=mutable, cost=cost)
    direction = draw(st.sampled_from(("any", "increase", "decrease")))
    if kind == "binary":
        return Feature(name, kind, mutable=mutable, direction=direction, cost=cost)
    low = draw(st.integers(-5, 5))
    return Feature(name, kind, low, low + draw(st.integers(1, 12)), mutable=mutable, direction=direction,
                   cost=cost)


@st.composite
def threats(draw) -> ConstrainedThreatModel:
    n = draw(st.integers(1, 6))
    feats = [draw(features(i)) for i in range(n)]
    if not any(f.mutable for f in feats):
        feats[0] = Feature(**{**feats[0].__dict__, "mutable": True})
    eps = draw(st.sampled_from((0.05, 0.2, 0.5, 1.0, 1.5)))
    return ConstrainedThreatModel(draw(st.sampled_from(("linf", "l2"))), eps, schema=Schema(tuple(feats)))


def valid_points(schema: Schema, n: int, gen: torch.Generator) -> torch.Tensor:
    blocks = []
    for f in schema.features:
        if f.type == "categorical":
            index = torch.randint(0, f.width, (n,), generator=gen)
            blocks.append(nn.functional.one_hot(index, f.width).float())
        elif f.type == "continuous":
            blocks.append(torch.rand(n, 1, generator=gen))
        else:
            steps = int(f.span)
            blocks.append(torch.randint(0, steps + 1, (n, 1), generator=gen).float() / steps)
    return torch.cat(blocks, dim=1)


def assert_feasible(threat: ConstrainedThreatModel, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Every constraint, checked from the schema alone (not through the threat model's own code)."""
    schema, tol = threat.schema, 1e-5
    costs = torch.zeros(x.shape[0], len(schema.features), dtype=torch.float64)
    for i, f in enumerate(schema.features):
        a, c = x_adv[:, schema.columns(i)].double(), x[:, schema.columns(i)].double()
        change = (a - c).abs().amax(dim=1)
        if not f.mutable:
            assert bool((change <= tol).all()), f"immutable {f.name} changed"
        if f.type == "categorical":
            one_hot = ((a == 0) | (a == 1)).all(dim=1) & (a.sum(dim=1) == 1)
            assert bool(one_hot.all()), f"{f.name} not one-hot"
            costs[:, i] = f.cost * (a.argmax(1) != c.argmax(1)).double()
            continue
        assert bool(((a >= -tol) & (a <= 1 + tol)).all()), f"{f.name} out of bounds"
        if f.discrete:
            grid = a * f.span
            assert bool(((grid - grid.round()).abs() <= 1e-4).all()), f"{f.name} not whole"
        delta = (a - c)[:, 0]
        if f.direction == "increase":
            assert bool((delta >= -tol).all()), f"{f.name} decreased"
        if f.direction == "decrease":
            assert bool((delta <= tol).all()), f"{f.name} increased"
        costs[:, i] = f.cost * change
    total = costs.amax(dim=1) if threat.norm == "linf" else costs.pow(2).sum(dim=1).sqrt()
    assert bool((total <= threat.eps + 1e-5 * max(1, threat.eps) * 4).all()), "budget exceeded"


@settings(max_examples=60, deadline=None)
@given(threat=threats(), seed=st.integers(0, 2**16), spread=st.sampled_from((0.1, 1.0, 3.0)))
def test_projection_and_random_start_satisfy_every_constraint(threat, seed, spread):
    # Prepare: valid points and wild targets around them
    gen = torch.Generator().manual_seed(seed)
    x = valid_points(threat.schema, 16, gen)
    target = x + spread * torch.randn(x.shape, generator=gen)
    # Execute / Assert
    projected = threat.project(target, x)
    assert_feasible(threat, x, projected)
    assert bool(threat.contains(projected, x).all())
    start = threat.random_start(x, gen)
    assert_feasible(threat, x, start)
    assert bool(threat.contains(start, x).all())
    assert torch.equal(threat.project(x, x), x)  # the clean point is feasible and its own projection


@settings(max_examples=10, deadline=None)
@given(threat=threats(), seed=st.integers(0, 2**16))
def test_every_attack_returns_only_feasible_points(threat, seed):
    torch.manual_seed(seed)
    d = threat.schema.n_columns
    model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 3))
    x = valid_points(threat.schema, 12, torch.Generator().manual_seed(seed))
    y = torch.randint(0, 3, (12,))
    # Square sees the table as (N, 1, 1, D) images: the threat model takes any trailing shape
    for attack in (FGSM(threat, random_start=True), PGD(threat, steps=4), APGD(threat, n_iter=4),
                   FeatureSearch(threat, max_changes=2), Square(threat, n_queries=20, seed=seed)):
        x_adv = attack(model, x, y)
        assert_feasible(threat, x, x_adv)
        assert bool(threat.contains(x_adv, x).all()), attack.label


@pytest.mark.parametrize("mutable", [False, True])
def test_a_category_one_hot_within_the_schemas_tolerance_is_left_as_it_is(mutable):
    # Prepare: a one-hot block off by 4e-6, which check_encoded accepts (1e-5)
    schema = Schema((Feature("c", "categorical", categories=("a", "b"), mutable=mutable),
                     Feature("d", "continuous", 0, 1)))
    threat = ConstrainedThreatModel("linf", 0.3, schema=schema)
    x = torch.tensor([[0.999996, 0.000004, 0.5]], dtype=torch.float64)
    schema.check_encoded(x)
    model = nn.Linear(3, 2).double()
    y = model(x).argmax(1)
    # Execute
    projected = threat.project(x + torch.tensor([[0.1, -0.1, 0.2]], dtype=torch.float64), x)
    evaluate(model, x, y, [PGD(threat, steps=3)], threat)  # raises if a point leaves the threat model
    # Assert: the clean category keeps its exact entries, so an immutable one costs nothing
    assert torch.equal(projected[:, :2], x[:, :2])
    assert bool(threat.contains(projected, x).all())


def test_linf_projection_is_the_nearest_feasible_point():
    # Prepare: small discrete schema whose feasible set can be enumerated
    schema = Schema((Feature("n", "integer", 0, 6, direction="increase"), Feature("b", "binary", cost=0.5),
                     Feature("c", "categorical", categories=("a", "b", "c"), cost=0.5),
                     Feature("m", "integer", 0, 4, cost=2.0)))
    threat = ConstrainedThreatModel("linf", 0.5, schema=schema)
    gen = torch.Generator().manual_seed(0)
    x = valid_points(schema, 30, gen)
    target = x + torch.randn(x.shape, generator=gen)
    projected = threat.project(target, x)
    for row in range(len(x)):
        best = min(float((p - target[row]).norm()) for p in feasible_set(threat, x[row]))
        assert float((projected[row] - target[row]).norm()) == pytest.approx(best, abs=1e-6)


def _feature_values(threat: ConstrainedThreatModel) -> list[list[torch.Tensor]]:
    """Per feature, every value it may take: each one-hot of a categorical, each grid step of the rest."""
    options = []
    for f in threat.schema.features:
        if f.type == "categorical":
            options.append([nn.functional.one_hot(torch.tensor(k), f.width).float() for k in range(f.width)])
        else:
            options.append([torch.tensor([k / f.span]) for k in range(int(f.span) + 1)])
    return options


def feasible_set(threat: ConstrainedThreatModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Every point of the 1-D grids and one-hot groups, filtered by the threat model's definition."""
    options = _feature_values(threat)
    points = [torch.cat(combo) for combo in itertools.product(*options)]
    return [p for p in points if bool(threat.contains(p[None], x[None]))]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_whole_step_that_costs_exactly_eps_survives_projection_from_every_clean_value(norm):
    # eps 0.1 is one step of a 0..10 integer; stored in float32, k/10 rounds either way, and the l2
    # budget once dropped the step for k = 7 and 9 (FeatureSearch then missed the point it leads to)
    schema = Schema((Feature("accounts", "integer", 0, 10), Feature("rate", "continuous", 0, 1)))
    threat = ConstrainedThreatModel(norm, 0.1, schema=schema)
    for k in range(10):
        x = schema.encode({"accounts": [k], "rate": [0.5]})
        step = x.clone()
        step[0, 0] = (k + 1) / 10
        assert threat.contains(step, x).all()
        assert round(float(threat.project(step, x)[0, 0]) * 10) == k + 1, k


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dear", [1.0, 1e5, 1e6])
def test_a_dear_feature_leaves_the_budget_of_the_cheap_ones_as_it_is(norm, dear):
    # Prepare: a nearly immutable feature (cost 1e5 or 1e6) beside cheap ones; the budget's slack
    # once grew with the dearest cost and let the cheap features move five times eps
    schema = Schema((Feature("n", "integer", 0, 10), Feature("m", "integer", 0, 10),
                     Feature("rate", "continuous", 0, 1), Feature("dear", "continuous", 0, 1, cost=dear)))
    threat = ConstrainedThreatModel(norm, 0.1, schema=schema)
    x = schema.encode({"n": [5], "m": [5], "rate": [0.5], "dear": [0.5]})
    far, two_steps = x.clone(), x.clone()
    far[0, 2] = 0.6 + 1e-4  # just over eps
    two_steps[0, :2] += 0.1  # a step on n and on m: l2 cost sqrt(2) * eps
    # Execute
    projected = threat.project(two_steps, x)
    # Assert
    assert not threat.contains(far, x).any()
    assert threat.contains(projected, x).all()
    assert float(threat.distance(projected, x)) <= 0.1 * (1 + 1e-6)


def test_contains_refuses_each_kind_of_violation(schema):
    threat = ConstrainedThreatModel("linf", 0.2, schema=schema)
    x = schema.encode(credit_table(6, seed=1))
    breaks = {
        "immutable age": (0, 1 / 62),
        "fractional accounts": (2, 0.5 / 20),
        "accounts decreased": (2, -1 / 20),
        "over budget": (1, 0.25),
    }
    for what, (column, shift) in breaks.items():
        bad = x.clone()
        bad[:, column] = bad[:, column] + shift if shift > 0 else bad[:, column] + shift
        keep = (bad[:, column] >= 0) & (bad[:, column] <= 1)
        assert not bool(threat.contains(bad, x)[keep].any()), what
    half = x.clone()
    half[:, 4:7] = 0.5
    assert not bool(threat.contains(half, x).any()), "broken one-hot"


def test_constrained_points_lie_inside_the_plain_box_ball(schema):
    # With every cost >= 1 on continuous/integer features the constrained set is a subset of the
    # linf ball, so a constrained attack can be at most as strong as the unconstrained one.
    unit = schema.replace_features(cost=1.0)
    threat = ConstrainedThreatModel("linf", 0.15, schema=unit)
    box = ThreatModel("linf", 1.0, (0.0, 1.0)).with_eps(0.15)
    x = unit.encode(credit_table(64, seed=2))
    gen = torch.Generator().manual_seed(0)
    projected = threat.project(x + torch.randn(x.shape, generator=gen), x)
    inside_box = box.contains(projected, x)
    switched = (projected[:, 4:7] != x[:, 4:7]).any(dim=1) | (projected[:, 7] != x[:, 7])
    # a category switch or binary flip changes a column by 1 > eps: allowed only if its cost <= eps
    assert not bool(switched.any()) and bool(inside_box.all())


def test_pgd_on_a_linear_model_reaches_the_closed_form_worst_case():
    # Prepare: continuous features with bounds, costs, directions and an immutable one
    schema = Schema((Feature("a", "continuous", 0, 1), Feature("b", "continuous", 0, 1, cost=2.0),
                     Feature("c", "continuous", 0, 1, direction="increase"),
                     Feature("d", "continuous", 0, 1, direction="decrease"),
                     Feature("e", "continuous", 0, 1, mutable=False)))
    threat = ConstrainedThreatModel("linf", 0.2, schema=schema)
    model = nn.Linear(5, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0], [-1.0, 1.0, -0.5, -1.0, 0.0]]))
        model.bias.zero_()
    x = torch.rand(40, 5, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(40, dtype=torch.long)
    # Closed form: lowering the class-0 margin w = w0 - w1 moves each feature against sign(w),
    # as far as its cap eps / cost, the box and its direction allow
    w = model.weight[0] - model.weight[1]
    cap = torch.tensor([0.2, 0.1, 0.2, 0.2, 0.0])
    lower = torch.maximum(-x, -cap)
    upper = torch.minimum(1 - x, cap)
    lower[:, 2], upper[:, 3] = 0.0, 0.0
    expected = x + torch.where(w > 0, lower, upper)
    # Execute
    x_adv = PGD(threat, steps=20, random_start=False, keep_first_success=False)(model, x, y)
    # Assert
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)


def test_feature_search_fools_exactly_the_examples_the_closed_form_can_fool():
    # Prepare: a linear two-class model over discrete features; under linf the worst case is the
    # sum of each feature's own worst move, which greedy single-feature search reaches
    schema = Schema((Feature("n", "integer", 0, 10, direction="increase"), Feature("g", "binary", cost=0.3),
                     Feature("c", "categorical", categories=("a", "b", "c", "d"), cost=0.3),
                     Feature("k", "categorical", categories=("u", "v"), mutable=False)))
    threat = ConstrainedThreatModel("linf", 0.3, schema=schema)
    torch.manual_seed(3)
    model = nn.Linear(schema.n_columns, 2)
    x = valid_points(schema, 200, torch.Generator().manual_seed(1))
    y = model(x).argmax(1)  # every example starts correct
    w = (model.weight[1] - model.weight[0]).detach()  # the attack wants to move the margin towards class !y
    sign = torch.where(y == 0, 1.0, -1.0)[:, None]
    gain = torch.zeros(len(x))
    for x_star in feasible_set_batch(threat, x):
        gain = torch.maximum(gain, (sign * (x_star - x) * w).sum(dim=1))
    margin = (sign[:, 0] * (x @ w + (model.bias[1] - model.bias[0]).detach()))
    can_fool = margin + gain > 0
    # Execute
    x_adv = FeatureSearch(threat, max_changes=4)(model, x, y)
    fooled = model(x_adv).argmax(1) != y
    # Assert
    assert 0 < int(can_fool.sum()) < len(x)
    assert torch.equal(fooled, can_fool)


def test_feature_search_holds_a_bounded_block_of_candidates_and_finds_the_same_points(monkeypatch):
    # Prepare: 40 one-hot columns of 25 categories (1,000 moves a row); the search once built every
    # row's candidates at once (n x 1,000 x 1,000 values)
    from fortify.tabular import search

    schema = Schema(tuple(Feature(f"c{i}", "categorical", categories=tuple("abcdefghijklmnopqrstuvwxy"))
                          for i in range(40)))
    threat = ConstrainedThreatModel("linf", 1.0, schema=schema)
    torch.manual_seed(0)
    model = nn.Linear(schema.n_columns, 3)
    x = valid_points(schema, 24, torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    unbounded = FeatureSearch(threat, max_changes=2)(model, x, y)
    held: list[int] = []
    build = FeatureSearch.candidates

    def recording(self, current, clean):
        held.append(len(current))
        return build(self, current, clean)

    monkeypatch.setattr(FeatureSearch, "candidates", recording)
    monkeypatch.setattr(search, "_CHUNK", 5_000)  # 5 rows of 1,000 moves
    # Execute
    blocked = FeatureSearch(threat, max_changes=2)(model, x, y)
    # Assert
    assert max(held) == 5 and torch.equal(blocked, unbounded)


def test_feature_search_runs_on_a_float64_model_and_finds_its_float32_points():
    # Prepare: the same linear model and rows in float32 and float64; the search scored its
    # candidates in float32 whatever the model's dtype, and a float64 model stopped it with an
    # index-put error
    schema = Schema((Feature("n", "integer", 0, 10), Feature("g", "binary", cost=0.3),
                     Feature("c", "categorical", categories=("a", "b", "c"), cost=0.3)))
    threat = ConstrainedThreatModel("linf", 0.3, schema=schema)
    torch.manual_seed(0)
    model = nn.Linear(schema.n_columns, 2)
    x = valid_points(schema, 32, torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    single = FeatureSearch(threat, max_changes=3)(model, x, y)
    # Execute
    double = FeatureSearch(threat, max_changes=3)(model.double(), x.double(), y)
    # Assert
    assert double.dtype == torch.float64
    assert bool(threat.contains(double, x.double()).all())
    torch.testing.assert_close(double.float(), single, atol=1e-6, rtol=0)


def feasible_set_batch(threat: ConstrainedThreatModel, x: torch.Tensor):
    """All feasible points for every row at once: yields (N, d) per combination of feature values."""
    options = _feature_values(threat)
    for combo in itertools.product(*options):
        point = torch.cat(combo).expand_as(x)
        inside = threat.contains(point, x)
        yield torch.where(inside[:, None], point, x)


def test_bad_threat_settings_are_config_errors(schema):
    with pytest.raises(ConfigError, match="every feature immutable"):
        ConstrainedThreatModel("linf", 0.1, schema=schema.replace_features(mutable=False))
    with pytest.raises(ConfigError, match="unknown norm 'l1'"):
        ConstrainedThreatModel("l1", 0.1, schema=schema)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a tabular threat model"):
        FeatureSearch(ThreatModel("linf", 0.1))
    assert math.isclose(ConstrainedThreatModel("linf", 0.1, schema=schema).with_eps(0.3).eps, 0.3)


def test_inputs_of_another_width_than_the_schema_are_a_data_error(schema):
    # rows encoded under another schema once met a broadcasting RuntimeError in contains and project
    threat = ConstrainedThreatModel("linf", 0.1, schema=schema)
    x = torch.zeros(3, schema.n_columns - 1)
    for method in (threat.contains, threat.project):
        with pytest.raises(DataError, match=f"the schema has {schema.n_columns} model columns"):
            method(x, x)


def test_a_whole_number_feature_with_a_wide_range_keeps_clean_points_inside():
    # Prepare: an income in whole dollars, inferred as integer from a CSV column, spans 1e5+ grid steps,
    # finer than float32 stores k / span exactly: the clean encoding is a little off the grid and must
    # still count as whole
    gen = torch.Generator().manual_seed(0)
    n = 64
    incomes = [20148, 139980] + torch.randint(20148, 139981, (n - 2,), generator=gen).tolist()
    income = infer_feature("income", [str(v) for v in incomes], {})
    assert (income.type, income.span) == ("integer", 139980 - 20148)
    schema = Schema((income, Feature("rate", "continuous", 0, 1),
                     Feature("kind", "categorical", categories=("a", "b"))))
    table = {"income": incomes, "rate": torch.rand(n, generator=gen).tolist(), "kind": ["a", "b"] * (n // 2)}
    x = schema.encode(table)
    threat = ConstrainedThreatModel("linf", 0.05, schema=schema)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(schema.n_columns, 16), nn.ReLU(), nn.Linear(16, 2))
    y = torch.randint(0, 2, (n,), generator=gen)
    # Execute / Assert: the clean rows, then what each attack returns, are feasible and whole
    schema.check_encoded(x)
    assert bool(threat.contains(x, x).all())
    for attack in (PGD(threat, steps=5), FeatureSearch(threat, max_changes=2)):
        x_adv = attack(model, x, y)
        assert bool(threat.contains(x_adv, x).all()), attack.label
        dollars = x_adv[:, 0].double() * schema.features[0].span
        assert bool(((dollars - dollars.round()).abs() < 0.01).all()), f"{attack.label}: income not whole"
        assert not torch.equal(x_adv[:, 0], x[:, 0]), f"{attack.label} never moved the income"


def test_check_encoded_still_refuses_a_fraction_of_a_wide_whole_number():
    schema = Schema((Feature("income", "integer", 0, 100_000),))
    x = schema.encode({"income": [12_345]})
    with pytest.raises(DataError, match="not a whole number"):
        schema.check_encoded(x + 0.5 / 100_000)
    assert not bool(ConstrainedThreatModel("linf", 0.1, schema=schema).contains(x + 0.5 / 100_000, x).any())


def test_results_record_the_constraints_so_runs_under_other_ones_do_not_compare(schema):
    # Prepare: the same model attacked under the schema and with two more features frozen
    frozen = Schema(tuple(replace(f, mutable=False) if f.name in ("income", "accounts") else f
                          for f in schema.features), schema.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(schema.n_columns, 2))
    x = schema.encode(credit_table(20))
    y = model(x).argmax(1)

    def run(name, threat):
        report = evaluate(model, x, y, [FGSM(threat)], threat)
        return {"source": f"{name}/results.json", "threat": report.threat, "dataset": {"name": "csv"},
                "models": {"m": {"robustness": report.to_dict()}}, "provenance": {}}

    # Execute
    runs = [run(name, ConstrainedThreatModel("linf", 0.2, schema=s))
            for name, s in (("free", schema), ("frozen", frozen))]
    # Assert: the record says which features move; compare refuses to line the two up
    assert runs[0]["threat"]["constraints"]["schema"] == schema.to_dict()
    assert [r["threat"]["constraints"]["description"].split(" over ")[1] for r in runs] == [
        "10 mutable of 12 features", "8 mutable of 12 features"]
    with pytest.raises(ResultsError, match="same threat model"):
        merge_runs(runs)
    assert merge_runs([runs[0], {**runs[0], "source": "again/results.json"}])["threat"] == runs[0]["threat"]


def test_the_report_names_the_constraints_in_its_threat_model(schema, tmp_path):
    # a compare refusal and the page's header both say which features move, not only the norm and eps
    from fortify.report.html import describe_threat

    threat = ConstrainedThreatModel("linf", 0.2, schema=schema)
    assert describe_threat(threat.to_dict()) == threat.describe()
    assert describe_threat(ThreatModel("linf", 0.2).to_dict()) == "linf eps=0.2"


@pytest.mark.parametrize("norm, diameter", [("linf", 1.0), ("l2", math.sqrt(2))])
def test_the_box_setting_of_an_eps_past_the_box_is_the_whole_box(norm, diameter):
    # feature costs of 2 let eps 5 stand; the plain box ball refused it, after training
    dear = Schema((Feature("a", "continuous", 0, 10, cost=2.0), Feature("b", "continuous", 0, 1, cost=2.0)))
    box = constraint_settings(ConstrainedThreatModel(norm, 5.0, schema=dear))["box"]
    assert box.eps == pytest.approx(diameter)
    x = torch.tensor([[0.0, 1.0]])
    corner = torch.tensor([[1.0, 0.0]])  # the farthest point of the box
    box.check_inputs(x)
    assert box.contains(corner, x).all()


# -- attacks that build their own perturbations, and those that cannot keep a schema ---------------

def _uniform_cost_schema(cost: float, n: int = 12) -> Schema:
    return Schema(tuple(Feature(f"f{i}", "continuous", 0, 1, cost=cost) for i in range(n)))


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.15)])
def test_square_under_a_uniform_cost_searches_the_plain_ball_it_equals(norm, eps):
    # every feature at cost 0.25: the schema's budget eps is the plain ball of 4 eps. Square built its
    # vertices at eps in model units, which the projection left at a quarter of the allowed set
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x = 0.3 + 0.4 * torch.rand(64, 12, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    constrained = ConstrainedThreatModel(norm, eps, schema=_uniform_cost_schema(0.25))
    plain = ThreatModel(norm, 4 * eps)
    x_schema = Square(constrained, n_queries=200, seed=3)(model, x, y)
    x_plain = Square(plain, n_queries=200, seed=3)(model, x, y)
    torch.testing.assert_close(x_schema, x_plain, atol=1e-5, rtol=0)
    assert float(constrained.distance(x_schema, x).max()) == pytest.approx(eps, rel=1e-4)


def test_square_spends_the_whole_l2_budget_on_the_mutable_features():
    # half the features immutable: Square's l2 perturbation used to spread over them too, and the
    # projection's reset of those left the point short of the budget
    features = tuple(Feature(f"f{i}", "continuous", 0, 1, mutable=i % 2 == 0) for i in range(12))
    threat = ConstrainedThreatModel("l2", 0.1, schema=Schema(features))
    model = nn.Linear(12, 2)
    with torch.no_grad():  # a wide margin: nothing falls, and every answer is a point of the search
        model.weight.copy_(torch.tensor([[0.1] * 12, [-0.1] * 12]))
        model.bias.copy_(torch.tensor([5.0, 0.0]))
    x = 0.4 + 0.2 * torch.rand(16, 12, generator=torch.Generator().manual_seed(0))
    x_adv = Square(threat, n_queries=30)(model, x, torch.zeros(16, dtype=torch.long))
    assert_feasible(threat, x, x_adv)
    assert bool((threat.distance(x_adv, x) >= 0.1 * (1 - 1e-4)).all())


@pytest.mark.parametrize("name, norm", [("fmn", "linf"), ("fab", "linf"), ("fab-t", "l2"), ("cw", "l2"),
                                        ("hopskipjump", "linf")])
def test_an_attack_that_searches_the_plain_ball_refuses_a_schema(schema, name, norm):
    # HopSkipJump moved immutable features in every candidate, so none was in the threat model, and
    # its robust accuracy equalled the clean one; FMN's margins all read 0
    from fortify.attacks.base import ATTACKS

    threat = ConstrainedThreatModel(norm, 0.1, schema=schema)
    with pytest.raises(ConfigError, match=f"'{name}' searches the plain {norm} ball.*use: apgd-ce"):
        ATTACKS.get(name)(threat)
    plain = ATTACKS.get(name)(ThreatModel(norm, 0.1))
    with pytest.raises(ConfigError, match="cannot keep a feature schema"):
        plain.with_threat(threat)


def test_the_analysis_margin_under_a_schema_is_the_first_sweep_eps_the_closed_form_says_fools():
    # Prepare: a linear model on continuous features of several costs, one immutable. Lowering the
    # margin z_y - z_other at budget e moves each mutable feature f against w_f by min(e / cost_f, the
    # room to its box face), so the example falls first at the sweep's smallest e where
    # sum_f |w_f| min(e / cost_f, room_f) exceeds the margin
    from fortify.evaluation.analysis import AnalysisOptions, analyse

    costs = (0.5, 1.0, 2.0, 1.0, 0.5, 1.0)
    features = tuple(Feature(f"f{i}", "continuous", 0, 1, cost=c, mutable=i != 3)
                     for i, c in enumerate(costs))
    eps = 0.05
    threat = ConstrainedThreatModel("linf", eps, schema=Schema(features))
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    with torch.no_grad():  # the boundary through the centre: distances from 0 to past 4 eps
        model.bias.copy_(torch.tensor([-0.5 * float(model.weight[0].sum() - model.weight[1].sum()), 0.0]))
    x = 0.2 + 0.6 * torch.rand(60, 6, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    pgd = PGD(threat, steps=10)
    report = evaluate(model, x, y, [pgd], threat, eps_grid=[])
    # Execute
    analysis = analyse(model, x, y, threat, attack=pgd, report=report, num_classes=2,
                       options=AnalysisOptions(margin_examples=60, margin_steps=30, certify_examples=2,
                                               certify_n=20, masking_examples=8))
    # Assert
    w = (model.weight[0] - model.weight[1]).detach().double()
    sign = torch.where(y == 0, 1.0, -1.0).double()[:, None]  # the margin's gradient is sign * w
    margin = (sign[:, 0] * (x.double() @ w + float(model.bias[0] - model.bias[1])))
    room = torch.where(sign * w > 0, x.double(), 1 - x.double())  # lowering moves against sign * w
    mutable = torch.tensor([i != 3 for i in range(6)])
    cost = torch.tensor(costs, dtype=torch.float64)
    expected = []
    for i in range(len(x)):
        reach = [float((w.abs() * torch.minimum(k * eps / 4 / cost, room[i]))[mutable].sum())
                 for k in range(1, 17)]
        falls = [k * eps / 4 for k, r in zip(range(1, 17), reach, strict=True) if r > float(margin[i])]
        expected.append(falls[0] if falls else math.inf)
    assert analysis.margin["attack"] == "pgd-30 sweep"
    assert analysis.margin["distances"] == pytest.approx(expected, rel=1e-9)
    assert any(math.isinf(d) for d in expected) and any(d <= eps for d in expected)


def test_the_autoattack_preset_is_refused_under_a_schema_with_the_attacks_to_name_instead(schema):
    from fortify.config import EvalConfig
    from fortify.pipeline import build_attacks

    threat = ConstrainedThreatModel("linf", 0.1, schema=schema)
    with pytest.raises(ConfigError, match="autoattack preset holds fab-t.*--attacks apgd-ce,apgd-t,square"):
        build_attacks(EvalConfig(preset="autoattack"), threat, num_classes=4)
    attacks = build_attacks(EvalConfig(attacks=["apgd-ce", "apgd-t", "square"]), threat, num_classes=4)
    assert [type(a).__name__ for a in attacks] == ["APGD", "APGDTargeted", "Square"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_free_at_carries_a_perturbation_in_the_schemas_weighted_ball(norm):
    # Free AT clipped its carried perturbation to the plain ball, so a feature of cost 0.25 never got
    # past eps (PGD on the same threat moves it to eps / cost) and an immutable one moved
    from fortify.training.methods import MethodOptions, build_objective

    schema = Schema((Feature("a", "continuous", 0, 1, cost=0.25), Feature("b", "continuous", 0, 1),
                     Feature("c", "continuous", 0, 1, mutable=False)))
    threat = ConstrainedThreatModel(norm, 0.1, schema=schema)
    x, y = torch.full((2, 3), 0.5), torch.tensor([0, 1])
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    free = build_objective("free", MethodOptions(threat, free_replays=8))
    for _ in range(8):
        loss = free(model, x, y)
        model.zero_grad()
        loss.backward()
        free.after_backward(model)
    delta = free.delta
    assert bool((delta[:, 2] == 0).all())  # immutable
    assert float(threat.distance(x + delta, x).max()) == pytest.approx(0.1, rel=1e-5)  # the whole budget
    if norm == "linf":  # each feature to its own cap: eps / cost
        torch.testing.assert_close(delta[:, :2].abs(), torch.tensor([[0.4, 0.1], [0.4, 0.1]]))


def test_the_l2_ascent_direction_has_unit_weighted_norm_for_a_vanishing_gradient():
    # a saturated softmax's gradient (1e-20) had its norm clamped to 1e-12: a step of length 1e-8
    schema = Schema((Feature("a", "continuous", 0, 1, cost=0.5), Feature("b", "continuous", 0, 1, cost=2.0)))
    threat = ConstrainedThreatModel("l2", 1.0, schema=schema)
    for scale in (1.0, 1e-20):
        step = threat.ascent_direction(torch.tensor([[3.0, -4.0]]) * scale)
        weighted = (step.double() * torch.tensor([0.5, 2.0], dtype=torch.float64)).norm()
        assert float(weighted) == pytest.approx(1.0, rel=1e-6)
