"""Mixed-precision evaluation: attacks and predictions under ``torch.autocast``, checked against fp32.

``AutocastModel`` runs the wrapped model's forward pass under autocast and hands its logits back in
the input's dtype. Everything an attack does outside the model (its loss, its step, the projection
onto the threat model) therefore stays in the input's dtype, so ``x_adv`` keeps its dtype and
``threat.contains`` holds exactly as in fp32; only the network itself runs in bf16 or fp16.

Low precision can change a result: a near-tie between two logits may resolve the other way, and an
fp16 gradient may underflow to zero. ``check_against_fp32`` measures this on a sample (the first
examples of the evaluation): how often the clean predictions agree, and how often the first attack,
run from the same seed in both precisions, leaves the same examples robust.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fortify.attacks.base import Attack
from fortify.errors import ConfigError
from fortify.models.predictions import predicted_class

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECK_EXAMPLES = 128  # sample size of the fp32 check: the first attack runs twice on it
DEFAULT_MIN_AGREEMENT = 0.9


def check_amp_support(amp: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``amp``; ConfigError when the name or the device does not allow it."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown amp precision {amp!r}; valid: {', '.join(AMP_DTYPES)}")
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"device {device} does not support autocast; run without amp")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"device {device} does not support bf16; use amp fp16 or none")
    warn_if_slow_on_cpu(amp, device, "eval.amp")
    return AMP_DTYPES[amp]


def cpu_has_kernels_for(amp: str) -> bool:
    """Whether oneDNN, the CPU kernel library behind torch's convolutions, runs ``amp`` on this CPU,
    as torch reports it (on x86, bf16 needs AVX-512 and fp16 AVX-512 FP16 or AMX)."""
    query = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[amp]
    try:
        return bool(getattr(torch.ops.mkldnn, query)())
    except (AttributeError, RuntimeError):  # a torch build without the query or without oneDNN
        return False


def warn_if_slow_on_cpu(amp: str, device: torch.device, setting: str) -> None:
    """A RuntimeWarning when ``amp`` autocast on this CPU would miss oneDNN's kernels: its
    convolutions then take torch's reference code, many times slower than fp32 (docs/PERFORMANCE.md)."""
    if device.type == "cpu" and not cpu_has_kernels_for(amp):
        warnings.warn(f"{setting}: this CPU has no oneDNN {amp} kernels, so {amp} convolutions run in "
                      "torch's reference code, many times slower than fp32; turn it off here",
                      RuntimeWarning, stacklevel=3)


class AutocastModel(nn.Module):
    """``model`` run under autocast; its logits come back in the input's dtype.

    A model that averages its random samples by their loss (``EOT``'s ``average_objective``) keeps
    doing so through the wrapper: the attacks look the method up on the model they are given, and
    without it they would ascend the loss of the mean logits instead of the mean loss.
    """

    def __init__(self, model: nn.Module, amp: str, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.amp = amp
        self.dtype = check_amp_support(amp, device)
        self.device_type = device.type
        if hasattr(model, "average_objective"):
            self.average_objective = self._average_objective_under_autocast

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            logits = self.model(x)
        return logits.to(x.dtype)

    def _average_objective_under_autocast(self, x: Tensor, loss: Callable[[Tensor], Tensor]
                                          ) -> tuple[Tensor, Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            mean_loss, logits = self.model.average_objective(x, loss)
        return mean_loss.to(x.dtype), logits.to(x.dtype)

    def extra_repr(self) -> str:
        return f"amp={self.amp}"


@dataclass
class PrecisionCheck:
    """Agreement of a mixed-precision evaluation with fp32 on the first ``examples`` examples."""

    amp: str
    examples: int
    clean_agreement: float  # share of the sample with the same clean prediction
    attack: str
    attacked: int  # sample examples both precisions classify correctly, attacked in both
    robust_agreement: float | None  # share of those left robust (or fooled) in both; None if none
    min_agreement: float

    def warnings(self) -> list[str]:
        found = []
        if self.clean_agreement < self.min_agreement:
            found.append(f"under {self.amp} autocast the clean predictions agree with fp32 on only "
                         f"{self.clean_agreement:.1%} of {self.examples} examples (threshold "
                         f"{self.min_agreement:.0%}): the mixed-precision numbers may not hold in fp32")
        if self.robust_agreement is not None and self.robust_agreement < self.min_agreement:
            found.append(f"under {self.amp} autocast {self.attack} leaves the same examples robust as in "
                         f"fp32 on only {self.robust_agreement:.1%} of {self.attacked} (threshold "
                         f"{self.min_agreement:.0%}): rerun the evaluation in fp32")
        return found


def check_against_fp32(model: nn.Module, amp_model: nn.Module, x: Tensor, y: Tensor, attack: Attack, *,
                       amp: str, min_agreement: float = DEFAULT_MIN_AGREEMENT) -> PrecisionCheck:
    """Compare ``amp_model`` (``model`` under ``amp`` autocast) with the fp32 ``model`` on ``(x, y)``:
    the clean predictions, then the robust flags ``attack`` leaves."""
    if not 0 < min_agreement <= 1:
        raise ConfigError(f"min_agreement must be in (0, 1], got {min_agreement!r}")
    with torch.inference_mode():
        full = predicted_class(model(x))
        low = predicted_class(amp_model(x))
    both_correct = ((full == y) & (low == y)).nonzero().squeeze(1)
    robust_agreement = None
    if len(both_correct):
        x_ok, y_ok = x[both_correct], y[both_correct]
        same = _robust_flags(model, attack, x_ok, y_ok) == _robust_flags(amp_model, attack, x_ok, y_ok)
        robust_agreement = float(same.float().mean())
    return PrecisionCheck(
        amp=amp, examples=len(y), clean_agreement=float((full == low).float().mean()),
        attack=attack.label, attacked=len(both_correct), robust_agreement=robust_agreement,
        min_agreement=min_agreement)


def _robust_flags(model: nn.Module, attack: Attack, x: Tensor, y: Tensor) -> Tensor:
    # the same seed in both precisions, so only the arithmetic differs between the two runs
    generator = torch.Generator(device=x.device).manual_seed(attack.seed)
    x_adv = attack(model, x, y, generator=generator)
    with torch.inference_mode():
        return predicted_class(model(x_adv)) == y
