"""The report's figures as drawn: tick labels, legends, which curves and which points are shown.

Each plot function hands its Figure to ``plots.to_data_uri``; the tests catch it there and look at
the axes instead of the PNG. Built from small hand-written results, no model is trained.
"""

from __future__ import annotations

from typing import Any

import pytest
from matplotlib.figure import Figure

from fortify.report import plots


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """The figures the plot functions draw, in order (their data URIs are not made)."""
    figures: list[Figure] = []
    monkeypatch.setattr(plots, "to_data_uri", lambda fig: figures.append(fig) or "uri")
    return figures


def _membership(attack: str, auc: float) -> dict[str, Any]:
    return {"attack": attack, "auc": auc, "roc_fpr": [0.0, 0.001, 0.01, 0.1, 1.0],
            "roc_tpr": [0.0, 0.002, 0.03, 0.2, 1.0]}


def _model(aucs: dict[str, float] | None = None, worst_case: float = 0.3) -> dict[str, Any]:
    """What the shared figures read of one model: eps curve, margins, certificates, membership."""
    aucs = aucs or {"loss": 0.6}
    return {
        "robustness": {"clean_accuracy": 0.9, "worst_case_accuracy": worst_case,
                       "eps_curve": [{"eps": 0.05, "accuracy": 0.6}, {"eps": 0.1, "accuracy": 0.4}]},
        "analysis": {"margin": {"norm": "linf", "eps": 0.1, "distances": [0.05, 0.2, None]},
                     "certified": {"sigma": 0.25, "curve": {"radii": [0.0, 0.5], "accuracy": [0.9, 0.4]},
                                   "radii": [0.1, 0.3], "l2_margin": [0.4, None]}},
        "privacy": {"membership": [_membership(attack, auc) for attack, auc in aucs.items()]},
    }


def _legend_texts(fig: Figure) -> list[str]:
    return [text.get_text() for ax in fig.axes if ax.get_legend()
            for text in ax.get_legend().get_texts()]


def test_the_log_axes_of_the_membership_roc_have_plain_tick_labels(drawn):
    # Prepare / Execute
    plots.membership_roc({"pgd": _model()})
    fig = drawn[0]
    fig.canvas.draw()  # tick labels get their text when drawn
    # Assert: numbers, not mathtext source printed as text ('$\mathdefault{10^{-4}}$')
    ax = fig.axes[0]
    labels = [t.get_text() for t in (*ax.get_xticklabels(which="both"), *ax.get_yticklabels(which="both"))]
    assert labels and not [label for label in labels if "$" in label or "mathdefault" in label]
    assert {"0.0001", "0.01", "1"} <= {t.get_text() for t in ax.get_xticklabels()}


@pytest.mark.parametrize("draw", [
    lambda models: plots.eps_curves(models, "linf", 0.1),
    plots.margin_distributions, plots.certified_curves, plots.radius_vs_margin, plots.membership_roc,
], ids=["eps", "margin", "certified", "radius_vs_margin", "roc"])
def test_a_model_name_starting_with_an_underscore_stays_in_the_legend(drawn, draw):
    # Prepare: a run directory called '_baseline' (matplotlib leaves out labels starting with "_")
    models = {"_baseline/standard": _model(), "r1/pgd": _model()}
    # Execute
    draw(models)
    # Assert
    texts = _legend_texts(drawn[0])
    assert [t for t in texts if t.startswith("_baseline/standard")], texts
    assert [t for t in texts if t.startswith("r1/pgd")], texts


def test_feature_change_bars_keep_an_attack_label_starting_with_an_underscore(drawn):
    # Prepare / Execute
    plots.feature_changes("net", [{"attack": "_custom", "examples": 3, "counts": {"age": 1},
                                   "rates": {"age": 0.33}}])
    # Assert
    assert _legend_texts(drawn[0]) == ["_custom (3 fooled)"]


def test_the_membership_roc_draws_each_models_strongest_attack_only(drawn):
    # Prepare: two models with three attacks each; the strongest differs between them
    models = {"a": _model({"loss": 0.70, "entropy": 0.55, "confidence": 0.60}),
              "b": _model({"loss": 0.52, "entropy": 0.65, "confidence": 0.58}),
              "no audit": {"robustness": {}}}
    # Execute
    plots.membership_roc(models)
    # Assert: one curve per audited model (and the chance line), the legend naming model and attack
    ax = drawn[0].axes[0]
    assert len(ax.get_lines()) == 3
    assert _legend_texts(drawn[0]) == ["a: loss (AUC 0.70)", "b: entropy (AUC 0.65)", "chance"]


