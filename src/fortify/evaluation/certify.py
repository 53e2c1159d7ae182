"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): a certificate of L2 robustness.

The smoothed classifier ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``, returns
the same class everywhere within the L2 radius ``sigma * Phi^-1(p_A)`` of ``x`` when its top class
has probability at least ``p_A > 1/2`` (Theorem 1, with ``p_B = 1 - p_A``). ``certify`` estimates
``p_A`` by Monte Carlo: ``n0`` samples pick the top class, ``n`` fresh samples count it, and the
one-sided Clopper-Pearson bound at level ``1 - alpha`` gives ``p_A_lower``. With probability at least
``1 - alpha`` over the sampling, a certified radius is a true lower bound on the distance from ``x``
to the smoothed classifier's nearest decision boundary; where ``p_A_lower < 1/2`` it abstains.

``GaussianObjective`` (registered as the ``gaussian`` training objective) trains the base classifier
``f`` on noisy inputs, as the paper does, so that ``g`` is accurate.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from fortify.attacks.base import as_class_indices, check_label_range, check_positive_int, check_seed
from fortify.errors import ConfigError, DataError
from fortify.models.modes import evaluation_mode
from fortify.models.predictions import predicted_class
from fortify.threat import check_in_box
from fortify.training.objectives import OBJECTIVES, Objective, ObjectiveOptions

ABSTAIN = -1
DEFAULT_SIGMA = 0.25


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not (isinstance(sigma, numbers.Real)  # NumPy floats included
                                       and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and 0 < alpha < 1):
        raise ConfigError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


class GaussianObjective(Objective):
    """Cross-entropy on ``x + N(0, sigma^2 I)`` (Gaussian data augmentation; Cohen et al. 2019).

    ``sigma`` comes from the options' ``noise_sigma`` when they carry one, else 0.25. The noise is
    drawn from the objective's generator, which the Trainer checkpoints, so a resumed run draws the
    same noise. The options' ``label_smoothing`` applies to the cross-entropy.
    """

    name = "gaussian"

    def __init__(self, options: ObjectiveOptions, *, sigma: float | None = None) -> None:
        super().__init__(options)
        self.sigma = _check_sigma(getattr(options, "noise_sigma", DEFAULT_SIGMA) if sigma is None else sigma)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator(x.device), device=x.device, dtype=x.dtype)
        return self.cross_entropy(model(x + self.sigma * noise), y)


OBJECTIVES.add(GaussianObjective.name, GaussianObjective)


# -- Monte-Carlo sampling --------------------------------------------------------------------------

NOISE_CHUNK = 100  # noisy copies of one example drawn from one seeded stream


