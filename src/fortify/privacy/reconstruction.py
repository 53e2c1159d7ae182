"""Reconstruction of a client's inputs from one shared gradient (federated learning's leak).

- DLG (Zhu et al. 2019, "Deep Leakage from Gradients"): dummy inputs and soft dummy labels, L-BFGS
  on the squared distance between their gradient and the shared one.
- iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"): the label is read off the
  last layer's gradient first (only the true class has a negative entry), then DLG on the inputs.
- Inverting Gradients (Geiping et al. 2020, "Inverting Gradients - How easy is it to break privacy in
  federated learning?"): cosine distance between gradients plus total variation, Adam on the signed
  gradient with step decay, every iterate kept in the box.

``shared_gradient`` produces what a client sends, optionally DP-SGD style (Abadi et al. 2016): each
example's gradient clipped to ``clip_norm``, Gaussian noise of std ``noise_multiplier * clip_norm``
added to the sum, divided by the batch size. Quality is PSNR and SSIM per image after pairing each
original with its best-matching reconstruction.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.errors import ConfigError, DataError
from fortify.models.modes import evaluation_mode
from fortify.privacy._data import check_model_takes_labels, model_device, model_dtype, project_to_box
from fortify.privacy.similarity import best_assignment, psnr, ssim, total_variation
from fortify.threat import check_in_box
from fortify.training.objectives import check_label_smoothing

# rows whose lengths differ by less than this share are taken for mirror images (infer_labels)
_NORM_TIE = 1e-3

Method = Literal["dlg", "idlg", "inverting-gradients"]
METHODS: tuple[str, ...] = ("dlg", "idlg", "inverting-gradients")


@dataclass
class GradientReconstruction:
    images: Tensor
    labels: Tensor
    method: str
    final_loss: float
    settings: dict[str, Any]


@dataclass
class ReconstructionReport:
    """Quality of one reconstruction: per original image, after best matching."""

    method: str
    batch_size: int
    clip_norm: float | None
    noise_multiplier: float
    psnr: list[float]
    ssim: list[float] | None
    label_accuracy: float
    settings: dict[str, Any]
    seconds: float
    images: Tensor | None = field(default=None, repr=False)  # matched to the originals' order

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr) / len(self.psnr)

    @property
    def mean_ssim(self) -> float | None:
        return None if self.ssim is None else sum(self.ssim) / len(self.ssim)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "images"}
        data["mean_psnr"], data["mean_ssim"] = self.mean_psnr, self.mean_ssim
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReconstructionReport:
        names = {f.name for f in fields(cls)} - {"images"}
        known = {k: v for k, v in data.items() if k in names}
        # JSON holds no inf or NaN: a perfect image's PSNR (inf) and SSIM's NaN were written as null
        known["psnr"] = [math.inf if v is None else v for v in known["psnr"]]
        if known.get("ssim") is not None:
            known["ssim"] = [math.nan if v is None else v for v in known["ssim"]]
        return cls(**known)


# -- what the client shares ------------------------------------------------------------------------

def _parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _loss_gradient(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool = False,
                   label_smoothing: float = 0.0) -> tuple[Tensor, ...]:
    """Gradient of the mean cross-entropy (the training loss, with its ``label_smoothing``); ``y``
    holds class indices or soft label rows."""
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    return torch.autograd.grad(loss, _parameters(model), create_graph=create_graph)


def _clipped(grads: Sequence[Tensor], clip_norm: float) -> list[Tensor]:
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
    scale = (clip_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
    return [g * scale.to(g.dtype) for g in grads]


@contextmanager
def client_mode(model: nn.Module, batch_statistics: bool) -> Iterator[None]:
    """The model as a gradient is taken: eval mode, or with ``batch_statistics`` its batch-norm layers
    normalising by the batch's statistics, as in a client's training step (their running statistics
    are put back afterwards). Dropout stays off either way: its masks are the client's own random
    draws, which nobody else can replay."""
    with evaluation_mode(model):
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
            if batch_statistics else []
        saved = [{name: b.detach().clone() for name, b in m.named_buffers(recurse=False)} for m in norms]
        for norm in norms:
            norm.train()
        try:
            yield
        finally:
            with torch.no_grad():
                for norm, buffers in zip(norms, saved, strict=True):
                    for name, value in buffers.items():
                        getattr(norm, name).copy_(value)


def shared_gradient(model: nn.Module, x: Tensor, y: Tensor, *, clip_norm: float | None = None,
                    noise_multiplier: float = 0.0, generator: torch.Generator | None = None,
                    batch_statistics: bool = False, label_smoothing: float = 0.0) -> list[Tensor]:
    """The gradient of the batch's mean loss, as a client would send it (model in eval mode, or its
    batch norm on the batch's statistics with ``batch_statistics``, as a training step takes it;
    the cross-entropy with the training's ``label_smoothing``).

    With ``clip_norm`` each example's gradient is clipped to that L2 norm before averaging, and
    ``noise_multiplier > 0`` adds N(0, (noise_multiplier * clip_norm)^2) to the sum (DP-SGD).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):  # NaN passed, unclipped, noise-free
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and clip_norm is None:
        raise ConfigError("noise_multiplier > 0 needs clip_norm: the noise is scaled to the clip norm")
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    if clip_norm is not None and batch_statistics:
        raise ConfigError("batch_statistics cannot go with clip_norm: per-example gradients (DP-SGD) "
                          "exist only where no batch statistic mixes the examples")
    check_label_smoothing(label_smoothing)
    device = model_device(model)
    # the model's dtype (float64 data from numpy, or a float64 model) and int64 labels, as the loss takes
    x, y = x.to(device=device, dtype=model_dtype(model, x.dtype)), y.to(device).long()
    check_model_takes_labels(model, x[:1], y, "labels")
    with client_mode(model, batch_statistics), torch.enable_grad():
        if clip_norm is None:
            return [g.detach() for g in _loss_gradient(model, x, y, label_smoothing=label_smoothing)]
        per_example = [_clipped(_loss_gradient(model, x[i:i + 1], y[i:i + 1],
                                               label_smoothing=label_smoothing), clip_norm)
                       for i in range(len(x))]
    total = [torch.stack(parts).sum(dim=0).detach() for parts in zip(*per_example)]
    if noise_multiplier > 0:
        std = noise_multiplier * clip_norm
        total = [t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                 for t in total]
    return [t / len(x) for t in total]


