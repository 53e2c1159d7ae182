"""Export a trained fortify model for deployment: ONNX, TorchScript or plain safetensors.

The exported model includes the ``Normalize`` layer, so it takes the same inputs as during training
and evaluation (channels first, values in the dataset's box) and returns logits. A card next to the
file states that convention. Every export is reloaded and compared with the original on a random
batch before it is reported as written; one that differs is deleted.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import fortify
from fortify.errors import CheckpointError, ConfigError, FortifyError
from fortify.interop.dependencies import require
from fortify.pipeline import MODEL_CARD, check_model_card, load_trained_model, model_from_card
from fortify.training import checkpoint as ckpt

EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
ONNX_OPSET = 17
VERIFY_BATCH = 64
TOLERANCE = 1e-4  # relative to the largest logit; float32 re-ordering stays near 1e-6


@dataclass
class ExportResult:
    path: Path
    card_path: Path
    format: str
    max_abs_difference: float
    verified_on: int  # random inputs in the box the reloaded export was compared on


# what fortify train keeps in a model directory; an export must not replace any of them
_MODEL_DIR_FILES = frozenset({"model.safetensors", "last.safetensors", "best.safetensors",
                              "state.safetensors", "state.json", MODEL_CARD, "config.yaml", "training.json",
                              "robustness.json"})


def find_model_dir(run_dir: Path, member: str = "pgd") -> Path:
    """A model directory, or the ``models/<member>`` model inside a ``fortify run`` directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist or is not a directory; give a model directory "
                              "(fortify train --out) or a run directory (fortify run --out)")
    if (run_dir / MODEL_CARD).is_file():
        return run_dir
    candidate = run_dir / "models" / member
    if (candidate / MODEL_CARD).is_file():
        return candidate
    members = sorted(p.name for p in (run_dir / "models").glob("*") if (p / MODEL_CARD).is_file())
    if members:
        raise ConfigError(f"{run_dir} holds no model {member!r}; models in it: {', '.join(members)}")
    raise CheckpointError(f"{run_dir} holds no trained fortify model ({MODEL_CARD} missing)")


