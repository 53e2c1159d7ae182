"""ONNX classifiers as torch modules: converted by onnx2torch, or run by onnxruntime.

onnx2torch rebuilds the graph from torch operations, so gradients usually flow and every attack
applies. When an operator has no converter, the model still runs in onnxruntime, but only as a
black box: query-based attacks work on it, gradient attacks cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fortify.errors import CheckpointError, ConfigError
from fortify.interop.dependencies import require

ONNX_SUFFIXES = (".onnx",)


@dataclass
class LoadedOnnx:
    module: nn.Module
    declared_input_shape: tuple[int | None, ...]
    runtime: str  # "onnx2torch" or "onnxruntime"
    note: str


class OnnxRuntimeClassifier(nn.Module):
    """Forward-only: onnxruntime computes the logits on NumPy arrays, outside autograd."""

    def __init__(self, model_bytes: bytes) -> None:
        super().__init__()
        runtime = require("onnxruntime", "running an ONNX model that onnx2torch cannot convert")
        self.session = runtime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        # an export without dynamic axes fixes the batch (often to 1): feed it chunks of that size
        declared = graph_input.shape[0] if graph_input.shape else None
        self.batch = declared if isinstance(declared, int) and declared > 0 else None
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        step = self.batch or max(len(array), 1)
        chunks = [array[i:i + step] for i in range(0, len(array), step)]
        try:
            logits = np.concatenate([self.session.run(None, {self.input_name: c})[0] for c in chunks])
        except Exception as err:  # onnxruntime's errors derive from Exception only
            raise RuntimeError(f"onnxruntime could not run the model: {err}") from None
        return torch.from_numpy(logits).to(device=x.device, dtype=x.dtype)


def _read(path: Path) -> Any:
    onnx = require("onnx", "loading an ONNX model")
    from google.protobuf.message import DecodeError  # protobuf comes with onnx

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, DecodeError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid ONNX model: {err}") from None
    return proto


def _graph_input_shape(proto: Any, path: Path) -> tuple[int | None, ...]:
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ConfigError(f"fortify evaluates classifiers with one input and one output; {path} has "
                          f"{len(inputs)} inputs and {len(proto.graph.output)} outputs")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != 1:  # TensorProto.FLOAT
        raise ConfigError(f"{path} takes inputs of ONNX element type {tensor_type.elem_type}; fortify "
                          "feeds float32 (type 1)")
    dims = tensor_type.shape.dim[1:]  # without the batch dimension
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def load_onnx_model(path: Path) -> LoadedOnnx:
    """Convert with onnx2torch; fall back to onnxruntime (black-box) for unsupported operators."""
    path = Path(path)
    if path.suffix not in ONNX_SUFFIXES:
        raise ConfigError(f"{path} is not an ONNX file; ONNX suffixes: {', '.join(ONNX_SUFFIXES)}")
    if not path.is_file():
        raise CheckpointError(f"ONNX model file {path} does not exist")
    proto = _read(path)
    declared = _graph_input_shape(proto, path)
    onnx2torch = require("onnx2torch", "converting an ONNX model to torch")
    try:
        module = onnx2torch.convert(proto)
    except (NotImplementedError, RuntimeError, ValueError, KeyError) as err:
        note = f"onnx2torch cannot convert it ({err}); it runs in onnxruntime"
        return LoadedOnnx(OnnxRuntimeClassifier(proto.SerializeToString()), declared, "onnxruntime",
                          note)
    return LoadedOnnx(module.eval(), declared, "onnx2torch", "converted to torch by onnx2torch")