def sample_counts(model: nn.Module, x: Tensor, *, sigma: float, n: int, num_classes: int,
                  batch_size: int = 1000, generator: torch.Generator | None = None) -> Tensor:
    """(N, K) counts of the base classifier's predictions on ``n`` noisy copies of each example.

    The copies of example ``i`` come in chunks of NOISE_CHUNK, each drawn from a stream seeded by
    (a number drawn from ``generator``, ``i``, the chunk's index): the counts depend on the
    generator's state and the examples' order, not on ``batch_size``, which only bounds how many
    noisy inputs go through the model at once. The model votes in eval mode (dropout off,
    batch-norm statistics untouched) and gets its own modes back.
    """
    sigma, n = _check_sigma(sigma), check_positive_int("n", n)
    batch_size = check_positive_int("batch_size", batch_size)
    noise = _NoiseStreams(generator, x.device, x.dtype)
    block = max(1, batch_size // NOISE_CHUNK)  # examples whose chunks share a pass
    with torch.no_grad(), evaluation_mode(model):
        return torch.cat([_block_counts(model, x[start:start + block], start, sigma, n, num_classes,
                                        batch_size, noise) for start in range(0, x.shape[0], block)])


class _NoiseStreams:
    """Gaussian noise for (example, chunk) pairs, each pair from its own seeded stream."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> None:
        source = generator.device if generator is not None else torch.device("cpu")
        self.base = int(torch.randint(0, 2**62, (), generator=generator, device=source))
        self.stream = torch.Generator(device=device)
        self.device, self.dtype = device, dtype

    def draw(self, example: int, chunk: int, shape: tuple[int, ...]) -> Tensor:
        seed = np.random.SeedSequence((self.base, example, chunk)).generate_state(1, np.uint64)[0]
        self.stream.manual_seed(int(seed) >> 1)  # torch takes seeds below 2**63
        return torch.randn(shape, generator=self.stream, device=self.device, dtype=self.dtype)


def _block_counts(model: nn.Module, x: Tensor, first: int, sigma: float, n: int, num_classes: int,
                  batch_size: int, noise: _NoiseStreams) -> Tensor:
    counts = torch.zeros(x.shape[0], num_classes, dtype=torch.long, device=x.device)
    for chunk, done in enumerate(range(0, n, NOISE_CHUNK)):
        copies = min(NOISE_CHUNK, n - done)
        deltas = torch.cat([noise.draw(first + i, chunk, (copies, *x.shape[1:])) for i in range(x.shape[0])])
        batch = x.repeat_interleave(copies, dim=0) + sigma * deltas
        logits = torch.cat([model(part) for part in batch.split(batch_size)])
        if logits.dim() != 2:
            raise DataError(f"the model must output logits of shape (N, K), got {tuple(logits.shape)}")
        if logits.shape[1] != num_classes:  # one_hot would fail, or count a short row, without a word
            raise DataError(f"the model outputs {logits.shape[1]} classes, but num_classes is {num_classes}")
        predictions = predicted_class(logits).reshape(x.shape[0], copies)
        # a NaN row (NO_CLASS = -1) is a draw that votes for no class: it counts in n, not in n_A
        counts += F.one_hot(predictions + 1, num_classes + 1)[..., 1:].sum(dim=1)
    return counts


def clopper_pearson_lower(successes: Tensor, trials: int, alpha: float) -> Tensor:
    """One-sided ``1 - alpha`` Clopper-Pearson lower confidence bound on a binomial proportion."""
    k = successes.detach().cpu().double().numpy()
    lower = beta.ppf(alpha, k, trials - k + 1)  # NaN for k = 0, where the bound is 0
    return torch.from_numpy(lower).nan_to_num(0.0).to(successes.device)


# -- prediction and certification ------------------------------------------------------------------

@dataclass
class _Setup:
    model: nn.Module
    x: Tensor
    num_classes: int
    generator: torch.Generator


def _prepare(model: nn.Module, x: Tensor, num_classes: int | None, bounds: tuple[float, float],
             seed: int, generator: torch.Generator | None) -> _Setup:
    check_in_box(x, bounds)
    parameter = next(model.parameters(), None)
    x = x if parameter is None else x.to(parameter.device)
    if num_classes is None:
        # in eval mode: in training mode this pass would update batch-norm statistics (or fail on
        # a batch of one)
        with torch.no_grad(), evaluation_mode(model):
            logits = model(x[:1])
        if logits.dim() != 2:
            raise DataError(f"the model must output logits of shape (N, K), got {tuple(logits.shape)}")
        num_classes = int(logits.shape[1])
    generator = generator or torch.Generator(device=x.device).manual_seed(check_seed("seed", seed))
    return _Setup(model, x, check_positive_int("num_classes", num_classes), generator)


def predict(model: nn.Module, x: Tensor, *, sigma: float, n: int = 100, alpha: float = 0.001,
            num_classes: int | None = None, batch_size: int = 1000, bounds: tuple[float, float] = (0.0, 1.0),
            seed: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Cohen et al.'s PREDICT: the smoothed class, or ``ABSTAIN`` (-1) where the vote is not clear.

    The top class is returned when a two-sided binomial test rejects "the top two classes are equally
    likely" at level ``alpha``; then it is the smoothed classifier's class with probability at least
    ``1 - alpha``.
    """
    alpha = _check_alpha(alpha)
    setup = _prepare(model, x, num_classes, bounds, seed, generator)
    counts = sample_counts(model, setup.x, sigma=sigma, n=n, num_classes=setup.num_classes,
                           batch_size=batch_size, generator=setup.generator)
    top2 = counts.topk(2, dim=1) if setup.num_classes > 1 else counts.topk(1, dim=1)
    predictions = top2.indices[:, 0].clone()
    for i, row in enumerate(top2.values.tolist()):
        n_a, n_b = row[0], row[1] if len(row) > 1 else 0
        # no votes at all (every noisy copy's logits NaN): nothing to test, so abstain
        if n_a + n_b == 0 or binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            predictions[i] = ABSTAIN
    return predictions


@dataclass
class Certificate:
    """Per example: the smoothed class (or ABSTAIN), ``p_A_lower`` and the certified L2 radius."""

    predictions: Tensor
    p_lower: Tensor
    radii: Tensor  # 0 where abstained
    sigma: float
    n0: int
    n: int
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": self.predictions.tolist(), "p_lower": self.p_lower.tolist(),
                "radii": self.radii.tolist(), "sigma": self.sigma, "n0": self.n0, "n": self.n,
                "alpha": self.alpha}

    @property
    def abstained(self) -> Tensor:
        return self.predictions == ABSTAIN


