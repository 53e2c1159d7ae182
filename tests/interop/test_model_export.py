"""Export: each format, reloaded by its own runtime, returns the model's logits."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import file_size_limit
from fortify.cli import app
from fortify.errors import CheckpointError, ConfigError
from fortify.interop.export import export_model, load_safetensors_export
from fortify.models import build_model
from fortify.pipeline import MODEL_CARD, load_trained_model, write_json
from fortify.training import checkpoint as ckpt

MEAN, STD = [0.3], [0.4]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A finished fortify model directory: small CNN with a Normalize layer, random weights."""
    directory = tmp_path_factory.mktemp("export") / "model"
    directory.mkdir()
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), 10, mean=MEAN, std=STD)
    write_json(directory / MODEL_CARD, {"name": "small-cnn", "input_shape": [1, 8, 8], "num_classes": 10,
                                        "bounds": [0.0, 1.0], "mean": MEAN, "std": STD})
    digest = ckpt.save_weights(directory / "model.safetensors", model)
    ckpt.write_state_json(directory, {"finished": True, "sha256": {"model.safetensors": digest}})
    return directory


def _reference(model_dir, x):
    model, _ = load_trained_model(model_dir, torch.device("cpu"))
    with torch.inference_mode():
        return model(x)


def _onnxruntime_logits(path, x):
    runtime = pytest.importorskip("onnxruntime")
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _torchscript_logits(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return loaded(x)


def _safetensors_logits(path, x):
    with torch.inference_mode():  # the documented reload: the card in the file names the architecture
        return load_safetensors_export(path)(x)


@pytest.mark.parametrize("fmt, reload", [("onnx", _onnxruntime_logits), ("torchscript", _torchscript_logits),
                                         ("safetensors", _safetensors_logits)])
def test_export_reloads_to_the_same_logits(model_dir, tmp_path, fmt, reload):
    # Prepare: a batch of another size than the exporter's, to check the batch axis is free
    x = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    # Execute
    suffix = ".pt" if fmt == "torchscript" else f".{fmt}"
    result = export_model(model_dir, fmt, tmp_path / f"hardened{suffix}")
    # Assert: the export, reloaded without fortify's loader, gives the logits of the trained model
    torch.testing.assert_close(reload(result.path, x), _reference(model_dir, x), atol=1e-5, rtol=1e-5)
    assert result.max_abs_difference <= 1e-5 and result.verified_on == 64
    card = json.loads(result.card_path.read_text())
    assert card["layout"] == "nchw" and card["input_range"] == [0.0, 1.0] and card["outputs"] == "logits"
    assert card["normalization"] == {"mean": MEAN, "std": STD, "applied": "inside the model"}


def test_safetensors_export_card_names_the_architecture_and_box(model_dir, tmp_path):
    result = export_model(model_dir, "safetensors", tmp_path / "m.safetensors")
    with safe_open(str(result.path), framework="pt") as handle:
        card = json.loads(handle.metadata()["model_card"])
    assert card["name"] == "small-cnn" and card["bounds"] == [0.0, 1.0] and card["mean"] == MEAN


def test_a_training_checkpoint_is_not_taken_for_an_export(model_dir):
    # model.safetensors of a model directory holds fortify weights but no model card
    with pytest.raises(CheckpointError, match="no model card"):
        load_safetensors_export(model_dir / "model.safetensors")


def test_cli_export_from_a_run_directory_takes_the_hardened_model(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "models" / "pgd")
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    exported = run_dir / "models" / "pgd" / "export" / "model.pt"
    assert exported.is_file() and exported.with_name(exported.name + ".card.json").is_file()
    assert "max |difference|" in result.output
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(_torchscript_logits(exported, x), _reference(model_dir, x))


def test_exports_of_two_formats_into_one_folder_keep_a_card_each(model_dir, tmp_path):
    # the card was named model.card.json for every format: the second export overwrote the first's
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir)
    for fmt in ("torchscript", "safetensors"):
        assert CliRunner().invoke(app, ["export", str(run_dir), "--format", fmt]).exit_code == 0
    cards = {name: json.loads((run_dir / "export" / f"model.{name}.card.json").read_text())
             for name in ("pt", "safetensors")}
    assert cards["pt"]["format"] == "torchscript" and cards["safetensors"]["format"] == "safetensors"


