"""Keras 3 models as torch modules, through Keras' torch backend.

Under the torch backend every Keras variable is a ``torch.nn.Parameter`` and a Keras model's call
is ordinary torch code, so gradients flow through Keras layers and a torch optimiser can update the
weights in place. ``KerasClassifier`` exposes those parameters under their Keras paths; Keras sees
every update, so a fine-tuned model saves back to a ``.keras`` file with Keras' own ``save``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from fortify.errors import CheckpointError, ConfigError, DataError
from fortify.interop.dependencies import require

KERAS_SUFFIXES = (".keras", ".h5")


def import_keras() -> ModuleType:
    """Import Keras with the torch backend, or explain why that is impossible."""
    if "keras" not in sys.modules and importlib.util.find_spec("keras") is not None:
        # Keras reads its backend once, at its first import; fortify can only drive torch
        os.environ["KERAS_BACKEND"] = "torch"
    keras = require("keras", "loading a Keras model")
    if int(keras.__version__.split(".")[0]) < 3:
        raise ConfigError(f"fortify needs Keras 3 (for its torch backend); keras {keras.__version__} "
                          "is installed: pip install 'fortify[keras]'")
    backend = keras.backend.backend()
    if backend != "torch":
        raise ConfigError(
            f"keras was already imported with the {backend!r} backend; fortify needs the 'torch' "
            "backend: set KERAS_BACKEND=torch before anything imports keras")
    return keras


class KerasClassifier(nn.Module):
    """A Keras model as a torch module: same call, same weights, gradients through Keras layers.

    The torch mode chooses Keras' ``training`` flag, so dropout and batch statistics behave as
    the Trainer and the attacks expect. A final softmax is bypassed during the call (when
    ``logits=True``) so that attacks see logits, as fortify's contract requires.
    """

    def __init__(self, keras_model: Any, *, logits: bool = True) -> None:
        super().__init__()
        # Keras objects are kept out of nn.Module's registry on purpose: Keras' own torch modules
        # list each weight twice (a Sequential and the Functional inside it, or a layer and its
        # model), and safetensors refuses tensors that share memory
        object.__setattr__(self, "keras_model", keras_model)
        object.__setattr__(self, "final_softmax", _final_softmax(keras_model) if logits else None)
        for variable in keras_model.variables:
            if not isinstance(variable.value, nn.Parameter):
                raise ConfigError(f"Keras variable {variable.path!r} is not a torch parameter; "
                                  "is the torch backend active?")
            self.register_parameter(self._free_name(variable.path.replace(".", "_")), variable.value)
        self.eval()  # as fortify's own loaders hand models over; the Trainer switches to training

    def _free_name(self, name: str) -> str:
        """``name``, or with a counter when another weight took it: two sub-models with layers of
        the same name give their weights the same path, and the second would replace the first."""
        free, count = name, 0
        while free in self._parameters:
            count += 1
            free = f"{name}_{count}"
        return free

    def forward(self, x: Tensor) -> Tensor:
        with self._softmax_bypassed():
            outputs = self.keras_model(x, training=self.training)
        return _single_tensor(outputs)

    @contextlib.contextmanager
    def _softmax_bypassed(self) -> Iterator[None]:
        layer = self.final_softmax
        if layer is None:
            yield
            return
        # only for the duration of the call: the Keras model itself keeps its softmax. A Softmax
        # layer gets an identity `call` on the instance (Keras calls self.call), any other layer
        # an identity activation
        if _is_softmax_layer(layer):
            layer.call = _identity_call
            try:
                yield
            finally:
                del layer.call
            return
        activation, layer.activation = layer.activation, _linear
        try:
            yield
        finally:
            layer.activation = activation

    def save(self, path: Path) -> None:
        """Write the (possibly fine-tuned) model as a Keras file, final softmax included."""
        if Path(path).suffix != ".keras":
            raise ConfigError(f"Keras saves to a .keras file; got {path}")
        self.keras_model.save(str(path))


def _linear(x: Tensor) -> Tensor:
    return x


def _identity_call(inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return inputs


def _is_softmax_layer(layer: Any) -> bool:
    return type(layer).__name__ == "Softmax"


def _single_tensor(outputs: Any) -> Tensor:
    """The one output tensor of a model that may wrap it in a dict or list of one entry."""
    if isinstance(outputs, dict) and len(outputs) == 1:
        outputs = next(iter(outputs.values()))
    elif isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        outputs = outputs[0]
    if not isinstance(outputs, Tensor):
        raise DataError(f"the Keras model returns {type(outputs).__name__}, not one tensor of logits")
    return outputs


def _final_softmax(keras_model: Any) -> Any | None:
    """The layer that produces the model's output when it applies softmax: a Softmax layer, or
    softmax as its activation (Dense(..., "softmax"), Activation); a last layer that is itself a
    model is searched the same way. A softmax layer whose probabilities an operation still changes
    (``keras.ops.log(probabilities)``) is not the model's last step, and stays."""
    last = _output_layer(keras_model)
    if last is not None and getattr(last, "layers", None):  # a nested Sequential or Functional model
        return _final_softmax(last)
    if _is_softmax_layer(last):
        return last
    activation = getattr(last, "activation", None)
    return last if getattr(activation, "__name__", None) == "softmax" else None


def _output_layer(keras_model: Any) -> Any | None:
    """The operation that computes the model's one output, or None where the model does not say.
    ``layers[-1]`` is not it: ``layers`` lists layers only, not the operations (``keras.ops``) after them."""
    outputs = getattr(keras_model, "outputs", None) or []
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    return getattr(history, "operation", None)


def declared_input_shape(keras_model: Any) -> tuple[int | None, ...]:
    try:
        shape = keras_model.input_shape
    except AttributeError:  # a model saved before it was built, or a bare layer
        raise CheckpointError("the Keras file holds no built model with a known input shape; build "
                              "the model (give it an Input) before saving it") from None
    if isinstance(shape, list):
        raise ConfigError(f"fortify evaluates classifiers with one input; this Keras model takes "
                          f"{len(shape)} inputs")
    return tuple(shape[1:])


def load_keras_model(path: Path, *, logits: bool = True) -> tuple[KerasClassifier, tuple[int | None, ...]]:
    """Load a .keras/.h5 file (Keras' safe mode: no arbitrary code) as a torch module."""
    path = Path(path)
    if path.suffix not in KERAS_SUFFIXES:
        raise ConfigError(f"{path} is not a Keras file; Keras suffixes: {', '.join(KERAS_SUFFIXES)}")
    if not path.is_file():
        raise CheckpointError(f"Keras model file {path} does not exist")
    keras = import_keras()
    try:
        model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    # a damaged archive: zipfile's checksum error and zlib's are neither OSError nor ValueError
    except (ValueError, OSError, TypeError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise CheckpointError(f"{path} is not a Keras model fortify can load: {err}") from None
    if len(getattr(model, "outputs", None) or [None]) != 1:
        raise ConfigError(f"fortify evaluates classifiers with one output; {path} has "
                          f"{len(model.outputs)}")
    declared = declared_input_shape(model)
    return KerasClassifier(model, logits=logits), declared
