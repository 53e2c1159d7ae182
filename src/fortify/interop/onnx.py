"""ONNX classifiers as torch modules: converted by onnx2torch, or run by onnxruntime.

onnx2torch rebuilds the graph from torch operations, so gradients usually flow and every attack
applies. When an operator has no converter, the model still runs in onnxruntime, but only as a
black box: query-based attacks work on it, gradient attacks cannot. Either way, a final softmax is
replaced by an identity first, so that attacks see logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    softmax_bypassed: bool  # the graph's final softmax was replaced by an identity
    # what onnxruntime runs: the file, or the edited graph serialised when the softmax was bypassed
    runtime_source: Path | bytes


class OnnxRuntimeClassifier(nn.Module):
    """Forward-only: onnxruntime computes the logits on NumPy arrays, outside autograd.

    An unedited model is built from the file's path, so that weights stored as external data are
    found beside it (from bytes, onnxruntime would look for them in the working directory). An edited
    graph comes as bytes: ``onnx.load`` has already read its external data into it.
    """

    def __init__(self, source: Path | bytes) -> None:
        super().__init__()
        runtime = require("onnxruntime", "running an ONNX model that onnx2torch cannot convert")
        model = source if isinstance(source, bytes) else str(source)
        try:
            self.session = runtime.InferenceSession(model, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's errors derive from Exception only
            what = source if isinstance(source, Path) else "the edited ONNX graph"
            raise CheckpointError(f"onnxruntime cannot load {what}: {err}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        try:
            logits = self.session.run(None, {self.input_name: array})[0]
        except Exception as err:  # onnxruntime's errors derive from Exception only
            raise RuntimeError(f"onnxruntime could not run the model: {err}") from None
        return torch.from_numpy(logits).to(device=x.device, dtype=x.dtype)


class FixedBatch(nn.Module):
    """A model exported with a fixed batch size (an export without dynamic axes), fed chunks of
    exactly that size: the last chunk is padded with copies of its last row, whose outputs are
    dropped. Torch operations throughout, so input gradients flow where the model has them."""

    def __init__(self, module: nn.Module, batch: int) -> None:
        super().__init__()
        self.module, self.batch = module, batch

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            short = self.batch - len(chunk)
            if short:
                chunk = torch.cat([chunk, chunk[-1:].expand(short, *chunk.shape[1:])])
            outputs.append(self.module(chunk)[: self.batch - short])
        return torch.cat(outputs)


def onnxruntime_classifier(source: Path | bytes, fixed_batch: int | None) -> nn.Module:
    """``OnnxRuntimeClassifier`` of ``source``, fed in chunks when the file fixes the batch size."""
    classifier = OnnxRuntimeClassifier(source)
    return classifier if fixed_batch is None else FixedBatch(classifier, fixed_batch)


def _read(path: Path) -> Any:
    onnx = require("onnx", "loading an ONNX model")
    from google.protobuf.message import DecodeError  # protobuf comes with onnx

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, DecodeError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid ONNX model: {err}") from None
    return proto


def _fixed_batch(proto: Any) -> int | None:
    """The batch size the graph's input fixes (an export without dynamic axes), or None."""
    initializers = {init.name for init in proto.graph.initializer}
    graph_input = next(i for i in proto.graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
        return None
    return int(dims[0].dim_value)


# TensorProto's FLOAT, DOUBLE, FLOAT16 and BFLOAT16
_FLOAT_ELEMENT_TYPES = frozenset({1, 11, 10, 16})


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
    output_type = proto.graph.output[0].type.tensor_type.elem_type
    if output_type not in _FLOAT_ELEMENT_TYPES:
        raise ConfigError(f"{path} returns outputs of ONNX element type {output_type}; fortify needs "
                          "floating-point logits (FLOAT, FLOAT16, BFLOAT16 or DOUBLE: types "
                          f"{', '.join(map(str, sorted(_FLOAT_ELEMENT_TYPES)))})")
    dims = tensor_type.shape.dim[1:]  # without the batch dimension
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _bypass_final_softmax(proto: Any) -> bool:
    """Turn a Softmax over the last (class) axis that produces the graph's output into an Identity,
    in place; True when it did. Input and output names stay, so the graph's output and its
    value_info stay valid.

    Attacks need logits: on saturated probabilities their gradients vanish and robustness looks
    better than it is. Anything else is left as it is; a final LogSoftmax, for one, gives logits up
    to a per-row constant, which changes neither the cross-entropy nor the margins.
    """
    output = proto.graph.output[0].name
    node = next((n for n in proto.graph.node if output in n.output), None)
    if node is None or node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return False
    # onnx's checker (run by _read) requires the main graph's outputs to declare their shape
    rank = len(proto.graph.output[0].type.tensor_type.shape.dim)
    if _softmax_axis(node, _default_opset(proto)) not in (-1, rank - 1):
        return False
    node.op_type = "Identity"
    del node.attribute[:]  # Identity takes no attributes; Softmax's one input is Identity's
    return True


def _softmax_axis(node: Any, opset: int) -> int:
    explicit = [attribute.i for attribute in node.attribute if attribute.name == "axis"]
    # the default moved from 1 to -1 in opset 13; before it, Softmax flattened the axes from `axis`
    # on into one, which on the last axis alone is the same function
    return explicit[0] if explicit else (-1 if opset >= 13 else 1)


def _default_opset(proto: Any) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def load_onnx_model(path: Path) -> LoadedOnnx:
    """Convert with onnx2torch; fall back to onnxruntime (black-box) for unsupported operators."""
    path = Path(path)
    if path.suffix not in ONNX_SUFFIXES:
        raise ConfigError(f"{path} is not an ONNX file; ONNX suffixes: {', '.join(ONNX_SUFFIXES)}")
    if not path.is_file():
        raise CheckpointError(f"ONNX model file {path} does not exist")
    proto = _read(path)
    declared = _graph_input_shape(proto, path)
    batch = _fixed_batch(proto)
    bypassed = _bypass_final_softmax(proto)
    # onnxruntime must run the same edited graph; the file itself when there was nothing to edit
    source = proto.SerializeToString() if bypassed else path
    onnx2torch = require("onnx2torch", "converting an ONNX model to torch")
    try:
        module = onnx2torch.convert(proto)
    except (NotImplementedError, RuntimeError, ValueError, KeyError) as err:
        note = f"onnx2torch cannot convert it ({err}); it runs in onnxruntime"
        fallback = onnxruntime_classifier(source, batch)
        return LoadedOnnx(fallback, declared, "onnxruntime", note, bypassed, source)
    # a graph exported for one batch size may have it baked into a reshape: feed it that size
    converted = module.eval() if batch is None else FixedBatch(module.eval(), batch)
    return LoadedOnnx(converted, declared, "onnx2torch", "converted to torch by onnx2torch", bypassed, source)
