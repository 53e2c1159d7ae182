"""Load a model file from another framework, adapt it to the dataset, decide white- or black-box.

The result is an ``nn.Module`` that keeps fortify's contracts (inputs in the dataset's box,
channels first, logits out), checked on a sample batch before any attack runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.data import Dataset
from fortify.errors import CheckpointError, ConfigError, DataError
from fortify.interop.access import Access, probe_gradients
from fortify.interop.card import InputAdapter, InputCard, check_channels, check_on_sample, resolve_layout

MODEL_SUFFIXES = {".keras": "keras", ".h5": "keras", ".onnx": "onnx"}
# attacks that only query the model's outputs (transfer crafts its points on a surrogate)
BLACK_BOX_ATTACKS = ("square", "hopskipjump", "transfer")
SAMPLE_SIZE = 256
CONVERSION_TOLERANCE = 1e-4  # relative to the largest logit: float32 rounding, not another function
SOFTMAX_BYPASSED = "the model's final softmax is bypassed so that attacks see logits"


@dataclass
class ExternalModel:
    module: nn.Module  # takes the dataset's inputs as they are, returns logits
    path: Path
    framework: str  # "keras" or "onnx"
    runtime: str  # "keras-torch", "onnx2torch" or "onnxruntime"
    card: InputCard
    access: Access
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What the results file records about the model, next to the numbers."""
        return {"path": str(self.path), "framework": self.framework, "runtime": self.runtime,
                "card": self.card.to_dict(), "access": self.access.to_dict(), "warnings": self.warnings}


def load_external_model(path: Path, dataset: Dataset, *, layout: str = "auto",
                        input_range: Sequence[float] | None = None, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None,
                        device: torch.device | None = None) -> ExternalModel:
    """Load ``path`` (.keras, .h5, .onnx) for ``dataset``; unspecified input range = the dataset's box."""
    path = Path(path)
    framework = MODEL_SUFFIXES.get(path.suffix)
    if framework is None:
        raise ConfigError(f"cannot tell the framework of {path}; model file suffixes fortify reads: "
                          f"{', '.join(MODEL_SUFFIXES)}")
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    module, declared, runtime, notes, source = _load(framework, path, device)
    card = InputCard(layout=resolve_layout(layout, declared, dataset.input_shape),
                     input_range=tuple(input_range) if input_range is not None else dataset.bounds,
                     mean=tuple(mean) if mean is not None else None,
                     std=tuple(std) if std is not None else None)
    check_channels(card, dataset.input_shape)
    adapted = InputAdapter(module, card, dataset.bounds)
    sample = dataset.test.head(SAMPLE_SIZE)
    if runtime == "onnx2torch":
        adapted, runtime, conversion_notes = _checked_conversion(adapted, source, card, dataset.bounds,
                                                                 sample.x)
        notes = notes + conversion_notes
    warnings = notes + check_on_sample(adapted, sample.x, sample.y, dataset.num_classes)
    access = probe_gradients(adapted, sample.x)
    # in eval mode, as fortify's own loaders hand models over: called directly in training mode, a
    # Keras model would drop out and move its batch-norm statistics
    return ExternalModel(adapted.eval(), path, framework, runtime, card, access, warnings)


def _load(framework: str, path: Path, device: torch.device | None
          ) -> tuple[nn.Module, tuple[int | None, ...], str, list[str], Path | bytes]:
    """The module, its declared input shape, runtime, notes, and its source: the file, or for an ONNX
    graph that fortify edited (a final softmax bypassed) the edited graph's bytes."""
    if framework == "keras":
        from fortify.interop.keras import load_keras_model

        # Keras places its weights on its own default device; moving them would strand its state
        module, declared = load_keras_model(path)
        notes = [SOFTMAX_BYPASSED] if module.final_softmax is not None else []
        return module, declared, "keras-torch", notes, path
    from fortify.interop.onnx import load_onnx_model

    loaded = load_onnx_model(path)
    module = loaded.module
    if loaded.runtime == "onnx2torch" and device is not None:
        module = module.to(device)
    notes = [SOFTMAX_BYPASSED] if loaded.softmax_bypassed else []
    if loaded.runtime == "onnxruntime":
        notes.append(loaded.note)
    return module, loaded.declared_input_shape, loaded.runtime, notes, loaded.runtime_source


def _checked_conversion(adapted: InputAdapter, source: Path | bytes, card: InputCard,
                        bounds: tuple[float, float], x: torch.Tensor) -> tuple[nn.Module, str, list[str]]:
    """onnx2torch rebuilds the graph from torch operations; were its function another than the file's,
    fortify would attack a model the file does not hold. Compared with onnxruntime on the sample (when
    installed), a conversion off by more than float rounding gives way to onnxruntime (black-box).
    ``source`` is the graph onnx2torch converted: the file, or its bytes once its softmax was bypassed."""
    from fortify.interop.onnx import FixedBatch, onnxruntime_classifier

    if importlib.util.find_spec("onnxruntime") is None:
        return adapted, "onnx2torch", []
    fixed_batch = adapted.model.batch if isinstance(adapted.model, FixedBatch) else None
    reference = InputAdapter(onnxruntime_classifier(source, fixed_batch), card, bounds)
    device = next(adapted.parameters(), torch.empty(0)).device
    try:
        with torch.inference_mode():
            converted, expected = adapted(x.to(device)).cpu(), reference(x)
    except (RuntimeError, ValueError) as err:
        raise DataError(f"the model fails on a batch of the dataset's inputs {tuple(x.shape)}: {err}; "
                        "check --layout and the dataset") from None
    gap = float((converted - expected).abs().max())
    if gap <= CONVERSION_TOLERANCE * (1 + float(expected.abs().max())):
        return adapted, "onnx2torch", []
    return reference, "onnxruntime", [f"onnx2torch's conversion differs from onnxruntime by {gap:.3g} in the "
                                      "logits of a sample batch; the model runs in onnxruntime instead"]


def check_attacks_fit_access(names: Sequence[str], access: Access) -> None:
    """Refuse gradient attacks on a model without usable gradients: they would overstate robustness."""
    if access.white_box:
        return
    gradient_attacks = [name for name in names if name not in BLACK_BOX_ATTACKS]
    if gradient_attacks:
        raise ConfigError(f"the model is black-box ({access.reason}), so gradient attacks "
                          f"{', '.join(gradient_attacks)} would overstate its robustness; attacks "
                          f"allowed: {', '.join(BLACK_BOX_ATTACKS)} (e.g. --attacks square)")