# -- iDLG label inference --------------------------------------------------------------------------

def _output_layer(model: nn.Module, input_shape: Sequence[int]) -> nn.Linear:
    """The nn.Linear whose output is the model's output, found on one forward pass: the last one
    registered need not be the last one run (a head defined before the body)."""
    ran: list[tuple[nn.Module, Tensor]] = []
    hooks = [m.register_forward_hook(lambda module, _inputs, out: ran.append((module, out)))
             for m in model.modules() if isinstance(m, nn.Linear)]
    probe = torch.zeros(1, *input_shape, device=model_device(model), dtype=model_dtype(model, torch.float32))
    try:
        with torch.no_grad(), evaluation_mode(model):
            logits = model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    for module, out in ran:
        if out is logits:
            return module  # type: ignore[return-value]
    raise ConfigError("label inference needs a model whose output comes straight from an nn.Linear; "
                      "pass labels")


def _gradient_of(model: nn.Module, gradient: Sequence[Tensor], parameter: Tensor) -> Tensor:
    for p, g in zip(_parameters(model), gradient):
        if p is parameter:
            return g
    raise DataError("the gradient does not line up with the model's parameters")


def infer_labels(model: nn.Module, gradient: Sequence[Tensor], batch_size: int, input_shape: Sequence[int]
                 ) -> Tensor:
    """iDLG (Zhao et al. 2020): classes whose last-layer gradient is negative.

    For one example ``dL/db_c = p_c - [c = y]`` is negative only for the true class (the weight
    rows share that sign when the features are non-negative), so one label is exact. For a batch
    the signal is the mean of ``p_ic - [c = y_i]``: a class is negative when its examples' shortfall
    outweighs the probability the others put on it. With distinct labels and no confident prediction
    (an untrained or unsure model) the ``batch_size`` most negative classes are the labels; an example
    the model already fits confidently leaves almost no trace, and a confident wrong prediction
    can push its class positive, so labels can be missed (Yin et al. 2021 study this limit).
    Classes are repeated from the most negative when fewer than ``batch_size`` are negative.

    Without a bias, one example's weight rows are ``(p_c - [c = y]) h`` for its features ``h``: the
    true class's row points against all others and is the longest (``1 - p_y`` is the sum of the
    other ``p_c``), so it is found whatever the features' signs, unless another row is as long: with
    two classes, or when one wrong class holds all the rest of the probability, the two rows are
    mirror images, and their sums decide, as for a batch. The sums stand in for the bias where the
    features are non-negative (after a ReLU, or raw pixels); with features of both signs a
    two-class label cannot be told from the weight gradient alone.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    layer = _output_layer(model, input_shape)
    if layer.bias is not None and layer.bias.requires_grad:
        signal = _gradient_of(model, gradient, layer.bias)
    elif batch_size == 1:
        rows = _gradient_of(model, gradient, layer.weight)
        norms = rows.norm(dim=1)
        if len(rows) > 1 and float(norms.topk(2).values[1]) >= (1 - _NORM_TIE) * float(norms.max()):
            # two rows of one length: the true class's and one that took all the other probability
            # (always so with two classes), mirror images of each other; only their sign tells
            # them apart, which the row sums read where the features are non-negative
            signal = rows.sum(dim=1)
        else:
            longest = rows[norms.argmax()]
            signal = -(rows @ longest)  # the longest row most negative, the rows against it positive
    else:
        signal = _gradient_of(model, gradient, layer.weight).sum(dim=1)
    order = signal.argsort()
    negative = max(1, int((signal < 0).sum()))
    chosen = order[:min(negative, batch_size)]
    return chosen.repeat((batch_size + len(chosen) - 1) // len(chosen))[:batch_size].cpu()


# -- gradient matching -------------------------------------------------------------------------

def _l2_distance(trial: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    return sum((a - b).pow(2).sum() for a, b in zip(trial, target))


def _cosine_distance(trial: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """``1 - cos`` between the gradients, all parameters as one vector (Geiping et al. 2020)."""
    dot = sum((a * b).sum() for a, b in zip(trial, target))
    norm_a = torch.sqrt(sum(a.pow(2).sum() for a in trial))
    norm_b = torch.sqrt(sum(b.pow(2).sum() for b in target))
    return 1 - dot / (norm_a * norm_b).clamp_min(1e-12)


def _dummy(shape: Sequence[int], bounds: tuple[float, float], generator: torch.Generator,
           device: torch.device, dtype: torch.dtype) -> Tensor:
    """The starting image, in the model's dtype (drawn in float32 whatever it is, so that a seed
    gives the same start for every dtype)."""
    lo, hi = bounds
    return (lo + (hi - lo) * torch.rand(tuple(shape), generator=generator)).to(device=device, dtype=dtype)


def _lbfgs_match(model: nn.Module, target: Sequence[Tensor], x: Tensor, soft_labels: Tensor | None,
                 labels: Tensor | None, steps: int, bounds: tuple[float, float], label_smoothing: float
                 ) -> float:
    """DLG/iDLG: L-BFGS on the squared gradient distance (soft labels optimised too for DLG)."""
    variables = [x] + ([soft_labels] if soft_labels is not None else [])
    optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=20, history_size=100,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        y = soft_labels.softmax(dim=1) if soft_labels is not None else labels
        loss = _l2_distance(_loss_gradient(model, x, y, create_graph=True, label_smoothing=label_smoothing),
                            target)
        grads = torch.autograd.grad(loss, variables)
        for v, g in zip(variables, grads):
            v.grad = g
        return loss.detach()

    for _ in range(steps):
        # step() returns the loss from before its update: the loss at the point reached is taken below
        if not torch.isfinite(optimizer.step(closure)):
            break
    y = soft_labels.softmax(dim=1) if soft_labels is not None else labels
    # L-BFGS runs unconstrained; the loss is the one of the point returned, clipped into the box
    # (restarts are ranked by it)
    point = project_to_box(x.detach(), bounds)
    gradient = _loss_gradient(model, point, y.detach(), label_smoothing=label_smoothing)
    return float(_l2_distance(gradient, target))


def _adam_match(model: nn.Module, target: Sequence[Tensor], x: Tensor, labels: Tensor, *, steps: int,
                lr: float, tv_weight: float, signed: bool, bounds: tuple[float, float],
                label_smoothing: float) -> float:
    """Inverting Gradients: Adam on cosine distance + TV; lr / 10 at 3/8, 5/8 and 7/8 of the steps."""
    optimizer = torch.optim.Adam([x], lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in range(steps):
        trial = _loss_gradient(model, x, labels, create_graph=True, label_smoothing=label_smoothing)
        loss = (_cosine_distance(trial, target)
                + tv_weight * total_variation(x).mean())
        (grad,) = torch.autograd.grad(loss, x)
        x.grad = grad.sign() if signed else grad
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.copy_(project_to_box(x, bounds))
    # the loss of the point returned, after the last step and projection (restarts are ranked by it)
    point = x.detach()
    gradient = _loss_gradient(model, point, labels, label_smoothing=label_smoothing)
    return float(_cosine_distance(gradient, target)
                 + tv_weight * total_variation(point).mean())


def _check_gradient(model: nn.Module, gradient: Sequence[Tensor]) -> None:
    shapes = [tuple(p.shape) for p in _parameters(model)]
    given = [tuple(g.shape) for g in gradient]
    if shapes != given:
        raise DataError(f"the gradient has {len(given)} tensors of shapes {given[:3]}...; the model's "
                        f"trainable parameters are {len(shapes)} of shapes {shapes[:3]}...")


def _check_method(method: str, labels: Tensor | None, batch_size: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown reconstruction method {method!r}; valid: {', '.join(METHODS)}")
    if labels is not None and labels.shape != (batch_size,):
        raise DataError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")


def reconstruct(model: nn.Module, gradient: Sequence[Tensor], input_shape: Sequence[int], *,
                batch_size: int = 1, method: Method = "inverting-gradients",
                labels: Tensor | None = None, steps: int | None = None, lr: float = 0.1,
                tv_weight: float = 1e-4, signed: bool = True, restarts: int = 1,
                bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0, batch_statistics: bool = False,
                label_smoothing: float = 0.0) -> GradientReconstruction:
    """Recover ``batch_size`` inputs of shape ``input_shape`` from one shared ``gradient``.

    ``labels`` known to the attacker are used as given; otherwise iDLG and Inverting Gradients infer
    them from the output layer and DLG optimises soft labels. ``steps`` counts L-BFGS steps (of up to
    20 evaluations; default 50) for DLG/iDLG and Adam steps for Inverting Gradients (default 2000).
    Of ``restarts`` random starts the one with the lowest matching loss is returned. The trial
    gradients are taken as ``shared_gradient`` took the target: pass ``batch_statistics=True`` for a
    gradient taken in a training step of a model with batch norm (a federated client's), and the
    training's ``label_smoothing`` for a client whose loss smoothed its labels. Label inference
    reads signs of the unsmoothed loss's gradient: with smoothing ``eps`` the true class's sign
    flips once the model gives it more than ``1 - eps``, so pass ``labels`` there.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    check_label_smoothing(label_smoothing)
    restarts = check_positive_int("restarts", restarts)
    _check_method(method, labels, batch_size)
    device = model_device(model)
    steps = check_positive_int("steps", steps if steps is not None else
                               (2000 if method == "inverting-gradients" else 50))
    _check_gradient(model, gradient)
    target = [g.detach().to(device) for g in gradient]
    probe = torch.zeros(1, *input_shape, device=device, dtype=target[0].dtype)
    if labels is not None:
        labels = labels.long()  # int32 or uint8 labels: the cross-entropy takes int64
        check_model_takes_labels(model, probe, labels.to(device), "labels")
    elif method != "dlg":
        if label_smoothing > 0:
            warnings.warn(f"labels inferred from a gradient taken with label_smoothing={label_smoothing}: "
                          "inference can miss the labels of confident examples; pass labels if known",
                          stacklevel=2)
        labels = infer_labels(model, target, batch_size, input_shape)
    generator = torch.Generator().manual_seed(seed)
    best: GradientReconstruction | None = None
    for _ in range(restarts):
        with client_mode(model, batch_statistics):
            trial = _one_start(model, target, input_shape, batch_size, method, labels, steps, lr,
                               tv_weight, signed, bounds, label_smoothing, generator)
        if best is None or _lower(trial.final_loss, best.final_loss):
            best = trial
    assert best is not None
    best.settings.update({"steps": steps, "restarts": restarts, "seed": seed,
                          "batch_statistics": batch_statistics, "label_smoothing": label_smoothing})
    return best


def _lower(loss: float, incumbent: float) -> bool:
    """``loss`` beats ``incumbent``; a NaN never wins and always loses."""
    return not math.isnan(loss) and (math.isnan(incumbent) or loss < incumbent)


def _one_start(model: nn.Module, target: list[Tensor], input_shape: Sequence[int], batch_size: int,
               method: str, labels: Tensor | None, steps: int, lr: float, tv_weight: float,
               signed: bool, bounds: tuple[float, float], label_smoothing: float,
               generator: torch.Generator) -> GradientReconstruction:
    device, dtype = target[0].device, target[0].dtype
    x = _dummy((batch_size, *input_shape), bounds, generator, device, dtype).requires_grad_(True)
    with torch.enable_grad():
        if method == "inverting-gradients":
            assert labels is not None
            y = labels.to(device)
            loss = _adam_match(model, target, x, y, steps=steps, lr=lr, tv_weight=tv_weight,
                               signed=signed, bounds=bounds, label_smoothing=label_smoothing)
            settings = {"lr": lr, "tv_weight": tv_weight, "signed": signed}
        else:
            with torch.no_grad():
                classes = model(x).shape[1]
            soft = (torch.randn(batch_size, classes, generator=generator).to(device=device, dtype=dtype)
                    .requires_grad_(True)
                    if labels is None else None)  # only DLG without known labels guesses them
            y = None if labels is None else labels.to(device)
            loss = _lbfgs_match(model, target, x, soft, y, steps, bounds, label_smoothing)
            if soft is not None:
                y = soft.detach().argmax(dim=1)
            settings = {"optimizer": "lbfgs"}
    assert y is not None
    images = project_to_box(x.detach(), bounds)
    return GradientReconstruction(images, y.detach().cpu(), method, loss, settings)


# -- quality -------------------------------------------------------------------------------------

def reconstruction_quality(result: GradientReconstruction, x: Tensor, y: Tensor, *,
                           bounds: tuple[float, float] = (0.0, 1.0), clip_norm: float | None = None,
                           noise_multiplier: float = 0.0, seconds: float = 0.0
                           ) -> ReconstructionReport:
    """PSNR and SSIM of each original against the reconstruction matched to it."""
    x = x.detach().cpu()
    check_in_box(x, bounds)  # PSNR and SSIM scale by the box's width: outside it they mean nothing
    if result.images.shape != x.shape:
        raise DataError(f"reconstruction has shape {tuple(result.images.shape)}, the originals "
                        f"{tuple(x.shape)}")
    order = best_assignment(result.images.cpu(), x)
    matched = result.images.cpu()[order]
    data_range = bounds[1] - bounds[0]
    is_image = x.dim() in (3, 4) and min(x.shape[-2:]) >= 3
    label_hits = (result.labels.cpu()[order] == y.cpu()).double().mean()
    return ReconstructionReport(
        method=result.method, batch_size=len(x), clip_norm=clip_norm,
        noise_multiplier=noise_multiplier, psnr=psnr(matched, x, data_range=data_range).tolist(),
        ssim=ssim(matched, x, data_range=data_range).tolist() if is_image else None,
        label_accuracy=float(label_hits), settings=dict(result.settings), seconds=seconds,
        images=matched)


def gradient_leakage(model: nn.Module, x: Tensor, y: Tensor, *, method: Method = "inverting-gradients",
                     clip_norm: float | None = None, noise_multiplier: float = 0.0,
                     known_labels: bool = False, bounds: tuple[float, float] = (0.0, 1.0),
                     seed: int = 0, batch_statistics: bool = False, label_smoothing: float = 0.0,
                     **options: Any) -> ReconstructionReport:
    """Share the gradient of ``(x, y)`` (optionally clipped and noised), reconstruct, measure; the
    client's loss and the attacker's both smooth labels by ``label_smoothing``.

    ``options`` go to ``reconstruct`` (steps, lr, tv_weight, signed, restarts).
    """
    start = time.perf_counter()
    check_in_box(x, bounds)  # before the work: the quality measured at the end needs it
    # not ``seed`` itself: reconstruct draws its starting image from that, which would then be the
    # very uniforms the noise was made of
    noise = torch.Generator().manual_seed((seed + 1) % 2**63)
    gradient = shared_gradient(model, x, y, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                               generator=noise, batch_statistics=batch_statistics,
                               label_smoothing=label_smoothing)
    result = reconstruct(model, gradient, tuple(x.shape[1:]), batch_size=len(x), method=method,
                         labels=y if known_labels else None, bounds=bounds, seed=seed,
                         batch_statistics=batch_statistics, label_smoothing=label_smoothing, **options)
    return reconstruction_quality(result, x, y, bounds=bounds, clip_norm=clip_norm,
                                  noise_multiplier=noise_multiplier,
                                  seconds=time.perf_counter() - start)


def leakage_sweep(model: nn.Module, x: Tensor, y: Tensor, *, batch_sizes: Sequence[int] = (1, 4, 8),
                  noise_multipliers: Sequence[float] = (0.0, 0.01, 0.1), clip_norm: float = 1.0,
                  method: Method = "inverting-gradients", bounds: tuple[float, float] = (0.0, 1.0),
                  seed: int = 0, **options: Any) -> list[ReconstructionReport]:
    """Reconstruction quality for each batch size (the first examples of ``x``) and noise level.

    Noise 0 shares the plain gradient; a positive multiplier clips each example's gradient to
    ``clip_norm`` and adds DP-SGD noise, which shows what clipping and noise buy against the attack.
    """
    if not batch_sizes or not noise_multipliers:
        raise ConfigError("a leakage sweep needs at least one batch size and one noise multiplier")
    if max(batch_sizes) > len(x):
        raise DataError(f"batch size {max(batch_sizes)} needs that many examples, got {len(x)}")
    reports = []
    for batch_size in batch_sizes:
        for noise in noise_multipliers:
            clip = clip_norm if noise > 0 else None
            reports.append(gradient_leakage(model, x[:batch_size], y[:batch_size], method=method,
                                            clip_norm=clip, noise_multiplier=noise, bounds=bounds,
                                            seed=seed, **options))
    return reports