@pytest.mark.parametrize("args, fragment", [
    (["--format", "tflite"], "unknown export format 'tflite'; valid formats: onnx, torchscript, safetensors"),
    (["--format", "onnx", "--out", "model.pt"], "a onnx export is written to a .onnx file"),
    (["--member", "trades"], "holds no model 'trades'; models in it: pgd"),
])
def test_cli_export_errors(model_dir, tmp_path, args, fragment):
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "models" / "pgd")
    result = CliRunner().invoke(app, ["export", str(run_dir), *args])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert isinstance(result.exception, SystemExit)


def test_export_refuses_an_unfinished_or_foreign_directory(model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="holds no trained fortify model"):
        export_model(tmp_path, "onnx")
    with pytest.raises(CheckpointError, match="does not exist or is not a directory"):
        export_model(tmp_path / "missing", "onnx")
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        export_model(copy, "safetensors")
    with pytest.raises(ConfigError, match="valid formats"):
        export_model(model_dir, "pickle")


@pytest.mark.parametrize("fields, outcome", [
    ({"bounds": None}, "records no input box"),
    ({"bounds": "absent"}, "records no input box"),
    ({"mean": "absent", "std": "absent"}, None),
], ids=["bounds-null", "bounds-absent", "normalisation-absent"])
def test_a_card_without_its_optional_fields_is_exported_or_refused_clearly(tmp_path, fields, outcome):
    # Prepare: a model directory whose card leaves out fields a card may omit (no card hash recorded)
    plain = tmp_path / "plain"
    plain.mkdir()
    model = build_model("small-cnn", (1, 8, 8), 10)
    card = {"name": "small-cnn", "input_shape": [1, 8, 8], "num_classes": 10, "bounds": [0.0, 1.0],
            "mean": None, "std": None}
    card = {k: v for k, v in {**card, **fields}.items() if v != "absent"}
    write_json(plain / MODEL_CARD, card)
    digest = ckpt.save_weights(plain / "model.safetensors", model)
    ckpt.write_state_json(plain, {"finished": True, "sha256": {"model.safetensors": digest}})
    # Execute / Assert: a CheckpointError naming what is missing, or an export without normalisation
    if outcome is not None:
        with pytest.raises(CheckpointError, match=outcome):
            export_model(plain, "torchscript", tmp_path / "model.pt")
        assert not (tmp_path / "model.pt").exists()
        return
    result = export_model(plain, "torchscript", tmp_path / "model.pt")
    assert json.loads(result.card_path.read_text())["normalization"] is None


def test_export_refuses_to_overwrite_another_models_files(model_dir, tmp_path):
    # Prepare: a run of two models; the export of one aimed at the other's weights
    run_dir = tmp_path / "run"
    for member in ("pgd", "standard"):
        shutil.copytree(model_dir, run_dir / "models" / member)
    target = run_dir / "models" / "standard" / "model.safetensors"
    before = target.read_bytes()
    # Execute / Assert: refused, and the other model's weights are as they were
    with pytest.raises(ConfigError, match="is one of a model directory's own files"):
        export_model(run_dir, "safetensors", target, member="pgd")
    assert target.read_bytes() == before
    load_trained_model(run_dir / "models" / "standard", torch.device("cpu"))


