"""A small trained torch classifier on digits, and its twins written as Keras and ONNX files.

The twins hold the same weights as the torch model, rearranged into each framework's own layout,
so any difference in what fortify measures on them is a difference in fortify's interop code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fortify.data import Dataset


@pytest.fixture(scope="session")
def reference_model(digits: Dataset) -> nn.Module:
    """Conv(1->8, 3x3, same) + ReLU + Flatten + Linear(512->10), about 95% clean accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(6):
        for x, y in digits.train.batches(64, generator=shuffle):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    return model.eval()


def _weights(model: nn.Module) -> tuple[np.ndarray, ...]:
    conv, linear = model[0], model[3]
    return (conv.weight.detach().numpy(), conv.bias.detach().numpy(),
            linear.weight.detach().numpy(), linear.bias.detach().numpy())


@pytest.fixture(scope="session")
def keras_twin(reference_model, tmp_path_factory):
    """``make(input_scale=1, softmax=False) -> path`` of a channels-last .keras file (``softmax``: see make).

    ``input_scale`` builds a model that expects inputs multiplied by it (e.g. pixels in [0, 255]):
    its first kernel is divided by the scale, so on scaled inputs it computes the same logits.
    """
    from fortify.interop.keras import import_keras

    keras = import_keras()
    conv_w, conv_b, dense_w, dense_b = _weights(reference_model)

    def make(input_scale: float = 1.0, softmax: bool | str = False):
        # softmax: True as the Dense layer's activation, "layer" as a Softmax layer after it,
        # "nested" as the Dense activation of a Sequential wrapped in a Functional model
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax" if softmax in (True, "nested") else None),
            *([keras.layers.Softmax()] if softmax == "layer" else []),
        ])
        model.layers[0].set_weights([conv_w.transpose(2, 3, 1, 0) / input_scale, conv_b])
        # torch flattens (C, H, W), Keras (H, W, C): reorder the dense inputs to match
        kernel = dense_w.reshape(10, 8, 8, 8).transpose(0, 2, 3, 1).reshape(10, -1).T
        model.layers[2].set_weights([kernel, dense_b])
        if softmax == "nested":
            inputs = keras.Input((8, 8, 1))
            model = keras.Model(inputs, model(inputs))
        path = tmp_path_factory.mktemp("keras") / "model.keras"
        model.save(str(path))
        return path

    return make


@pytest.fixture(scope="session")
def onnx_twin(reference_model, tmp_path_factory):
    """``make(prefix_ops=(), batch="batch", suffix_ops=(), opset=17) -> path`` of an NCHW .onnx file;
    ``prefix_ops`` run on the input first, ``suffix_ops`` on the logits last (e.g. a softmax); an
    integer ``batch`` fixes the batch size, as an export without dynamic axes does.

    Each prefix or suffix op is ``(op_type, attributes, constants)`` applied as ``op(x, *constants)``.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    conv_w, conv_b, dense_w, dense_b = _weights(reference_model)

    def chain(ops, current, stage, nodes, initializers):
        for index, (op_type, attributes, constants) in enumerate(ops):
            names = []
            for position, value in enumerate(constants):
                name = f"{stage}{index}_c{position}"
                initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
                names.append(name)
            nodes.append(helper.make_node(op_type, [current, *names], [f"{stage}{index}"], **attributes))
            current = f"{stage}{index}"
        return current

    def make(prefix_ops=(), batch="batch", suffix_ops=(), opset=17):
        nodes, initializers = [], []
        current = chain(prefix_ops, "input", "prefix", nodes, initializers)
        initializers += [numpy_helper.from_array(w, n) for w, n in
                         [(conv_w, "conv_w"), (conv_b, "conv_b"), (dense_w, "dense_w"), (dense_b, "dense_b")]]
        nodes += [
            helper.make_node("Conv", [current, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["logits"], transB=1),
        ]
        output = chain(suffix_ops, "logits", "suffix", nodes, initializers)
        graph = helper.make_graph(
            nodes, "twin", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, 10])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        path = tmp_path_factory.mktemp("onnx") / "model.onnx"
        onnx.save(model, str(path))
        return path

    return make


@pytest.fixture(scope="session")
def softmax_export(reference_model, tmp_path_factory):
    """``make(opset) -> path``: the reference model followed by ``nn.Softmax(dim=1)``, written by
    ``torch.onnx.export`` with a dynamic batch, as a classifier that returns probabilities is."""
    pytest.importorskip("onnx")

    def make(opset: int):
        path = tmp_path_factory.mktemp("softmax-export") / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
            torch.onnx.export(nn.Sequential(reference_model, nn.Softmax(dim=1)), (torch.zeros(1, 1, 8, 8),),
                              str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["probabilities"],
                              dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}})
        return path

    return make
