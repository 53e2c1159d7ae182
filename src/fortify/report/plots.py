"""The report's figures: matplotlib drawings of results.json's numbers, embedded as PNG data URIs.

Each function takes the plain dicts of results.json (never tensors or models), so a report can be
redrawn from a results file alone. A figure whose data are missing is not drawn: the caller gets
``None`` and the page says what is missing.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to memory

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from fortify.models.predictions import NO_CLASS

# Labels are model, class and feature names taken as they are: "$" in a name is text, never mathtext
# (which would fail on a name like "m$\frac{$" and lose the figure). Matplotlib's own log-axis tick
# labels are mathtext, so log axes get plain ones (_plain_log_ticks).
_STYLE = {"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
          "axes.spines.top": False, "axes.spines.right": False, "text.parse_math": False}


@contextmanager
def _figure(width: float = 5.0, height: float = 3.2, ncols: int = 1) -> Iterator[tuple[Figure, Any]]:
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
        try:
            yield fig, axes[0] if ncols > 1 else axes[0][0]
        finally:
            plt.close(fig)


def _legend(ax: Axes, handles: list[Artist], **kwargs: Any) -> None:
    """A legend of ``handles`` under their labels, handed over explicitly: matplotlib's own gathering
    skips every label that starts with "_" (its mark for 'leave out'), and a run directory may be
    called '_baseline'."""
    ax.legend(handles, [handle.get_label() for handle in handles], **kwargs)


def _plain_log_ticks(ax: Axes) -> None:
    """Tick labels as plain numbers ('0.001'): the default ones are mathtext, printed raw as
    '$\\mathdefault{10^{-3}}$' while text.parse_math is off."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())


def to_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def eps_curves(models: dict[str, dict[str, Any]], norm: str, eps: float) -> str | None:
    """Accuracy versus eps per model, with the clean point at eps 0 and the run's eps marked."""
    curves = {name: m["robustness"] for name, m in models.items() if m.get("robustness", {}).get("eps_curve")}
    if not curves:
        return None
    with _figure() as (fig, ax):
        handles = []
        for name, rob in curves.items():
            points = [(0.0, rob["clean_accuracy"])] + [(p["eps"], p["accuracy"]) for p in rob["eps_curve"]]
            handles += ax.plot(*zip(*points), marker="o", label=name)
        handles.append(ax.axvline(eps, color="grey", linestyle="--", linewidth=1, label=f"eps = {eps:.3g}"))
        ax.set(xlabel=f"eps ({norm})", ylabel="accuracy", ylim=(-0.02, 1.02))
        _legend(ax, handles)
        return to_data_uri(fig)


