"""Export a trained fortify model for deployment: ONNX, TorchScript or plain safetensors.

The exported model includes the ``Normalize`` layer, so it takes the same inputs as during training
and evaluation (channels first, values in the dataset's box) and returns logits. A card next to the
file states that convention. Every export is reloaded and compared with the original on a random
batch before it is reported as written; one that differs is deleted.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
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
WEIGHTS_DIGEST = "weights_sha256"  # in a safetensors export's metadata: ckpt.tensors_sha256 of its tensors


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


def find_model_dir(run_dir: Path, member: str | None = None) -> Path:
    """A model directory, or the ``models/<member>`` model inside a ``fortify run`` directory
    (``pgd`` unless named)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist or is not a directory; give a model directory "
                              "(fortify train --out) or a run directory (fortify run --out)")
    if (run_dir / MODEL_CARD).is_file():
        if member is not None:  # it would pick nothing: the directory is one model
            raise ConfigError(f"--member picks a model in a run directory; {run_dir} is a model directory "
                              "itself, so leave --member out")
        return run_dir
    member = "pgd" if member is None else member
    candidate = run_dir / "models" / member
    if (candidate / MODEL_CARD).is_file():
        return candidate
    members = sorted(p.name for p in (run_dir / "models").glob("*") if (p / MODEL_CARD).is_file())
    if members:
        raise ConfigError(f"{run_dir} holds no model {member!r}; models in it: {', '.join(members)}")
    raise CheckpointError(f"{run_dir} holds no trained fortify model ({MODEL_CARD} missing)")


def export_model(run_dir: Path, fmt: str, out: Path | None = None, *, member: str | None = None
                 ) -> ExportResult:
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
    # named after the whole file name: exports of several formats into one folder keep a card each
    card_path = out.with_name(out.name + ".card.json")
    if out.exists() and not card_path.is_file():
        raise ConfigError(f"{out} already exists and is no fortify export (it has no {card_path.name} beside "
                          "it); remove it or choose another --out")
    model, card = load_trained_model(model_dir, torch.device("cpu"))
    if card.get("bounds") is None:  # a card may leave it out; an export is checked in it and states it
        raise CheckpointError(f"the model card in {model_dir} records no input box (bounds), which an export "
                              "is checked in and whose card states it")
    inputs = _random_inputs(card)
    encoded = _WRITERS[fmt](model, card, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the export and its card written aside, flushed to disk and the export checked there, then both
    # renamed: one that cannot be written whole (a full disk), reloaded and compared is not left
    # behind as if it were checked, and an earlier export stays as it was, beside its own card
    tmp, card_tmp = (path.with_name(path.name + ".tmp") for path in (out, card_path))
    try:
        _write_flushed(tmp, encoded, out)
        difference = _verify(model, _RELOADERS[fmt](tmp, model_dir), inputs, out)
        deployment = json.dumps(_deployment_card(card, fmt, model_dir), indent=2).encode()
        _write_flushed(card_tmp, deployment, card_path)
        os.replace(tmp, out)
        os.replace(card_tmp, card_path)
        ckpt.flush_directory(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
        card_tmp.unlink(missing_ok=True)
    return ExportResult(out, card_path, fmt, difference, len(inputs))


def _write_flushed(path: Path, data: bytes, named: Path) -> None:
    try:
        path.write_bytes(data)
        ckpt.flush_to_disk(path)
    except OSError as err:
        raise CheckpointError(f"cannot write {named}: {err.strerror or err}") from None


def _random_inputs(card: dict[str, Any]) -> Tensor:
    low, high = card["bounds"]
    generator = torch.Generator().manual_seed(0)
    return low + (high - low) * torch.rand(VERIFY_BATCH, *card["input_shape"], generator=generator)


def _deployment_card(card: dict[str, Any], fmt: str, model_dir: Path) -> dict[str, Any]:
    return {"format": fmt, "source": str(model_dir), "architecture": card["name"],
            "input_name": "input", "input_shape": ["batch", *card["input_shape"]], "layout": "nchw",
            "input_range": card["bounds"], "num_classes": card["num_classes"], "outputs": "logits",
            "normalization": ({"mean": card["mean"], "std": card["std"], "applied": "inside the model"}
                              if card.get("mean") is not None else None),
            # a table's columns in order, each min-max scaled by its bounds or one-hot over its
            # categories before the model sees it (fortify.tabular.Schema.encode)
            "input_encoding": ({**card["input_encoding"], "applied": "outside the model"}
                               if card.get("input_encoding") else None),
            "fortify_version": fortify.__version__}


# -- writers -----------------------------------------------------------------------------------

def _write_onnx(model: nn.Module, card: dict[str, Any], inputs: Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated upstream in favour of one that needs
        # onnxscript; it still writes standard ONNX, which the reload below checks
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (inputs[:1],), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def _write_torchscript(model: nn.Module, card: dict[str, Any], inputs: Tensor) -> bytes:
    # into memory: torch.jit.save aborts the process (a C++ error) when the disk fills under it
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still loads
        torch.jit.save(torch.jit.trace(model, inputs[:1]), buffer)
    return buffer.getvalue()


def _write_safetensors(model: nn.Module, card: dict[str, Any], inputs: Tensor) -> bytes:
    # fortify's checkpoint marker plus the model card: load_safetensors_export rebuilds the model
    # from this one file
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # the weights' digest beside the card: an edited or damaged weight is refused on loading (a
    # check, not a signature: whoever rewrites the weights can rewrite the digest)
    metadata = {"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "kind": "weights",
                "model_card": json.dumps(card), WEIGHTS_DIGEST: ckpt.tensors_sha256(tensors)}
    return save(tensors, metadata=metadata)


# the optional packages each format's writing and checking take (torch.onnx.export needs onnx)
_NEEDS = {"onnx": (("onnx", "exporting to ONNX"), ("onnxruntime", "checking an ONNX export"))}
_WRITERS: dict[str, Callable[[nn.Module, dict[str, Any], Tensor], bytes]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}


def load_safetensors_export(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a safetensors export, rebuilt from the model card in its metadata; in eval mode.

    The file is read without unpickling; one fortify did not write, or a training checkpoint
    without a card, is refused with a CheckpointError.
    """
    path = Path(path)
    tensors = ckpt.load_tensors(path, "weights")  # refuses foreign, pickled and other kinds of files first
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    card_text = metadata.get("model_card")
    if card_text is None:
        raise CheckpointError(f"{path} holds fortify weights but no model card: it is not a safetensors "
                              "export; write one with `fortify export RUN_DIR --format safetensors`")
    if metadata.get(WEIGHTS_DIGEST) != ckpt.tensors_sha256(tensors):
        raise CheckpointError(f"the weights in {path} do not match the digest recorded beside them: the "
                              "file was edited or damaged after export; refusing to load it")
    try:
        card = json.loads(card_text)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or a number past 4,300 digits
        raise CheckpointError(f"the model card in {path} is unreadable ({err})") from None
    card = check_model_card(card, f"the model card in {path}")
    try:
        model = model_from_card(card, path)
    except CheckpointError:
        raise
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
        raise CheckpointError(f"the export {out} returns shape {tuple(got.shape)}, the model "
                              f"{tuple(expected.shape)}; it was not written")
    difference = float((got - expected).abs().max())
    allowed = TOLERANCE * max(1.0, float(expected.abs().max()))
    if not difference <= allowed:  # NaN too: a model that outputs NaN cannot be checked
        raise CheckpointError(f"the export {out} differs from the model by up to {difference:.3g} on "
                              f"{len(inputs)} inputs (allowed {allowed:.3g}); it was not written")
    return difference