def export_model(run_dir: Path, fmt: str, out: Path | None = None, *, member: str = "pgd") -> ExportResult:
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    model_dir = find_model_dir(run_dir, member)
    suffix = EXPORT_FORMATS[fmt]
    out = Path(out) if out is not None else model_dir / "export" / f"model{suffix}"
    if out.suffix != suffix:
        raise ConfigError(f"a {fmt} export is written to a {suffix} file; got {out}")
    # any model directory's files, not only this one's: another model's weights would be lost
    if out.name in _MODEL_DIR_FILES and (out.resolve().parent / MODEL_CARD).is_file():
        raise ConfigError(f"{out} is one of a model directory's own files; export elsewhere "
                          f"(default {model_dir / 'export' / ('model' + suffix)})")
    for module, purpose in _NEEDS.get(fmt, ()):  # a missing package named before anything is written
        require(module, purpose)
    model, card = load_trained_model(model_dir, torch.device("cpu"))
    inputs = _random_inputs(card)
    out.parent.mkdir(parents=True, exist_ok=True)
    _WRITERS[fmt](model, card, inputs, out)
    try:  # an export that cannot be reloaded and compared is not left behind as if it were checked
        difference = _verify(model, _RELOADERS[fmt](out, model_dir), inputs, out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    # named after the whole file name: exports of several formats into one folder keep a card each
    card_path = out.with_name(out.name + ".card.json")
    card_path.write_text(json.dumps(_deployment_card(card, fmt, model_dir), indent=2))
    return ExportResult(out, card_path, fmt, difference, len(inputs))


def _random_inputs(card: dict[str, Any]) -> Tensor:
    low, high = card["bounds"]
    generator = torch.Generator().manual_seed(0)
    return low + (high - low) * torch.rand(VERIFY_BATCH, *card["input_shape"], generator=generator)


def _deployment_card(card: dict[str, Any], fmt: str, model_dir: Path) -> dict[str, Any]:
    return {"format": fmt, "source": str(model_dir), "architecture": card["name"],
            "input_name": "input", "input_shape": ["batch", *card["input_shape"]], "layout": "nchw",
            "input_range": card["bounds"], "num_classes": card["num_classes"], "outputs": "logits",
            "normalization": ({"mean": card["mean"], "std": card["std"], "applied": "inside the model"}
                              if card["mean"] is not None else None),
            # a table's columns in order, each min-max scaled by its bounds or one-hot over its
            # categories before the model sees it (fortify.tabular.Schema.encode)
            "input_encoding": ({**card["input_encoding"], "applied": "outside the model"}
                               if card.get("input_encoding") else None),
            "fortify_version": fortify.__version__}


# -- writers -----------------------------------------------------------------------------------

def _write_onnx(model: nn.Module, card: dict[str, Any], inputs: Tensor, out: Path) -> None:
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated upstream in favour of one that needs
        # onnxscript; it still writes standard ONNX, which the reload below checks
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (inputs[:1],), str(out), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _write_torchscript(model: nn.Module, card: dict[str, Any], inputs: Tensor, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still loads
        torch.jit.save(torch.jit.trace(model, inputs[:1]), str(out))


def _write_safetensors(model: nn.Module, card: dict[str, Any], inputs: Tensor, out: Path) -> None:
    # fortify's checkpoint marker plus the model card: load_safetensors_export rebuilds the model
    # from this one file
    metadata = {"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "kind": "weights",
                "model_card": json.dumps(card)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(tensors, str(out), metadata=metadata)
    except SafetensorError as err:  # safetensors reports I/O failures as its own error
        raise CheckpointError(f"cannot write {out}: {err}") from None


# the optional packages each format's writing and checking take (torch.onnx.export needs onnx)
_NEEDS = {"onnx": (("onnx", "exporting to ONNX"), ("onnxruntime", "checking an ONNX export"))}
_WRITERS: dict[str, Callable[[nn.Module, dict[str, Any], Tensor, Path], None]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}


def load_safetensors_export(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a safetensors export, rebuilt from the model card in its metadata; in eval mode.

    The file is read without unpickling; one fortify did not write, or a training checkpoint
    without a card, is refused with a CheckpointError.
    """
    path = Path(path)
    ckpt.load_tensors(path, "weights")  # refuses foreign, pickled and other kinds of files first
    with safe_open(str(path), framework="pt") as handle:
        card_text = (handle.metadata() or {}).get("model_card")
    if card_text is None:
        raise CheckpointError(f"{path} holds fortify weights but no model card: it is not a safetensors "
                              "export; write one with `fortify export RUN_DIR --format safetensors`")
    try:
        card = json.loads(card_text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"the model card in {path} is unreadable ({err})") from None
    card = check_model_card(card, f"the model card in {path}")
    try:
        model = model_from_card(card)
    except (FortifyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"the model card in {path} describes no model fortify can build: "
                              f"{err}") from None
    ckpt.load_weights(path, model)
    return model.to(device).eval()


# -- reloading and checking --------------------------------------------------------------------

def _reload_onnx(out: Path, model_dir: Path) -> Callable[[Tensor], Tensor]:
    runtime = require("onnxruntime", "checking an ONNX export")
    session = runtime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _reload_torchscript(out: Path, model_dir: Path) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(out)).eval()


def _reload_safetensors(out: Path, model_dir: Path) -> Callable[[Tensor], Tensor]:
    # the architecture as fortify rebuilds it, emptied, then filled from the export alone
    model, _ = load_trained_model(model_dir, torch.device("cpu"))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    ckpt.load_weights(out, model)
    return model.eval()


_RELOADERS: dict[str, Callable[[Path, Path], Callable[[Tensor], Tensor]]] = {
    "onnx": _reload_onnx, "torchscript": _reload_torchscript, "safetensors": _reload_safetensors}


def _verify(model: nn.Module, reloaded: Callable[[Tensor], Tensor], inputs: Tensor, out: Path) -> float:
    with torch.inference_mode():
        expected, got = model(inputs), reloaded(inputs)
    if got.shape != expected.shape:
        out.unlink()
        raise CheckpointError(f"the export {out} returns shape {tuple(got.shape)}, the model "
                              f"{tuple(expected.shape)}; the export was deleted")
    difference = float((got - expected).abs().max())
    allowed = TOLERANCE * max(1.0, float(expected.abs().max()))
    if not difference <= allowed:  # NaN too: a model that outputs NaN cannot be checked
        out.unlink()
        raise CheckpointError(f"the export {out} differs from the model by up to {difference:.3g} on "
                              f"{len(inputs)} inputs (allowed {allowed:.3g}); the export was deleted")
    return difference