def test_a_card_nested_too_deep_for_json_is_refused(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    genuine = export_model(model_dir, "safetensors", tmp_path / "m.safetensors").path
    with safe_open(str(genuine), framework="pt") as handle:
        metadata = handle.metadata()
    edited = tmp_path / "deep.safetensors"
    save_file(load_file(str(genuine)), str(edited),
              metadata={**metadata, "model_card": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_safetensors_export(edited)


def test_an_export_that_cannot_be_reloaded_is_not_left_behind(model_dir, tmp_path, monkeypatch):
    from fortify.errors import MissingDependencyError
    from fortify.interop import export as export_module

    def no_runtime(out, model_dir):
        raise MissingDependencyError("onnxruntime is needed for checking an ONNX export")

    monkeypatch.setitem(export_module._RELOADERS, "onnx", no_runtime)
    with pytest.raises(MissingDependencyError):
        export_model(model_dir, "onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_an_onnx_export_without_its_packages_names_the_pip_command_before_writing(model_dir, tmp_path,
                                                                                  monkeypatch, missing):
    # without onnx, torch's exporter failed with a traceback of its own
    from fortify.errors import MissingDependencyError

    monkeypatch.setitem(__import__("sys").modules, missing, None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=rf"{missing}.*pip install 'fortify\[onnx\]'"):
        export_model(model_dir, "onnx", tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, fragment", [
    ({"num_classes": "abc"}, "is not a fortify model card"),
    ({"num_classes": -1}, "is not a fortify model card"),
    ({"num_classes": True}, "is not a fortify model card"),
    ({"input_shape": [-5]}, "is not a fortify model card"),
    ({"input_shape": [10**12]}, "is not a fortify model card"),
    ({"name": "nope"}, "describes no model fortify can build: unknown model 'nope'"),
    ({"mean": [0.1, 0.2], "std": [0.0, 1.0]}, "is not a fortify model card: mean and std must be lists of 1"),
    ({"mean": "a", "std": "b"}, "is not a fortify model card: mean and std"),
    ({"mean": [None], "std": [1.0]}, "is not a fortify model card: mean and std"),
    ({"mean": [0.5], "std": None}, "is not a fortify model card: mean and std must be given together"),
    ({"bounds": ["a", "b"]}, "is not a fortify model card: bounds must be two finite numbers"),
    ({"bounds": 5}, "is not a fortify model card: bounds"),
    ({"bounds": [1.0, 0.0]}, "is not a fortify model card: bounds"),
    ({"input_encoding": "abc"}, "is not a fortify model card: its input_encoding is not a table schema"),
    ({"input_encoding": {"features": 5}}, "is not a fortify model card: its input_encoding"),
    ({"opacus_fixed": "yes"}, "is not a fortify model card: opacus_fixed must be true or false"),
    ({"preprocess": "x / 255"}, "is not a fortify model card: unknown field 'preprocess'; a card holds"),
    ({"data_sha256": "abc"}, "is not a fortify model card: data_sha256 must be a SHA-256 in 64 hex digits"),
], ids=["classes-text", "classes-negative", "classes-bool", "shape-negative", "shape-huge", "name",
        "normalisation", "normalisation-text", "normalisation-null", "normalisation-half", "bounds-text",
        "bounds-number", "bounds-reversed", "encoding-text", "encoding-features", "opacus-fixed-text",
        "unknown-field", "data-hash-short"])
def test_an_edited_card_in_an_export_is_refused_before_any_model_is_built(model_dir, tmp_path, edit,
                                                                          fragment):
    # Prepare: a genuine export whose card is then edited (an export carries no hash of its card)
    from safetensors.torch import load_file, save_file

    genuine = export_model(model_dir, "safetensors", tmp_path / "m.safetensors").path
    with safe_open(str(genuine), framework="pt") as handle:
        metadata = handle.metadata()
    card = {**json.loads(metadata["model_card"]), **edit}
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(genuine)), str(edited), metadata={**metadata, "model_card": json.dumps(card)})
    # Execute / Assert
    with pytest.raises(CheckpointError, match=fragment):
        load_safetensors_export(edited)