def test_the_tradeoff_plot_shows_a_model_whose_auc_is_below_chance(drawn):
    # Prepare: one model's strongest attack does worse than chance
    models = {"leaky": _model({"loss": 0.8}, worst_case=0.1), "odd": _model({"loss": 0.40}, worst_case=0.5)}
    # Execute
    plots.privacy_tradeoff(models)
    # Assert: every point lies inside the axes
    low, high = drawn[0].axes[0].get_ylim()
    assert low < 0.40 and high > 0.8


def _classes(count: int) -> dict[str, Any]:
    scores = {"f1": [0.5] * count, "macro_f1": 0.5, "confusion": [[1] * count for _ in range(count)]}
    return {"clean": scores, "adversarial": scores}


@pytest.mark.parametrize("draw", [plots.class_f1, plots.confusion])
def test_per_class_figures_name_the_classes_when_the_dataset_does(drawn, draw):
    # Execute: a dataset with named classes, then names that do not fit the classes drawn
    draw("m", _classes(2), ["no", "yes"])
    draw("m", _classes(2), ["only one"])
    # Assert: the names where they fit, the class indices otherwise
    named, mismatched = (fig.axes[0] for fig in drawn)
    assert [t.get_text() for t in named.get_xticklabels()] == ["no", "yes"]
    mismatched.figure.canvas.draw()  # tick labels are formatted when drawn
    assert [t.get_text() for t in mismatched.get_xticklabels()] == ["0", "1"]
    if draw is plots.confusion:
        assert [t.get_text() for t in named.get_yticklabels()] == ["no", "yes"]


def test_a_runs_dataset_summary_carries_its_class_names():
    from fortify.data import load_dataset

    assert load_dataset("digits").summary()["class_names"] == [str(i) for i in range(10)]


def test_a_gallery_example_whose_attack_met_nan_logits_says_so(drawn):
    # the analysis records NO_CLASS (-1) for a row of NaN logits; "-> -1" would read as a class
    pixels = [[[0.2, 0.4], [0.6, 0.8]]]
    example = {"label": 3, "clean_prediction": 3, "adversarial_prediction": -1, "clean": pixels,
               "adversarial": pixels}
    plots.gallery("m", {"examples": [example]})
    titles = [ax.get_title() for ax in drawn[0].axes]
    assert titles[:2] == ["3 -> 3", "-> NaN"]


def test_nulls_the_schema_allows_leave_out_their_bars_and_read_n_a_not_the_figure(drawn):
    # Prepare: a model whose margin under attack was -inf (NaN logits; JSON null), and a class report
    # whose F1 could not be computed for one class and for the macro average under attack
    shift = {"entropy": {"clean_mean": 0.2, "adversarial_mean": 0.6},
             "margin": {"clean_mean": 4.0, "adversarial_mean": None}}
    classes = {"clean": {"f1": [0.9, 0.8], "macro_f1": 0.85},
               "adversarial": {"f1": [0.4, None], "macro_f1": None}}
    # Execute
    plots.confidence_shift({"pgd": {"analysis": {"metrics": shift}}})
    plots.class_f1("pgd", classes)
    plots.margin_distributions({"pgd": {"analysis": {"margin": {"norm": "linf", "eps": None,
                                                                 "distances": [0.1, None]}}}})
    confidence, f1, margins = drawn
    # Assert: every figure drawn; the null bar has no height, the legend says n/a
    margin_bars = [patch.get_height() for patch in confidence.axes[1].patches]
    assert margin_bars[0] == 4.0 and margin_bars[1] != margin_bars[1]  # NaN: no bar
    assert _legend_texts(f1) == ["clean (macro 0.85)", "under attack (macro n/a)"]
    heights = [patch.get_height() for patch in f1.axes[0].patches]
    assert heights[2] == 0.4 and heights[3] != heights[3]
    assert _legend_texts(margins) == ["pgd"]


def test_a_confusion_matrix_with_a_non_finite_count_is_drawn_without_that_count(drawn):
    # Prepare: an edited results file (the schema does not read the confusion matrices)
    classes = {"clean": {"confusion": [[3, 1], [0, float("inf")]]},
               "adversarial": {"confusion": [[1, 3], [2, 2]]}}
    # Execute
    plots.confusion("pgd", classes)
    # Assert: the finite counts are written in their cells, the infinite one is not
    written = sorted(text.get_text() for text in drawn[0].axes[0].texts)
    assert written == ["1", "3"]