def _floats(values: list[Any]) -> np.ndarray:
    """``values`` as floats, with NaN for the nulls the results allow (a value that was not finite)."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _shown_number(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def margin_distributions(models: dict[str, dict[str, Any]]) -> str | None:
    """Empirical CDF of the minimal-norm distances: the share of examples broken within each radius."""
    margins = {name: m["analysis"]["margin"] for name, m in models.items() if m.get("analysis")}
    if not margins:
        return None
    with _figure() as (fig, ax):
        handles = []
        for name, margin in margins.items():
            d = np.array([math.inf if v is None else v for v in margin["distances"]], dtype=float)
            finite = np.sort(d[np.isfinite(d)])
            share = np.arange(1, len(finite) + 1) / len(d)
            handles += ax.step(np.concatenate([[0], finite]), np.concatenate([[0], share]), where="post",
                               label=name)
        eps = next(iter(margins.values()))["eps"]
        if eps is not None:
            handles.append(ax.axvline(eps, color="grey", linestyle="--", linewidth=1,
                                      label=f"eps = {eps:.3g}"))
        norm = next(iter(margins.values()))["norm"]
        ax.set(xlabel=f"minimal adversarial distance ({norm})", ylabel="share of examples broken",
               ylim=(-0.02, 1.02))
        _legend(ax, handles)
        return to_data_uri(fig)


def certified_curves(models: dict[str, dict[str, Any]]) -> str | None:
    """Certified accuracy versus L2 radius (randomized smoothing) per model."""
    certified = {name: m["analysis"]["certified"] for name, m in models.items() if m.get("analysis")}
    if not certified:
        return None
    # models certified at other noise levels (a gaussian-trained one at its own) each name theirs
    sigmas = {cert["sigma"] for cert in certified.values()}
    shared = f", sigma = {next(iter(sigmas)):g}" if len(sigmas) == 1 else ""
    with _figure() as (fig, ax):
        handles = []
        for name, cert in certified.items():
            label = name if len(sigmas) == 1 else f"{name} (sigma = {cert['sigma']:g})"
            handles += ax.plot(cert["curve"]["radii"], cert["curve"]["accuracy"], marker=".", label=label)
        ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(-0.02, 1.02),
               title=f"randomized smoothing{shared}")
        _legend(ax, handles)
        return to_data_uri(fig)


def radius_vs_margin(models: dict[str, dict[str, Any]]) -> str | None:
    """Per example: certified radius (a lower bound) against the measured L2 margin (an upper bound)."""
    certified = {name: m["analysis"]["certified"] for name, m in models.items() if m.get("analysis")}
    if not certified:
        return None
    with _figure(4.2, 3.6) as (fig, ax):
        top, handles = 0.0, []
        for name, cert in certified.items():
            margin = np.array([np.nan if v is None else v for v in cert["l2_margin"]], dtype=float)
            radius = np.array(cert["radii"], dtype=float)
            handles.append(ax.scatter(margin, radius, s=10, alpha=0.6, label=name))
            top = max(top, np.nanmax(np.where(np.isfinite(margin), margin, np.nan), initial=0), radius.max())
        handles += ax.plot([0, top], [0, top], color="grey", linewidth=1, label="radius = margin")
        ax.set(xlabel="L2 margin found by FMN", ylabel="certified L2 radius")
        _legend(ax, handles)
        return to_data_uri(fig)


def confidence_shift(models: dict[str, dict[str, Any]]) -> str | None:
    """Mean normalised entropy and mean logit margin, clean and under attack, per model."""
    analysed = {name: m["analysis"]["metrics"] for name, m in models.items() if m.get("analysis")}
    if not analysed:
        return None
    with _figure(7.0, 3.0, ncols=2) as (fig, axes):
        names = list(analysed)
        positions = np.arange(len(names))
        panels = ((axes[0], "entropy", "normalised entropy"), (axes[1], "margin", "logit margin"))
        bars = []
        for ax, key, label in panels:
            # a null mean (a margin of -inf from NaN logits) leaves its bar out
            clean = _floats([analysed[n][key]["clean_mean"] for n in names])
            adversarial = _floats([analysed[n][key]["adversarial_mean"] for n in names])
            bars.append([ax.bar(positions - 0.2, clean, 0.4, label="clean"),
                         ax.bar(positions + 0.2, adversarial, 0.4, label="under attack")])
            ax.set_xticks(positions, names)
            ax.set(ylabel=f"mean {label}")
            ax.axhline(0, color="black", linewidth=0.6)
        _legend(axes[0], bars[0])  # one legend: both panels use the same two colours
        return to_data_uri(fig)


def _class_ticks(ax: Axes, count: int, class_names: list[str] | None, axes: str = "x") -> None:
    """Class positions labelled by name when the dataset gave names for exactly these classes."""
    names = class_names if class_names is not None and len(class_names) == count else None
    for axis in axes:
        setter = ax.set_xticks if axis == "x" else ax.set_yticks
        if names is None:
            setter(np.arange(count))
        else:  # names such as 'no' and 'yes' say more than 0 and 1
            setter(np.arange(count), [str(n) for n in names], fontsize=7,
                   rotation=45 if axis == "x" and max(map(len, map(str, names))) > 3 else 0)


def class_f1(name: str, classes: dict[str, Any], class_names: list[str] | None = None) -> str:
    """Per-class F1, clean and under attack, for one model."""
    with _figure(6.0, 2.8) as (fig, ax):
        clean, adversarial = _floats(classes["clean"]["f1"]), _floats(classes["adversarial"]["f1"])
        positions = np.arange(len(clean))
        macro = {key: _shown_number(classes[key]["macro_f1"], ".2f") for key in ("clean", "adversarial")}
        bars = [ax.bar(positions - 0.2, clean, 0.4, label=f"clean (macro {macro['clean']})"),
                ax.bar(positions + 0.2, adversarial, 0.4,
                       label=f"under attack (macro {macro['adversarial']})")]
        ax.set(xlabel="class", ylabel="F1", ylim=(0, 1.3), title=name)
        _class_ticks(ax, len(positions), class_names)
        _legend(ax, bars, fontsize=7, ncol=2, loc="upper center")
        return to_data_uri(fig)


def confusion(name: str, classes: dict[str, Any], class_names: list[str] | None = None) -> str:
    """Confusion matrices (rows: true class), clean and under attack, side by side."""
    with _figure(7.0, 3.4, ncols=2) as (fig, axes):
        for ax, key in zip(axes, ("clean", "adversarial")):
            matrix = np.array(classes[key]["confusion"], dtype=float)
            ax.imshow(matrix, cmap="Blues")
            ax.grid(False)
            ax.set(title=f"{name}: {'clean' if key == 'clean' else 'under attack'}",
                   xlabel="predicted", ylabel="true")
            if len(matrix) <= 12:
                _class_ticks(ax, len(matrix), class_names, axes="xy")
                for (i, j), count in np.ndenumerate(matrix):
                    if count and np.isfinite(count):
                        ax.text(j, i, int(count), ha="center", va="center", fontsize=6,
                                color="white" if count > matrix.max() / 2 else "black")
        return to_data_uri(fig)


def _shown(prediction: int) -> str:
    """A gallery title's class: NO_CLASS (NaN logits) says so rather than printing -1."""
    return "NaN" if prediction == NO_CLASS else str(prediction)