@pytest.mark.parametrize("change, fragment", [
    (lambda logits: logits + 1e-2, "differs from the model by up to"),
    (lambda logits: logits[:, :5], "returns shape"),
    (lambda logits: logits * float("nan"), "differs from the model by up to nan"),
], ids=["values", "shape", "nan"])
def test_an_export_that_differs_from_the_model_is_deleted(model_dir, tmp_path, monkeypatch, change, fragment):
    # Prepare: a reloader that returns other logits than the export holds
    from fortify.interop import export as export_module

    honest = export_module._RELOADERS["torchscript"]
    monkeypatch.setitem(export_module._RELOADERS, "torchscript",
                        lambda out, directory: (lambda x: change(honest(out, directory)(x))))
    # Execute / Assert
    with pytest.raises(CheckpointError, match=fragment):
        export_model(model_dir, "torchscript", tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the export nor its copy aside


def test_a_failed_export_keeps_the_earlier_export_at_its_path(model_dir, tmp_path, monkeypatch):
    from fortify.interop import export as export_module

    first = export_model(model_dir, "torchscript", tmp_path / "model.pt")
    before = first.path.read_bytes(), first.card_path.read_bytes()
    honest = export_module._RELOADERS["torchscript"]
    monkeypatch.setitem(export_module._RELOADERS, "torchscript",
                        lambda out, directory: (lambda x: honest(out, directory)(x) + 1.0))
    with pytest.raises(CheckpointError, match="it was not written"):
        export_model(model_dir, "torchscript", tmp_path / "model.pt")
    assert (first.path.read_bytes(), first.card_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.card.json"]


def test_an_export_replaces_an_earlier_export_but_no_other_file(model_dir, tmp_path):
    # Prepare: an earlier export (its card beside it) and a file of someone else's
    export_model(model_dir, "safetensors", tmp_path / "model.safetensors")
    foreign = tmp_path / "mine.onnx"
    foreign.write_bytes(b"someone's model")
    # Execute / Assert: the export is written again; the foreign file is refused and kept
    again = export_model(model_dir, "safetensors", tmp_path / "model.safetensors")
    assert again.max_abs_difference == 0.0
    with pytest.raises(ConfigError, match="mine.onnx already exists and is no fortify export "
                                          "\\(it has no mine.onnx.card.json beside it\\)"):
        export_model(model_dir, "onnx", foreign)
    assert foreign.read_bytes() == b"someone's model"


def test_member_is_refused_for_a_model_directory(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--member picks a model in a run directory; .* is a model dir"):
        export_model(model_dir, "safetensors", tmp_path / "m.safetensors", member="standard")
    assert not (tmp_path / "m.safetensors").exists()


_EXPORT = """
from pathlib import Path
from fortify.interop.export import export_model
from fortify.errors import CheckpointError
try:
    export_model(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
except CheckpointError as err:
    print("refused:", err)
"""


@pytest.mark.skipif(not file_size_limit.SUPPORTED, reason="needs POSIX file size limits")
@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("safetensors", ".safetensors")])
def test_an_export_the_disk_cannot_hold_is_a_checkpoint_error_and_leaves_nothing(model_dir, tmp_path, fmt,
                                                                                  suffix):
    # torch.jit.save aborted the whole process (a C++ error, exit 134) when the disk filled under it
    out = tmp_path / f"model{suffix}"
    proc = file_size_limit.run_with_file_size_limit(_EXPORT, model_dir, fmt, out, limit=4_000)
    assert proc.returncode == 0, proc.stderr
    assert f"refused: cannot write {out}: File too large" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_card_that_does_not_fit_its_weights_is_refused_before_the_model_is_built(model_dir, tmp_path,
                                                                                  monkeypatch):
    # Prepare: the export's card edited to another input size. At 4096 x 4096, which the card's own
    # limits (2**24 input values) let through, small-cnn was built with a 32 GiB linear layer before
    # the weights were compared; 64 x 64 shows the same order of checks at a few MB
    from safetensors.torch import load_file, save_file

    from fortify import pipeline

    genuine = export_model(model_dir, "safetensors", tmp_path / "m.safetensors").path
    with safe_open(str(genuine), framework="pt") as handle:
        metadata = handle.metadata()
    card = {**json.loads(metadata["model_card"]), "input_shape": [1, 64, 64]}
    edited = tmp_path / "huge.safetensors"
    save_file(load_file(str(genuine)), str(edited), metadata={**metadata, "model_card": json.dumps(card)})
    built = []
    real_build = pipeline.build_model
    monkeypatch.setattr(pipeline, "build_model", lambda *a, **k: built.append(
        torch.empty(0).device.type) or real_build(*a, **k))
    # Execute / Assert: refused by the shapes, after building on the meta device only
    with pytest.raises(CheckpointError, match="does not fit this model: .*wrong shape"):
        load_safetensors_export(edited)
    assert built == ["meta"]
    # the same check guards a model directory whose card is not hashed (written before cards were)
    state = json.loads((model_dir / "state.json").read_text())
    unhashed = tmp_path / "unhashed"
    shutil.copytree(model_dir, unhashed)
    state["sha256"].pop("model.json", None)
    (unhashed / "state.json").write_text(json.dumps(state))
    (unhashed / "model.json").write_text(json.dumps({**json.loads((model_dir / "model.json").read_text()),
                                                    "input_shape": [1, 64, 64]}))
    built.clear()
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_trained_model(unhashed, torch.device("cpu"))
    assert built == ["meta"]


def test_an_export_whose_card_cannot_be_written_leaves_the_earlier_pair_as_it_was(model_dir, tmp_path,
                                                                                   monkeypatch):
    # Prepare: an earlier export (its bytes marked, so that a replacement shows), then a disk that
    # fills while the new card is written
    from fortify.interop import export as export_module

    out = tmp_path / "m.safetensors"
    card_path = export_model(model_dir, "safetensors", out).card_path
    out.write_bytes(b"the earlier export")
    card_path.write_text('{"format": "safetensors", "source": "the earlier model"}')
    real_write = export_module._write_flushed

    def full_disk_for_cards(path, data, named):
        if named.name.endswith(".card.json"):
            raise CheckpointError(f"cannot write {named}: No space left on device")
        real_write(path, data, named)

    monkeypatch.setattr(export_module, "_write_flushed", full_disk_for_cards)
    # Execute: the card was written after the new export had replaced the old one
    with pytest.raises(CheckpointError, match="No space left"):
        export_model(model_dir, "safetensors", out)
    # Assert: the earlier export beside its own card, and no temporary file left
    assert out.read_bytes() == b"the earlier export"
    assert "the earlier model" in card_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.safetensors",
                                                                         "m.safetensors.card.json"]


