"""Adversarial weight perturbation (Wu et al. 2020, "Adversarial Weight Perturbation Helps Robust
Generalization").

Per batch: craft ``x_adv`` with the wrapped objective's attack, find a weight perturbation ``v`` that
increases the wrapped loss, take the gradient of the loss at ``w + v`` and apply it to ``w``:
``w <- w - lr * grad L(w + v)``. This flattens the weight-loss landscape around the robust
solution and narrows the robust generalisation gap.

``v`` is one ascent step computed on a proxy copy of the model (so the model's BatchNorm
statistics see no extra pass), rescaled per layer to ``gamma * ||w_layer||``. Only weights of two
or more dimensions (convolution and linear kernels) are perturbed; biases and normalisation
parameters are not. In the authors' code the proxy takes one plain SGD step, whose direction is the
gradient; the per-layer rescaling removes its length, so the proxy's learning rate drops out and
``v_layer = gamma * ||w_layer|| * g_layer / ||g_layer||``, from this batch's gradient alone. (IBM
ART steps its proxy with the optimiser it is handed; with momentum, that buffer outlives the batch
and ``v`` follows a running sum of earlier batches' gradients, a weaker perturbation than the
authors'.)

Under data-parallel training (torchrun) each rank holds a share of the global batch. The
perturbation's gradient is averaged over the ranks (weighted by their shares' sizes) before the
rescaling, so that every rank perturbs by the direction of the whole global batch, as one process
would. The proxy copies the module inside DistributedDataParallel, not the wrapper: its gradient is
taken with ``autograd.grad``, which DDP's reducer never sees, so the wrapper would average nothing.

The weights are restored exactly (copied back, not ``w + v - v``) in ``after_backward``, before
the optimiser step, so weight decay and momentum act on the true weights. Perturbing and restoring
both clear autocast's cache of low-precision weight copies, so that under mixed precision
(``train.amp``) the passes that follow see the weights as they now are.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fortify.errors import ConfigError
from fortify.training.paired import ObjectiveWrapper, PairedObjective, check_non_negative

# The authors' guard against a zero gradient in the per-layer rescaling.
_NORM_FLOOR = 1e-20


def perturbable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters AWP perturbs: trainable tensors of two or more dimensions."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1]


class AWPObjective(ObjectiveWrapper):
    """AWP around a paired objective (``awp-pgd``, ``awp-trades``); ``gamma`` defaults to 5e-3.

    The authors' released CIFAR-10 settings are gamma = 1e-2 for PGD-AT and 5e-3 for TRADES (the
    latter with ``--awp-warmup 10``, which in their 1-based epoch loop switches AWP on after 9 epochs
    without it). ``warmup_epochs`` is that delay, counted in whole epochs done: AWP starts once
    ``warmup_epochs`` epochs have passed (their ``--awp-warmup k`` is ``warmup_epochs = k - 1``), and
    before it the objective is exactly the wrapped one. On small models that start on a flat loss plateau the
    perturbation can keep training there (docs/RECIPES.md), which the warm-up avoids.
    """

    def __init__(self, inner: PairedObjective, *, gamma: float = 5e-3, warmup_epochs: int = 0) -> None:
        super().__init__(inner)
        self.name = f"awp-{inner.name}"
        self.gamma = check_non_negative("awp gamma", gamma)
        self.warmup_epochs = int(check_non_negative("awp warmup_epochs", warmup_epochs))
        self._epochs_done = 0.0
        self._proxy: nn.Module | None = None
        self._saved: list[tuple[nn.Parameter, Tensor]] = []

    def set_progress(self, epochs_done: float) -> None:
        self._epochs_done = epochs_done
        super().set_progress(epochs_done)

    @property
    def active(self) -> bool:
        """Whether this step perturbs the weights (false during the warm-up)."""
        return self._epochs_done >= self.warmup_epochs

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self._saved:
            raise ConfigError("awp: the previous weight perturbation was not removed; "
                              "call after_backward(model) after each backward pass")
        x_adv = self.craft(model, x, y)
        if self.active:
            self._perturb(model, self.weight_perturbation(model, x, y, x_adv))
        return self.inner.loss_on(model, x, y, x_adv)

    def after_backward(self, model: nn.Module) -> None:
        self.restore()
        self.inner.after_backward(model)

    def weight_perturbation(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor
                            ) -> dict[str, Tensor]:
        """Per parameter name (of the module inside DDP, if wrapped), ``v = gamma * ||w|| * g / ||g||``
        with ``g`` the loss gradient of the global batch (this batch when training in one process)."""
        proxy = self._proxy_of(model)
        layers = perturbable(proxy)
        if not layers:
            raise ConfigError("awp needs a model with trainable weights of two or more dimensions "
                              "(convolution or linear kernels); this model has none")
        names, params = zip(*layers, strict=True)
        loss = self.inner.loss_on(proxy, x, y, x_adv)
        grads = global_batch_gradients(torch.autograd.grad(loss, params, allow_unused=True), len(x))
        perturbation = {}
        for name, weight, grad in zip(names, params, grads, strict=True):
            if grad is None:
                continue  # a layer the loss does not reach has no ascent direction
            scale = self.gamma * weight.detach().norm() / (grad.norm() + _NORM_FLOOR)
            perturbation[name] = scale * grad
        return perturbation

    def restore(self) -> None:
        """Copy the saved weights back: bit-exact, whatever rounding ``w + v`` did."""
        with torch.no_grad():
            for param, saved in self._saved:
                param.copy_(saved)
        self._saved = []
        torch.clear_autocast_cache()

    def _perturb(self, model: nn.Module, perturbation: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, param in perturbable(_unwrapped(model)):
                if name in perturbation:
                    self._saved.append((param, param.detach().clone()))
                    param.add_(perturbation[name].to(param.dtype))
        # under autocast the attack's passes left bf16 copies of the weights in autocast's cache,
        # which the loss would reuse: drop them so that it sees w + v (restore() does the same for w)
        torch.clear_autocast_cache()

    def _proxy_of(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (of the module inside DDP, if wrapped) holding its current weights, in
        its current train/eval mode."""
        model = _unwrapped(model)
        if self._proxy is None or _device_of(self._proxy) != _device_of(model):
            self._proxy = copy.deepcopy(model)
        self._proxy.load_state_dict(model.state_dict())
        self._proxy.train(model.training)
        return self._proxy


def _device_of(model: nn.Module) -> torch.device | None:
    first = next(model.parameters(), None)
    return None if first is None else first.device


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def global_batch_gradients(grads: tuple[Tensor | None, ...], count: int) -> tuple[Tensor | None, ...]:
    """``grads`` of this rank's mean loss over its ``count`` examples, turned into those of the mean
    loss over every rank's examples; unchanged outside a process group of two or more ranks.

    Each rank's gradient is weighted by its number of examples, so that unequal shares (a short last
    batch) average as one process's batch would. (A rank that holds the Trainer's zero-weight stand-in,
    when a global batch has fewer examples than there are ranks, counts it as one example.) A layer no
    loss reaches (``None``) is the same on every rank, which runs the same model. One all-reduce
    carries all layers and the counts.
    """
    reached = [g for g in grads if g is not None]
    if not reached or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return grads
    flat = torch.cat([g.reshape(-1) * count for g in reached] + [reached[0].new_full((1,), count)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = flat[-1]
    averaged = iter(flat[:-1].split([g.numel() for g in reached]))
    return tuple(None if g is None else (next(averaged) / total).view_as(g) for g in grads)