def gallery(name: str, gallery_data: dict[str, Any], bounds: Sequence[float] = (0.0, 1.0)) -> str | None:
    """Rows: clean image, adversarial image, perturbation amplified to the full grey range.

    ``bounds`` is the threat model's box, the range of the stored pixel values: it is shown as the
    full grey (or colour) range, so images in [0, 255] or [-1, 1] look as they are.
    """
    examples = gallery_data.get("examples") or []
    if not examples:
        return None
    low, high = (float(b) for b in bounds)
    with plt.rc_context(_STYLE):
        # wide enough for the title that explains the rows, however few examples were fooled
        width = max(1.2 * len(examples) + 0.6, 5.0)
        fig, axes = plt.subplots(3, len(examples), figsize=(width, 4.0), squeeze=False)
        try:
            for column, example in enumerate(examples):
                clean = _image(example["clean"], low, high)
                adversarial = _image(example["adversarial"], low, high)
                delta = adversarial - clean
                scale = np.abs(delta).max() or 1.0
                panels = (clean, adversarial, 0.5 + 0.5 * delta / scale)
                titles = (f"{example['label']} -> {_shown(example['clean_prediction'])}",
                          f"-> {_shown(example['adversarial_prediction'])}", f"x{0.5 / scale:.1f}")
                for row, (panel, title) in enumerate(zip(panels, titles)):
                    ax = axes[row][column]
                    ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1)
                    ax.set_title(title, fontsize=7)
                    ax.axis("off")
            fig.suptitle(f"{name}: clean (label -> prediction), adversarial, amplified perturbation",
                         fontsize=8, wrap=True)
            return to_data_uri(fig)
        finally:
            plt.close(fig)


def _image(values: list[Any], low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(C, H, W) nested lists of values in the box [low, high] to an array imshow takes, scaled to
    [0, 1]: (H, W) grey or (H, W, 3) colour."""
    array = np.clip((np.array(values, dtype=float) - low) / (high - low), 0, 1)
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def _strongest_membership_curves(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model, its membership attack of highest AUC among those that kept their ROC curve."""
    strongest = {}
    for name, model in models.items():
        with_curve = [r for r in (model.get("privacy") or {}).get("membership", []) if r.get("roc_fpr")]
        if with_curve:
            strongest[name] = max(with_curve, key=lambda result: result["auc"])
    return strongest


def membership_roc(models: dict[str, dict[str, Any]]) -> str | None:
    """ROC curve of each model's strongest membership attack on log-log axes (low FPR is what matters).

    One curve per model: every attack of every model would outrun the colour cycle in a comparison.
    """
    curves = _strongest_membership_curves(models)
    if not curves:
        return None
    with _figure(4.6, 3.8) as (fig, ax):
        floor, handles = 1e-4, []
        for name, result in curves.items():
            fpr = np.maximum(np.array(result["roc_fpr"], dtype=float), floor)
            tpr = np.maximum(np.array(result["roc_tpr"], dtype=float), floor)
            handles += ax.plot(fpr, tpr, label=f"{name}: {result['attack']} (AUC {result['auc']:.2f})")
        handles += ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set(xscale="log", yscale="log", xlabel="false-positive rate", ylabel="true-positive rate",
               xlim=(floor, 1), ylim=(floor, 1), title="strongest attack per model")
        _plain_log_ticks(ax)
        _legend(ax, handles, fontsize=6)
        return to_data_uri(fig)


def privacy_tradeoff(models: dict[str, dict[str, Any]]) -> str | None:
    """Each model as a point: worst-case robust accuracy against its strongest membership AUC."""
    points = [(name, m["robustness"]["worst_case_accuracy"],
               max(r["auc"] for r in m["privacy"]["membership"]))
              for name, m in models.items() if m.get("privacy") and m["privacy"]["membership"]]
    if not points:
        return None
    with _figure(4.2, 3.4) as (fig, ax):
        for name, robust, auc in points:
            ax.scatter([robust], [auc], s=40)
            ax.annotate(name, (robust, auc), textcoords="offset points", xytext=(5, 5))
        aucs = [auc for _, _, auc in points]
        # chance (0.5) and every point in view, an AUC below chance included
        ax.set(xlabel="worst-case robust accuracy", ylabel="membership AUC (strongest attack)",
               xlim=(-0.02, 1.02), ylim=(min(0.45, min(aucs) - 0.05), max(0.75, max(aucs) + 0.05)))
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        return to_data_uri(fig)


def feature_changes(name: str, changes: list[dict[str, Any]]) -> str | None:
    """Tabular data: per feature, the share of fooled examples in which each attack changed it."""
    if not changes:
        return None
    features = list(changes[0]["counts"])
    height = 1.0 + 0.22 * len(features) * max(1, len(changes)) ** 0.5
    with _figure(6.0, min(height, 12.0)) as (fig, ax):
        positions = np.arange(len(features))
        width = 0.8 / len(changes)
        bars = []
        for offset, change in enumerate(changes):
            rates = [change["rates"].get(feature, 0.0) for feature in features]
            bars.append(ax.barh(positions + offset * width, rates, width,
                                label=f"{change['attack']} ({change['examples']} fooled)"))
        ax.set_yticks(positions + width * (len(changes) - 1) / 2, features, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="share of fooled examples with the feature changed", xlim=(0, 1.02), title=name)
        _legend(ax, bars, fontsize=7)
        return to_data_uri(fig)