def test_a_card_with_a_number_longer_than_python_reads_is_refused(model_dir, tmp_path):
    # json raises a plain ValueError past 4,300 digits, which the readers let through as a traceback
    from safetensors.torch import load_file, save_file

    genuine = export_model(model_dir, "safetensors", tmp_path / "m.safetensors").path
    with safe_open(str(genuine), framework="pt") as handle:
        metadata = handle.metadata()
    long_number = '{"name": "small-cnn", "num_classes": ' + "9" * 5000 + "}"
    edited = tmp_path / "long.safetensors"
    save_file(load_file(str(genuine)), str(edited), metadata={**metadata, "model_card": long_number})
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_safetensors_export(edited)
    unhashed = tmp_path / "unhashed"
    shutil.copytree(model_dir, unhashed)
    state = json.loads((unhashed / "state.json").read_text())
    state["sha256"].pop("model.json", None)
    (unhashed / "state.json").write_text(json.dumps(state))
    (unhashed / "model.json").write_text(long_number)
    with pytest.raises(CheckpointError, match="is not a readable model card"):
        load_trained_model(unhashed, torch.device("cpu"))


def test_a_safetensors_export_with_an_edited_weight_is_refused(model_dir, tmp_path):
    # its marker alone let an edited export load: one output bias + 100 made it predict that class always
    from safetensors.torch import load_file, save_file

    genuine = export_model(model_dir, "safetensors", tmp_path / "m.safetensors").path
    with safe_open(str(genuine), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(genuine))
    bias = sorted(name for name in tensors if name.endswith("bias"))[-1]
    tensors[bias] = tensors[bias].clone()
    tensors[bias][3] += 100.0
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    with pytest.raises(CheckpointError, match="do not match the digest recorded beside them"):
        load_safetensors_export(edited)
    load_safetensors_export(genuine)  # the export as written loads