def certify(model: nn.Module, x: Tensor, *, sigma: float, n0: int = 100, n: int = 100_000,
            alpha: float = 0.001, num_classes: int | None = None, batch_size: int = 1000,
            bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0,
            generator: torch.Generator | None = None) -> Certificate:
    """Cohen et al.'s CERTIFY for every example of ``x``: class and radius, or abstention.

    Each certified radius is at most the distance from ``x`` to the smoothed classifier's boundary,
    with probability at least ``1 - alpha`` (per example) over the noise drawn here.
    """
    sigma, alpha = _check_sigma(sigma), _check_alpha(alpha)
    n0, n = check_positive_int("n0", n0), check_positive_int("n", n)
    setup = _prepare(model, x, num_classes, bounds, seed, generator)

    def sample(count: int) -> Tensor:
        return sample_counts(model, setup.x, sigma=sigma, n=count, num_classes=setup.num_classes,
                             batch_size=batch_size, generator=setup.generator)

    # selection and estimation use separate samples, or the bound would be biased upwards
    selection, estimation = sample(n0), sample(n)
    top = selection.argmax(dim=1)
    p_lower = clopper_pearson_lower(estimation.gather(1, top.unsqueeze(1)).squeeze(1), n, alpha)
    certified = p_lower > 0.5  # Cohen et al. abstain at p_A_lower = 1/2, where the radius would be 0
    radii = torch.where(certified, sigma * _normal_ppf(p_lower), torch.zeros_like(p_lower))
    predictions = torch.where(certified, top, torch.full_like(top, ABSTAIN))
    return Certificate(predictions=predictions, p_lower=p_lower, radii=radii, sigma=sigma, n0=n0, n=n,
                       alpha=alpha)


def _normal_ppf(p: Tensor) -> Tensor:
    return torch.from_numpy(norm.ppf(p.detach().cpu().double().numpy())).to(p.device)


# -- certified accuracy ----------------------------------------------------------------------------

@dataclass
class CertifiedCurve:
    radii: list[float]
    accuracy: list[float]  # share of all examples certified correct at a radius >= r
    n_examples: int
    abstain_rate: float
    sigma: float

    def to_dict(self) -> dict[str, Any]:
        return {"radii": self.radii, "accuracy": self.accuracy, "n_examples": self.n_examples,
                "abstain_rate": self.abstain_rate, "sigma": self.sigma}


def certified_accuracy_curve(certificate: Certificate, y: Tensor, radii: Sequence[float],
                             num_classes: int | None = None) -> CertifiedCurve:
    """Certified accuracy at each radius r: the share of examples predicted correctly with radius >= r.

    With probability at least ``1 - alpha`` per example, it is a lower bound on the smoothed
    classifier's accuracy under any L2 perturbation of norm below r (Cohen et al. 2019, Sec. 4).
    A label past the classes would count as an error of the model: ``num_classes`` refuses it.
    """
    if y.shape != certificate.predictions.shape:
        raise DataError(f"labels must have shape {tuple(certificate.predictions.shape)}, "
                        f"got {tuple(y.shape)}")
    if y.numel() == 0:
        raise DataError("certified accuracy needs at least one example, got an empty certificate")
    y = as_class_indices(y)
    if int(y.min()) < 0:  # a negative label would count as wrong, not as an error
        raise DataError(f"labels must be class indices 0..K-1, got {int(y.min())}")
    if num_classes is not None:
        check_label_range(y, num_classes)
    try:
        radii = [float(r) for r in radii]
    except (TypeError, ValueError):
        raise ConfigError(f"radii must be a list of numbers, got {radii!r}") from None
    if any(not (math.isfinite(r) and r >= 0) for r in radii):
        raise ConfigError(f"radii must be finite numbers >= 0, got {list(radii)}")
    correct = certificate.predictions == y.to(certificate.predictions.device)
    accuracy = [float((correct & (certificate.radii >= r)).double().mean()) for r in radii]
    return CertifiedCurve(radii=[float(r) for r in radii], accuracy=accuracy, n_examples=len(y),
                          abstain_rate=float(certificate.abstained.double().mean()), sigma=certificate.sigma)
