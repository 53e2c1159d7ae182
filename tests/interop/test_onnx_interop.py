"""ONNX classifiers: the same weights give the same robust accuracy as the native torch model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fortify.attacks import APGD, PGD, Square
from fortify.cli import app
from fortify.errors import CheckpointError, ConfigError, DataError, MissingDependencyError
from fortify.evaluation import evaluate
from fortify.interop.external import check_attacks_fit_access, load_external_model
from fortify.threat import ThreatModel

pytest.importorskip("onnx2torch")
pytest.importorskip("onnxruntime")

THREAT = ThreatModel("linf", 0.1)
# a Shrink with zero threshold and bias is the identity, and onnx2torch has no converter for it
IDENTITY_SHRINK = ("Shrink", {"lambd": 0.0, "bias": 0.0}, ())
# quantise to 8-bit levels: what deployed models often do, and a step with a zero gradient
QUANTISE = [("Mul", {}, (255.0,)), ("Round", {}, ()), ("Div", {}, (255.0,))]


def _robust_accuracy(model, attack, digits, n=150):
    test = digits.test.head(n)
    report = evaluate(model, test.x, test.y, [attack], THREAT, eps_grid=[])
    return report.clean_accuracy, report.attacks[0].adversarial_accuracy


def test_converted_onnx_model_matches_native_torch(onnx_twin, reference_model, digits):
    # Prepare
    external = load_external_model(onnx_twin(), digits)
    x = digits.test.x[:64]
    # Execute
    clean, robust = _robust_accuracy(external.module, PGD(THREAT, steps=10), digits)
    native_clean, native_robust = _robust_accuracy(reference_model, PGD(THREAT, steps=10), digits)
    # Assert: white-box through onnx2torch, same logits, same robust accuracy under PGD
    assert external.runtime == "onnx2torch" and external.access.kind == "white-box"
    assert external.card.layout == "nchw" and external.warnings == []
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)
    assert clean == native_clean >= 0.9
    assert robust == native_robust
    assert 0.0 < robust < clean  # a comparison that could have come out different


def test_unconvertible_onnx_model_runs_black_box_in_onnxruntime(onnx_twin, reference_model, digits):
    external = load_external_model(onnx_twin([IDENTITY_SHRINK]), digits)
    square = Square(THREAT, n_queries=60, seed=3)
    _, robust = _robust_accuracy(external.module, square, digits, n=80)
    _, native_robust = _robust_accuracy(reference_model, Square(THREAT, n_queries=60, seed=3), digits, n=80)
    assert external.runtime == "onnxruntime" and external.access.kind == "black-box"
    assert "Shrink" in external.warnings[0]
    assert robust == native_robust


def test_an_onnx_file_with_a_fixed_batch_of_one_runs_in_onnxruntime(onnx_twin, reference_model, digits):
    # torch.onnx.export without dynamic axes fixes the batch; onnxruntime refused the whole batch at once
    external = load_external_model(onnx_twin([IDENTITY_SHRINK], batch=1), digits)
    x = digits.test.x[:16]
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix, runtime", [([], "onnx2torch"), ([IDENTITY_SHRINK], "onnxruntime")])
def test_an_onnx_file_with_a_fixed_batch_of_ten_takes_any_batch(onnx_twin, reference_model, digits, prefix,
                                                                 runtime):
    # 16 and the 256-input conversion check are no multiples of 10: the last chunk is padded
    external = load_external_model(onnx_twin(prefix, batch=10), digits)
    assert external.runtime == runtime
    x = digits.test.x[:16]
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)
    assert external.access.white_box == (runtime == "onnx2torch")  # gradients flow through the chunks


def test_an_onnx_file_with_external_weights_loads_from_any_working_directory(onnx_twin, reference_model,
                                                                              digits, tmp_path, monkeypatch):
    # Prepare: the same graph with its weights in model.onnx.data beside it; run from elsewhere
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(onnx_twin()))
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    assert (path.parent / "model.onnx.data").is_file()
    monkeypatch.chdir(tmp_path)
    # Execute / Assert: the conversion check's onnxruntime finds the weights beside the file
    external = load_external_model(path, digits)
    x = digits.test.x[:16]
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)


def test_quantised_onnx_model_has_no_gradient_and_refuses_gradient_attacks(onnx_twin, digits):
    external = load_external_model(onnx_twin(QUANTISE), digits)
    assert external.runtime == "onnx2torch"
    assert external.access.kind == "black-box" and "zero" in external.access.reason
    with pytest.raises(ConfigError, match="attacks allowed: square, hopskipjump, transfer"):
        check_attacks_fit_access(["fgsm", "square"], external.access)
    check_attacks_fit_access(["square"], external.access)


def test_bad_model_files_give_clear_errors(tmp_path, digits, onnx_twin):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(CheckpointError, match="garbage.onnx is not a valid ONNX model"):
        load_external_model(garbage, digits)
    with pytest.raises(ConfigError, match=r"suffixes fortify reads: \.keras, \.h5, \.onnx"):
        load_external_model(tmp_path / "model.pb", digits)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_external_model(tmp_path / "missing.onnx", digits)
    with pytest.raises(DataError, match=r"expects inputs of shape \(1, 8, 8\).*in layout nhwc"):
        load_external_model(onnx_twin(), digits, layout="nhwc")


def test_missing_extra_names_the_pip_command(monkeypatch, onnx_twin, digits):
    monkeypatch.setitem(__import__("sys").modules, "onnx2torch", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'fortify\[onnx\]'"):
        load_external_model(onnx_twin(), digits)


def _evaluate_cli(*args):
    return CliRunner().invoke(app, ["evaluate", *[str(a) for a in args]])


def test_cli_evaluates_an_onnx_file_and_records_access(onnx_twin, tmp_path):
    out = tmp_path / "eval"
    result = _evaluate_cli("--model", onnx_twin(), "--dataset", "digits", "--attacks", "pgd", "--steps", 5,
                           "--eps", 0.1, "--n-examples", 60, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "robustness.json").read_text())
    assert saved["model"]["access"]["kind"] == "white-box"
    assert saved["model"]["card"] == {"layout": "nchw", "input_range": [0.0, 1.0], "mean": None, "std": None}
    robustness = saved["robustness"]
    assert robustness["n_examples"] == 60 and robustness["attacks"][0]["name"] == "pgd-5"
    assert robustness["attacks"][0]["adversarial_accuracy"] < robustness["clean_accuracy"]


@pytest.mark.parametrize("black_box", [False, True])
def test_cli_report_for_an_onnx_file(onnx_twin, tmp_path, black_box):
    out = tmp_path / "eval"
    attack = ["--queries", 30] if black_box else ["--attacks", "pgd", "--steps", 5]
    result = _evaluate_cli("--model", onnx_twin(QUANTISE if black_box else ()), "--dataset", "digits",
                           *attack, "--eps", 0.1, "--n-examples", 40, "--out", out, "--device", "cpu",
                           "--report")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "robustness.json").read_text())
    html = (out / "report.html").read_text()
    assert saved["robustness"]["attacks"][0]["name"] in html
    # the analysis needs gradients: measured for the white-box model, skipped with a note otherwise
    assert ("analysis" in saved) is not black_box
    assert ("need gradients" in result.output) is black_box
    # the audit's members are the dataset's training split, which a foreign model may never have seen
    assert any("not know what this model file was trained on" in w for w in saved["privacy"]["warnings"])


def test_cli_refuses_lira_for_an_onnx_file_before_attacking(onnx_twin, tmp_path):
    # LiRA's reference models train as the audited model did, which a model file does not say
    config = tmp_path / "lira.yaml"
    config.write_text("analysis:\n  reference_models: 2\n")
    out = tmp_path / "eval"
    result = _evaluate_cli("--model", onnx_twin(), "--dataset", "digits", "--config", config, "--out", out,
                           "--device", "cpu", "--report")
    assert result.exit_code == 2 and "analysis.reference_models" in result.output, result.output
    assert isinstance(result.exception, SystemExit) and not out.exists()


class _Killed(Exception):
    pass


def test_cli_interrupted_onnx_evaluation_continues_in_its_out_dir(onnx_twin, tmp_path, monkeypatch):
    from fortify.attacks.fgsm import FGSM
    from fortify.evaluation.journal import Journal

    path = onnx_twin()
    flags = ["--model", path, "--dataset", "digits", "--attacks", "fgsm,pgd", "--steps", 3, "--eps", 0.1,
             "--n-examples", 40, "--device", "cpu", "--out"]
    straight = _evaluate_cli(*flags, tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    # Prepare: the run dies once FGSM is written to the journal
    save_completed = Journal.save_completed

    def die_after_saving(journal, result):
        save_completed(journal, result)
        raise _Killed

    monkeypatch.setattr(Journal, "save_completed", die_after_saving)
    out = tmp_path / "killed"
    assert isinstance(_evaluate_cli(*flags, out).exception, _Killed)
    monkeypatch.setattr(Journal, "save_completed", save_completed)
    # Execute: the same command again; FGSM must come from the journal, not be run again
    monkeypatch.setattr(FGSM, "__call__", lambda *a, **k: pytest.fail("FGSM ran again"))
    resumed = _evaluate_cli(*flags, out)
    # Assert
    assert resumed.exit_code == 0, resumed.output
    assert "continuing" in resumed.output and not (out / "evaluation").exists()
    as_run, as_resumed = (json.loads((d / "robustness.json").read_text())["robustness"]
                          for d in (tmp_path / "straight", out))
    assert as_resumed["attacks"] == as_run["attacks"]


def test_cli_unfinished_evaluation_of_another_file_is_not_continued(onnx_twin, tmp_path):
    out = tmp_path / "eval"
    (out / "evaluation").mkdir(parents=True)
    (out / "evaluation" / "model_file.json").write_text(json.dumps({"model_file": "other.onnx"}))
    result = _evaluate_cli("--model", onnx_twin(), "--dataset", "digits", "--attacks", "fgsm", "--out", out)
    assert result.exit_code == 2 and "another model file" in result.output, result.output
    assert sorted(p.name for p in out.rglob("*")) == ["evaluation", "model_file.json"]


def test_cli_restart_discards_an_unfinished_evaluation_of_another_file(onnx_twin, tmp_path):
    out = tmp_path / "eval"
    (out / "evaluation").mkdir(parents=True)
    (out / "evaluation" / "model_file.json").write_text(json.dumps({"model_file": "other.onnx"}))
    result = _evaluate_cli("--model", onnx_twin(), "--dataset", "digits", "--attacks", "fgsm", "--restart",
                           "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["robustness.json"]


def test_cli_out_that_holds_something_else_is_refused_without_a_resume_hint(onnx_twin, tmp_path):
    # evaluate has no --resume: the error must not send the user to one
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _evaluate_cli("--model", onnx_twin(), "--dataset", "digits", "--attacks", "fgsm", "--out", out)
    assert result.exit_code == 2 and "holds no unfinished evaluation of model.onnx" in result.output
    assert "--resume" not in result.output and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_cli_black_box_model_gets_square_and_refuses_pgd(onnx_twin, tmp_path):
    path = onnx_twin(QUANTISE)
    refused = _evaluate_cli("--model", path, "--dataset", "digits", "--attacks", "pgd",
                            "--out", tmp_path / "a")
    assert refused.exit_code == 2 and "black-box" in refused.output
    assert isinstance(refused.exception, SystemExit)
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    result = _evaluate_cli("--model", path, "--dataset", "digits", "--queries", 30, "--eps", 0.1,
                           "--n-examples", 40, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "robustness.json").read_text())
    assert saved["model"]["access"]["kind"] == "black-box"
    assert [a["name"] for a in saved["robustness"]["attacks"]] == ["square-30"]


def test_cli_a_setting_no_attack_reads_is_refused_once_the_attacks_are_final(onnx_twin, tmp_path):
    # Prepare: a config file that sets PGD's steps, on a white-box model (its fgsm runs) and on a
    # black-box one (Square replaces the config's attacks)
    config = tmp_path / "steps.yaml"
    config.write_text("eval:\n  attacks: [fgsm]\n  steps: 50\n")
    # Execute
    results = [_evaluate_cli("--model", path, "--dataset", "digits", "--config", config,
                             "--out", tmp_path / name)
               for name, path in (("white", onnx_twin()), ("black", onnx_twin(QUANTISE)))]
    # Assert: refused in both cases, naming the file's setting, with nothing written
    for result, name in zip(results, ("white", "black")):
        assert result.exit_code == 2, result.output
        assert f"eval.steps in {config} is read by pgd" in result.output
        assert isinstance(result.exception, SystemExit) and not (tmp_path / name).exists()
    assert "attacks to run (square)" in results[1].output


@pytest.mark.parametrize("flags, fragment", [
    (["--input-range", "0"], "--input-range takes 2 numbers"),
    (["--mean", "0.5"], "give --mean and --std together"),
    (["--mean", "0.1,0.2", "--std", "1,1"], "inputs have 1 channel (shape (1, 8, 8)); give 1 value"),
    (["--layout", "hwc"], "valid layouts: auto, nchw, nhwc"),
])
def test_cli_bad_card_flags(onnx_twin, tmp_path, flags, fragment):
    out = tmp_path / "o"
    result = _evaluate_cli("--model", onnx_twin(), "--dataset", "digits", *flags, "--out", out)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert isinstance(result.exception, SystemExit) and not out.exists()


def test_a_conversion_that_computes_another_function_gives_way_to_onnxruntime(onnx_twin, digits, monkeypatch):
    # Prepare: a converter that is off by 1% (a silent conversion bug)
    import onnx2torch

    convert = onnx2torch.convert

    class OffByOnePercent(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 1.01

    monkeypatch.setattr(onnx2torch, "convert", lambda proto: OffByOnePercent(convert(proto)))
    # Execute
    external = load_external_model(onnx_twin(), digits)
    # Assert: the file's own function is what gets attacked
    assert external.runtime == "onnxruntime" and external.access.kind == "black-box"
    assert "differs from onnxruntime" in external.warnings[0]


# a final softmax: the classifier returns probabilities, whose saturated gradients would mask attacks
SOFTMAX = ("Softmax", {}, ())  # the default axis: 1 up to opset 12, -1 from opset 13 on
LAST_AXIS_SOFTMAX = ("Softmax", {"axis": -1}, ())


@pytest.mark.parametrize("opset", [11, 17])
def test_a_final_softmax_is_bypassed_so_attacks_see_the_logits(softmax_export, reference_model, digits,
                                                                opset):
    # Prepare: torch.onnx.export of the reference model followed by nn.Softmax(dim=1)
    external = load_external_model(softmax_export(opset), digits)
    x = digits.test.x[:64]
    # Execute
    clean, robust = _robust_accuracy(external.module, PGD(THREAT, steps=10), digits)
    native_clean, native_robust = _robust_accuracy(reference_model, PGD(THREAT, steps=10), digits)
    # Assert: the logits themselves, said in the warnings; onnxruntime's reference runs the same edited
    # graph, or the conversion check would have sent the model to onnxruntime
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)
    assert "the model's final softmax is bypassed so that attacks see logits" in external.warnings
    assert external.runtime == "onnx2torch" and external.access.kind == "white-box"
    assert (clean, robust) == (native_clean, native_robust)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("softmax", [SOFTMAX, LAST_AXIS_SOFTMAX, ("Softmax", {"axis": 1}, ())])
def test_a_final_softmax_on_the_class_axis_is_bypassed_in_any_spelling(onnx_twin, reference_model, digits,
                                                                       opset, softmax):
    external = load_external_model(onnx_twin(suffix_ops=[softmax], opset=opset), digits)
    x = digits.test.x[:64]
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)
    assert any("softmax is bypassed" in w for w in external.warnings)


class _Times(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def test_a_confident_softmax_model_is_attacked_through_its_logits(onnx_twin, reference_model, digits):
    # Prepare: logits 30 times the reference's, then a softmax: in float32 its probabilities saturate
    # to 0 and 1, where their gradients vanish. DLR, a margin loss, ignores the logits' scale
    external = load_external_model(onnx_twin(suffix_ops=[("Mul", {}, (30.0,)), SOFTMAX]), digits)
    native = torch.nn.Sequential(reference_model, _Times(30.0)).eval()
    # Execute
    _, robust = _robust_accuracy(external.module, APGD(THREAT, loss="dlr", n_iter=20), digits)
    _, native_robust = _robust_accuracy(native, APGD(THREAT, loss="dlr", n_iter=20), digits)
    # Assert: the same robust accuracy as on the logits (measured on the probabilities: 77% against 53%)
    assert robust == native_robust < 0.6


def test_the_onnxruntime_fallback_runs_the_model_without_its_softmax(onnx_twin, reference_model, digits):
    external = load_external_model(onnx_twin([IDENTITY_SHRINK], suffix_ops=[SOFTMAX]), digits)
    x = digits.test.x[:64]
    assert external.runtime == "onnxruntime"
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)
    assert external.warnings[0] == "the model's final softmax is bypassed so that attacks see logits"
    assert "Shrink" in external.warnings[1]


@pytest.mark.parametrize("prefix", [[], [IDENTITY_SHRINK]])
def test_a_softmax_model_with_external_weights_runs_without_its_softmax(onnx_twin, reference_model, digits,
                                                                        tmp_path, monkeypatch, prefix):
    # onnxruntime runs the edited graph from bytes: its weights must be in it, not left beside the file
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(onnx_twin(prefix, suffix_ops=[SOFTMAX])))
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    external = load_external_model(path, digits)
    x = digits.test.x[:16]
    assert external.runtime == ("onnxruntime" if prefix else "onnx2torch")
    torch.testing.assert_close(external.module(x), reference_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("final, expected", [
    (("LogSoftmax", {"axis": 1}, ()), lambda logits: logits.log_softmax(1)),  # logits up to a row constant
    (("Softmax", {"axis": 0}, ()), lambda logits: logits.softmax(0)),  # over the batch, not the classes
])
def test_other_final_ops_are_left_alone(onnx_twin, reference_model, digits, final, expected):
    external = load_external_model(onnx_twin(suffix_ops=[final]), digits)
    x = digits.test.x[:64]
    torch.testing.assert_close(external.module(x), expected(reference_model(x)), atol=1e-5, rtol=1e-5)
    assert not any("softmax is bypassed" in w for w in external.warnings)


def _softmax_graph(opset, attributes, shape, *, after=None):
    """A graph input -> Softmax (-> ``after``) -> output, both of ``shape``."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Softmax", ["input"], ["softmax"], name="final", **attributes)]
    if after is not None:
        nodes.append(helper.make_node(after, ["softmax"], ["after"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, attributes, shape, bypassed", [
    (13, {}, ["b", 10], True),  # default axis -1
    (11, {}, ["b", 10], True),  # default axis 1: the last of a (batch, classes) output
    (11, {}, ["b", 4, 10], False),  # default axis 1 of a rank-3 output: not the last axis
    (13, {}, ["b", 4, 10], True),
    (11, {"axis": 2}, ["b", 4, 10], True),  # rank - 1, written out
    (13, {"axis": 1}, ["b", 10], True),
    (13, {"axis": 0}, ["b", 10], False),
    (17, {"axis": -2}, ["b", 10], False),
])
def test_which_softmax_is_bypassed(opset, attributes, shape, bypassed):
    onnx = pytest.importorskip("onnx")
    from fortify.interop.onnx import _bypass_final_softmax

    proto = _softmax_graph(opset, attributes, shape)
    assert _bypass_final_softmax(proto) is bypassed
    node = proto.graph.node[0]
    assert (node.op_type, list(node.input), list(node.output)) == \
        ("Identity" if bypassed else "Softmax", ["input"], ["softmax"])
    onnx.checker.check_model(proto)  # the edited graph is still a valid model


def test_a_softmax_that_does_not_produce_the_output_is_kept():
    from fortify.interop.onnx import _bypass_final_softmax

    proto = _softmax_graph(17, {}, ["b", 10], after="Neg")
    assert not _bypass_final_softmax(proto)
    assert [node.op_type for node in proto.graph.node] == ["Softmax", "Neg"]


def test_a_softmax_hidden_behind_another_node_is_named_in_the_warnings(onnx_twin, digits):
    # Prepare: a Softmax then an Identity, so the softmax does not produce the graph's output
    path = onnx_twin(suffix_ops=[SOFTMAX, ("Identity", {}, ())])
    # Execute
    external = load_external_model(path, digits)
    # Assert: not bypassed, but the probabilities are pointed out
    assert not any("softmax is bypassed" in w for w in external.warnings)
    assert any("sum to 1, as probabilities do" in w for w in external.warnings)


@pytest.mark.parametrize("element_type", ["INT64", "BOOL", "STRING"])
def test_an_onnx_model_without_floating_point_outputs_is_refused(element_type, tmp_path, digits):
    # a linear classifier whose logits are cast to another type, as a graph ending in a label might be
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    to = getattr(TensorProto, element_type)
    weights = numpy_helper.from_array(torch.randn(64, 10).numpy(), name="w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Cast", ["logits"], ["out"], to=to)],
        "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("out", to, [None, 10])], initializer=[weights])
    path = tmp_path / "cast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ConfigError, match=f"returns outputs of ONNX element type {to}; fortify needs "
                                          "floating-point logits"):
        load_external_model(path, digits)
