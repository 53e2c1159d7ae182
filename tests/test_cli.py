"""The command line: the main job end to end, train/evaluate, and every bad input exits cleanly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import file_size_limit
from fortify.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_clean_error(result, fragment, not_created=None):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and fragment in result.output, result.output
    # CliRunner keeps an uncaught exception in result.exception, never as a traceback in the output
    assert isinstance(result.exception, SystemExit)
    if not_created is not None:
        assert not not_created.exists(), "a failed command left files behind"


@pytest.mark.slow
def test_fortify_run_defaults_meet_the_stated_numbers(tmp_path):
    # Execute: the README's main job with its defaults
    out = tmp_path / "run"
    result = _invoke("run", "--out", out, "--quiet")
    # Assert: the files and the acceptance numbers at the default eps
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "results.json", "report.html", "models/pgd/model.safetensors",
                 "models/pgd/state.json", "models/standard/model.safetensors"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    standard, robust = (results["models"][m]["robustness"] for m in ("standard", "pgd"))
    assert results["threat"]["eps"] == pytest.approx(0.2)
    assert standard["attacks"][1]["name"] == "pgd-20"
    assert standard["attacks"][1]["adversarial_accuracy"] <= 0.10
    assert robust["attacks"][1]["adversarial_accuracy"] >= 0.50
    assert robust["clean_accuracy"] >= 0.95
    html = (out / "report.html").read_text()
    assert f"{100 * robust['attacks'][1]['adversarial_accuracy']:.1f}%" in html
    # the report's analysis and privacy sections were measured, and the PGD model is not masked
    for name in ("standard", "pgd"):
        model = results["models"][name]
        assert {"analysis", "privacy"} <= set(model)
        assert model["analysis"]["masking"]["masked"] is False, model["analysis"]["masking"]["checks"]
    robust_margin = results["models"]["pgd"]["analysis"]["margin"]["summary"]["median"]
    standard_margin = results["models"]["standard"]["analysis"]["margin"]["summary"]["median"]
    assert robust_margin > standard_margin
    assert "No sign of gradient masking" in html


def test_train_then_evaluate(tmp_path):
    out = tmp_path / "model"
    trained = _invoke("train", "--out", out, "--objective", "fgsm-rs", "--epochs", 2, "--quiet")
    assert trained.exit_code == 0, trained.output
    assert {"model.safetensors", "state.json", "config.yaml", "model.json"} <= {
        p.name for p in out.iterdir()}
    evaluated = _invoke("evaluate", out, "--attacks", "fgsm,pgd", "--steps", 3, "--n-examples", 60,
                        "--eps", 0.1)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((out / "robustness.json").read_text())["robustness"]
    assert report["n_examples"] == 60 and report["threat"]["eps"] == 0.1
    assert [a["name"] for a in report["attacks"]] == ["fgsm", "pgd-3"]
    assert report["attacks"][1]["adversarial_accuracy"] <= report["clean_accuracy"]
    # with --report: the analysis and the audit join robustness.json, and the page is written
    reported = _invoke("evaluate", out, "--attacks", "pgd", "--steps", 3, "--n-examples", 40, "--report")
    assert reported.exit_code == 0, reported.output
    written = json.loads((out / "robustness.json").read_text())
    assert {"analysis", "privacy"} <= set(written)
    assert written["dataset"]["class_names"] == [str(i) for i in range(10)]  # the per-class figures' ticks
    assert "Gradient-masking checks" in (out / "report.html").read_text()


def test_train_names_the_epoch_it_kept_when_early_stopping_is_off(tmp_path, monkeypatch):
    from fortify.training.trainer import Trainer

    # Prepare: validation scripted to peak after epoch 1; early stopping off keeps the last epoch
    monkeypatch.setattr(Trainer, "_validate", lambda self, val: ([0.9, 0.5, 0.4][self.state.epoch], None))
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  early_stopping: false\n")
    # Execute
    result = _invoke("train", "--config", config, "--objective", "standard", "--epochs", 3,
                     "--out", tmp_path / "m", "--quiet")
    # Assert: the printed epoch and accuracy are those of the weights written, not of the best epoch
    assert result.exit_code == 0, result.output
    assert ("epoch 3 kept (the last; early stopping is off, the best on validation was epoch 1), "
            "val clean 40.0%") in " ".join(result.output.split())
    training = json.loads((tmp_path / "m" / "training.json").read_text())
    assert (training["selected_epoch"], training["best_epoch"]) == (3, 1)


def test_config_file_and_flags_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 5, "objective": "standard"},
                                      "threat": {"eps": 0.3}}))
    out = tmp_path / "m"
    result = _invoke("train", "--config", config, "--epochs", 1, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1 and resolved["threat"]["eps"] == 0.3
    assert resolved["train"]["objective"] == "standard"


def test_train_speed_flags_reach_the_config(tmp_path):
    out = tmp_path / "m"
    result = _invoke("train", "--objective", "standard", "--epochs", 1, "--amp", "bf16", "--channels-last",
                     "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["amp"] is True and resolved["train"]["channels_last"] is True


@pytest.mark.parametrize("args, fragment", [
    (["--amp", "fp16"], "unknown training precision --amp 'fp16'; valid: bf16"),
    (["--dataset", "imagenet"], "valid names: breast-cancer, cifar10"),
    (["--objective", "madry"], "unknown objective 'madry'; valid names: "),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--eps", 0], "threat.eps"),
    (["--eps", 1.5], "beyond the box"),
    (["--norm", "l3"], "threat.norm"),
    (["--attack-steps", 0], "train.attack_steps"),
    # a typo of many digits would train without end
    (["--attack-steps", 10**20], "train.attack_steps: Input should be less than or equal to 10000"),
    (["--epochs", 0], "train.epochs"),
    (["--cuda-graph", "--device", "cpu"], "train.cuda_graph records the training step as a CUDA graph"),
])
def test_bad_training_settings(tmp_path, args, fragment):
    out = tmp_path / "out"
    _assert_clean_error(_invoke("train", "--out", out, *args), fragment, not_created=out)


@pytest.mark.parametrize(("written", "fragment"), [
    ({"train": {"epochz": 3}}, "unknown key 'train.epochz' (valid keys: objective, epochs,"),
    ({"trian": {}}, "unknown key 'trian' (valid keys: data, model, threat, train, eval, analysis, dp)"),
    ({"train": {"augment": {"flipp": True}}},
     "unknown key 'train.augment.flipp' (valid keys: crop_padding, flip, cutout_size)"),
], ids=["in-a-section", "a-section", "in-a-subsection"])
def test_unknown_config_key_lists_the_valid_ones(tmp_path, written, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(written))
    out = tmp_path / "out"
    _assert_clean_error(_invoke("train", "--config", config, "--out", out), fragment, not_created=out)


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("x_fn, y_fn, extra, fragment", [
    (lambda x: x * 3, lambda y: y, {}, "outside the declared box"),
    (lambda x: np.where(x > 0.9, np.nan, x), lambda y: y, {}, "NaN"),
    (lambda x: x, lambda y: y + 5, {"num_classes": 2}, "labels"),
])
def test_bad_data(tmp_path, x_fn, y_fn, extra, fragment):
    rng = np.random.default_rng(0)
    x = rng.random((40, 6)).astype(np.float32)
    y = rng.integers(0, 2, 40)
    path = _npz(tmp_path, x=x_fn(x), y=y_fn(y), **extra)
    out = tmp_path / "out"
    result = _invoke("train", "--dataset", "npz", "--data-path", path, "--out", out)
    _assert_clean_error(result, fragment, not_created=out)


@pytest.mark.parametrize("shape", [(40, 1, 1, 8), (40, 1, 8, 1)])
def test_images_too_small_for_the_default_model_are_refused_naming_the_way_out(tmp_path, shape):
    path = _npz(tmp_path, x=np.random.default_rng(0).random(shape).astype(np.float32), y=np.arange(40) % 2,
                layout=np.array("NCHW"))
    out = tmp_path / "out"
    result = _invoke("train", "--dataset", "npz", "--data-path", path, "--out", out)
    _assert_clean_error(result, "are too small; choose another model (mlp takes any shape)", not_created=out)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "m"
    result = _invoke("train", "--out", out, "--objective", "standard", "--epochs", 1, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_tampered_checkpoint_is_refused(trained_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    _assert_clean_error(_invoke("evaluate", copy), "modified after it was saved")


def test_pickled_checkpoint_is_refused(trained_dir, tmp_path):
    import shutil

    import torch

    copy = tmp_path / "copy"
    shutil.copytree(trained_dir, copy)
    torch.save({"weight": torch.zeros(1)}, copy / "model.safetensors")
    _assert_clean_error(_invoke("evaluate", copy), "model.safetensors")


def test_directory_without_a_model(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    _assert_clean_error(_invoke("evaluate", tmp_path), "no trained fortify model")


def test_unknown_attack_lists_valid_ones(trained_dir):
    from fortify.attacks import ATTACKS

    result = _invoke("evaluate", trained_dir, "--attacks", "fgsm,nope")
    _assert_clean_error(result, "unknown attack 'nope'; valid names: " + ", ".join(ATTACKS.names()))


def test_evaluate_channels_last_flag_reaches_the_config_and_the_layout_is_recorded(trained_dir):
    result = _invoke("evaluate", trained_dir, "--attacks", "fgsm", "--n-examples", 20, "--channels-last")
    assert result.exit_code == 0, result.output
    written = json.loads((trained_dir / "robustness.json").read_text())
    assert written["config"]["eval"]["channels_last"] is True
    assert written["robustness"]["channels_last"] is True  # the layout the evaluation used
    result = _invoke("evaluate", trained_dir, "--attacks", "fgsm", "--n-examples", 20, "--no-channels-last")
    assert result.exit_code == 0, result.output
    written = json.loads((trained_dir / "robustness.json").read_text())
    assert written["config"]["eval"]["channels_last"] is False
    assert written["robustness"]["channels_last"] is False
    result = _invoke("evaluate", trained_dir, "--attacks", "fgsm", "--n-examples", 20)
    assert result.exit_code == 0, result.output
    written = json.loads((trained_dir / "robustness.json").read_text())
    assert written["config"]["eval"]["channels_last"] is None  # unset: on for this CNN on CPU
    assert written["robustness"]["channels_last"] is True


def test_existing_output_and_resume_without_out(trained_dir):
    _assert_clean_error(_invoke("train", "--out", trained_dir), "already exists")
    _assert_clean_error(_invoke("run", "--resume"), "--resume needs --out")


def test_resume_of_a_finished_run_keeps_its_weights(trained_dir):
    from safetensors.torch import load_file

    before = load_file(trained_dir / "model.safetensors")
    result = _invoke("train", "--out", trained_dir, "--objective", "standard", "--epochs", 1,
                     "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    after = load_file(trained_dir / "model.safetensors")
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


def _copy_of(trained_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_dir, copy)
    return copy


@pytest.mark.parametrize("changed, fragment", [(["--eps", 0.1], "threat.eps was 0.2, now 0.1"),
                                               (["--model", "mlp"], "model.name was None, now 'mlp'")])
def test_resume_under_other_settings_is_refused_before_anything_is_written(trained_dir, tmp_path, changed,
                                                                           fragment):
    # Prepare: a finished model directory and the bytes of the files a run writes first
    copy = _copy_of(trained_dir, tmp_path)
    before = {name: (copy / name).read_bytes() for name in ("config.yaml", "model.json", "state.json")}
    # Execute
    result = _invoke("train", "--out", copy, "--objective", "standard", "--epochs", 1, "--resume", "--quiet",
                     *changed)
    # Assert
    _assert_clean_error(result, fragment)
    assert {name: (copy / name).read_bytes() for name in before} == before


def test_run_resume_under_another_eps_is_refused(tmp_path):
    from fortify.config import load_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(load_config(None, {"threat": {"eps": 0.2}}).to_yaml())
    saved = (out / "config.yaml").read_bytes()
    _assert_clean_error(_invoke("run", "--out", out, "--resume", "--eps", 0.1, "--quiet"), "threat.eps")
    assert (out / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_run_resume_counts_the_training_seconds_its_checkpoints_hold(tmp_path):
    # A small run, then its checkpoints claim 1,000 s of training each: the resumed run's seconds
    # must include them (the resumed process alone takes seconds, not minutes).
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 1, "early_stopping": False, "attack_steps": 2},
                                      "eval": {"n_examples": 40, "steps": 2},
                                      "analysis": {"enabled": False, "privacy": False}}))
    out = tmp_path / "run"
    first = _invoke("run", "--config", config, "--out", out, "--quiet")
    assert first.exit_code == 0, first.output
    fresh_seconds = json.loads((out / "results.json").read_text())["seconds"]
    assert 0 < fresh_seconds < 1000
    for name in ("standard", "pgd"):
        state_path = out / "models" / name / "state.json"
        state = json.loads(state_path.read_text())
        state["progress"]["seconds"] = 1000.0
        state_path.write_text(json.dumps(state))
    resumed = _invoke("run", "--config", config, "--out", out, "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    seconds = json.loads((out / "results.json").read_text())["seconds"]
    assert 2000 < seconds < 2000 + 10 * fresh_seconds


def test_export_does_not_write_over_the_model(trained_dir, tmp_path):
    copy = _copy_of(trained_dir, tmp_path)
    weights = (copy / "model.safetensors").read_bytes()
    result = _invoke("export", copy, "--format", "safetensors", "--out", copy / "model.safetensors")
    _assert_clean_error(result, "own files")
    assert (copy / "model.safetensors").read_bytes() == weights


def test_an_output_path_that_cannot_be_written_is_a_clean_error(trained_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _assert_clean_error(_invoke("export", trained_dir, "--format", "torchscript", "--out", blocker / "m.pt"),
                        str(blocker))
    _assert_clean_error(_invoke("train", "--out", blocker, "--epochs", 1, "--quiet"), "is a file")


def _edit_state(directory, change):
    state = json.loads((directory / "state.json").read_text())
    (directory / "state.json").write_text(json.dumps(change(state)))


def _card_with(directory, **fields):
    return json.dumps({**json.loads((directory / "model.json").read_text()), **fields})


def _other_data_seed(settings_yaml):
    settings = yaml.safe_load(settings_yaml)
    settings["data"]["seed"] += 1
    return yaml.safe_dump(settings, sort_keys=False)


def _without_card_hash(state):  # as model directories written before the card was hashed
    return {**state, "sha256": {k: v for k, v in state["sha256"].items() if k != "model.json"}}


def _unhashed_card(directory, **fields):
    _edit_state(directory, _without_card_hash)
    (directory / "model.json").write_text(_card_with(directory, **fields))


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "model.json").write_text(_card_with(d, bounds=[0, 255])), "model card was edited"),
    (lambda d: (d / "model.json").write_text("{"), "model card was edited"),
    (lambda d: (_edit_state(d, _without_card_hash), (d / "model.json").write_text("{")),
     "not a readable model card"),
    (lambda d: (_edit_state(d, _without_card_hash), (d / "model.json").write_text('{"name": "small-cnn"}')),
     "not a fortify model card"),
    (lambda d: (_edit_state(d, _without_card_hash), (d / "model.json").write_bytes(b"\xff\xfe")),
     "not a readable model card"),
    # an unhashed card's other fields are read later (the box, the normalisation, a table's encoding)
    (lambda d: _unhashed_card(d, bounds=["a", "b"]), "bounds must be two finite numbers"),
    (lambda d: _unhashed_card(d, input_encoding="x"), "its input_encoding is not a table schema"),
    (lambda d: _edit_state(d, lambda state: {k: v for k, v in state.items() if k != "sha256"}),
     "records no hash of model.safetensors"),
    # another data seed in the model's own settings would put training examples among the test ones
    (lambda d: (d / "config.yaml").write_text(_other_data_seed((d / "config.yaml").read_text())),
     "the settings the model was trained with were edited"),
])
def test_a_damaged_model_directory_is_refused(trained_dir, tmp_path, damage, fragment):
    copy = _copy_of(trained_dir, tmp_path)
    damage(copy)
    _assert_clean_error(_invoke("evaluate", copy, "--attacks", "fgsm", "--n-examples", 10), fragment)


@pytest.mark.parametrize("settings, fragment", [({"eval": {"eps_grid": [5.0]}}, "beyond the box"),
                                                ({"eval": {"attack_options": {"pgd": {"steps": "abc"}}}},
                                                 "attack_options for 'pgd': steps='abc' must be a whole "
                                                 "number"),
                                                ({"eval": {"attack_options": {"apgd-ce": {"steps": 5}}}},
                                                 "attack_options set options for ['apgd-ce'], which are not "
                                                 "among the attacks to run (pgd)")])
def test_bad_evaluation_settings_are_refused_before_attacking(trained_dir, tmp_path, settings, fragment):
    copy = _copy_of(trained_dir, tmp_path)
    (copy / "robustness.json").unlink(missing_ok=True)  # other tests evaluate the shared directory
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = _invoke("evaluate", copy, "--config", config, "--attacks", "pgd", "--n-examples", 10)
    _assert_clean_error(result, fragment)
    assert not (copy / "evaluation").exists() and not (copy / "robustness.json").exists()


def test_restart_discards_a_journal_that_blocks_another_evaluation(trained_dir, tmp_path):
    # Prepare: an unfinished evaluation's journal of other attack settings
    copy = _copy_of(trained_dir, tmp_path)
    (copy / "robustness.json").unlink(missing_ok=True)
    (copy / "evaluation").mkdir()
    (copy / "evaluation" / "evaluation.json").write_text(
        json.dumps({"fingerprint": "of another evaluation", "completed": [], "current": None}))
    # Execute and assert: the refusal names the way out and keeps the journal
    refused = _invoke("evaluate", copy, "--attacks", "fgsm", "--n-examples", 10)
    _assert_clean_error(refused, "--restart")
    assert (copy / "evaluation" / "evaluation.json").is_file()
    # Execute and assert: --restart evaluates and spends the journal
    restarted = _invoke("evaluate", copy, "--attacks", "fgsm", "--n-examples", 10, "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert "discarded the unfinished evaluation" in restarted.output
    assert (copy / "robustness.json").is_file() and not (copy / "evaluation").exists()


def test_an_evaluation_config_keeps_the_model_directorys_own_settings(trained_dir, tmp_path):
    # Prepare: a config file that names only what the evaluation changes
    copy = _copy_of(trained_dir, tmp_path)
    (copy / "robustness.json").unlink(missing_ok=True)  # other tests evaluate the shared directory
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"eval": {"batch_size": 16}}))
    # Execute
    result = _invoke("evaluate", copy, "--config", config, "--attacks", "fgsm", "--n-examples", 10)
    # Assert: the model's data, training and model sections, not the defaults, and the file's eval
    assert result.exit_code == 0, result.output
    recorded = json.loads((copy / "robustness.json").read_text())["config"]
    trained = yaml.safe_load((copy / "config.yaml").read_text())
    assert {s: recorded[s] for s in ("data", "model", "train")} == {s: trained[s] for s in ("data", "model",
                                                                                            "train")}
    assert recorded["train"]["objective"] == "standard" and recorded["eval"]["batch_size"] == 16


def test_an_evaluation_config_that_splits_the_data_otherwise_is_refused(trained_dir, tmp_path):
    # Prepare: another data seed would put training examples among the test examples
    copy = _copy_of(trained_dir, tmp_path)
    (copy / "robustness.json").unlink(missing_ok=True)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"data": {"seed": 1}}))
    # Execute
    result = _invoke("evaluate", copy, "--config", config, "--attacks", "fgsm", "--n-examples", 10)
    # Assert
    _assert_clean_error(result, "data.seed was 0, now 1")
    assert not (copy / "robustness.json").exists() and not (copy / "evaluation").exists()


def test_evaluate_refuses_what_does_not_apply_to_a_model_directory(trained_dir, tmp_path):
    _assert_clean_error(_invoke("evaluate", tmp_path / "nowhere"), "is not a directory")
    _assert_clean_error(_invoke("evaluate", trained_dir, "--dataset", "breast-cancer"), "--dataset goes")
    for flag, value in (("--layout", "nhwc"), ("--input-range", "0,255"), ("--mean", "0.5"), ("--std", "2")):
        _assert_clean_error(_invoke("evaluate", trained_dir, flag, value), f"{flag} goes with --model FILE")
    both = _invoke("evaluate", trained_dir, "--mean", "0.5", "--std", "2")
    _assert_clean_error(both, "--mean and --std go with")


@pytest.mark.parametrize("attacks", ["", "fgsm,,pgd", ","])
def test_an_empty_attack_name_is_refused_not_read_as_the_default(trained_dir, attacks):
    _assert_clean_error(_invoke("evaluate", trained_dir, "--attacks", attacks), "has an empty name")


def test_an_empty_dataset_name_is_refused_not_read_as_the_default(tmp_path):
    out = tmp_path / "out"
    result = _invoke("train", "--dataset", "", "--out", out)
    _assert_clean_error(result, "unknown dataset ''", not_created=out)


@pytest.mark.parametrize("text, fragment", [
    ("train:\n  epochs: true\n", "train.epochs: Value error, a number"),
    ("train:\n  early_stopping: 10\n", "train.early_stopping: Value error, true or false is expected"),
    ("train:\n  epochs: 3\n  epochs: 5\n", "'epochs' is given twice"),
    ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nests its values deeper than a config does"),
])
def test_config_values_yaml_would_misread_are_refused(tmp_path, text, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    _assert_clean_error(_invoke("train", "--config", config, "--out", out), fragment, not_created=out)


def test_yaml_merge_keys_read_as_yaml_reads_them(tmp_path):
    # `<<: *anchor` was refused as "not valid YAML" by the check for keys given twice
    from fortify.config import load_yaml
    from fortify.errors import ConfigError

    text = "base: &base {epochs: 1, lr: 0.1}\ntrain:\n  <<: *base\n  lr: 0.01\n"
    (tmp_path / "merge.yaml").write_text(text)
    merged = load_yaml(tmp_path / "merge.yaml")["train"]
    assert merged == {"epochs": 1, "lr": 0.01} == yaml.safe_load(text)["train"]
    (tmp_path / "twice.yaml").write_text("train:\n  lr: 1\n  lr: 2\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_yaml(tmp_path / "twice.yaml")


@pytest.mark.parametrize("text, flags, fragment", [
    # a flag that sets something in a section must not replace a section that is not a mapping
    ("train: 5\n", ["--epochs", "1"], "train: Input should be a valid dictionary"),
    ("data: [digits]\n", ["--dataset", "digits"], "data: Input should be a valid dictionary"),
    ("train:\n  lr: .inf\n", [], "train.lr: Input should be a finite number"),
    ("threat:\n  eps: .nan\n", [], "threat.eps: Input should be a finite number"),
    ("eval:\n  eps_grid: [0.1, .inf]\n", [], "eval.eps_grid.1: Input should be a finite number"),
    ("eval:\n  eps_grid: [0.05, 0.1, 0.05]\n", [], "eps_grid names an eps twice"),
    ("eval:\n  attacks: [pgd, fgsm, pgd]\n", [], "attacks names pgd twice; give each attack once"),
    ("analysis:\n  reference_models: 1\n", [], "reference_models=1 is too few"),
    ("analysis:\n  lira_queries: training\n", [], "lira_queries applies to LiRA: set reference_models"),
    # numbers nested in an attack's options, which only the attack reads later
    ("eval:\n  attacks: [pgd]\n  attack_options:\n    pgd: {x: [1.0, .nan]}\n", [],
     "pgd.x[1] must be a finite number, got nan"),
    ("eval:\n  attacks: [pgd]\n  attack_options:\n    pgd: {x: {y: .inf}}\n", [],
     "pgd.x.y must be a finite number, got inf"),
])
def test_config_sections_and_numbers_that_cannot_hold_are_refused(tmp_path, text, flags, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    _assert_clean_error(_invoke("train", "--config", config, "--out", out, *flags), fragment, not_created=out)


def test_a_very_long_value_is_shortened_in_the_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  lr: '{'9' * 401}'\n")
    result = _invoke("train", "--config", config, "--out", tmp_path / "out")
    _assert_clean_error(result, "train.lr: Input should be a finite number (got '999")
    assert "(403 characters)" in result.output and "9" * 100 not in result.output


def test_a_very_long_unknown_name_is_shortened_in_the_error(tmp_path):
    result = _invoke("train", "--dataset", "x" * 300, "--out", tmp_path / "out")
    _assert_clean_error(result, "(302 characters); valid names: breast-cancer")
    assert "x" * 100 not in result.output


def test_a_section_check_names_its_values_without_repeating_the_section(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("eval:\n  eps_grid: [-0.1]\n")
    result = _invoke("train", "--config", config, "--out", tmp_path / "out")
    _assert_clean_error(result, "every eps in eps_grid must be > 0, got [-0.1]")
    assert "'attacks'" not in result.output  # the rest of the eval section is not dumped


def test_bracketed_values_in_an_error_reach_the_terminal(tmp_path):
    # "[nan, 1]" looks like console markup; printed as markup it vanished from the message
    data = tmp_path / "bad.npz"
    np.savez(data, x=np.random.default_rng(0).random((20, 4)), y=np.arange(20) % 2,
             bounds=np.array([np.nan, 1.0]))
    out = tmp_path / "out"
    result = _invoke("train", "--data", data, "--epochs", "1", "--out", out)
    _assert_clean_error(result, "'bounds' must be finite float32 numbers with low < high, got [nan, 1.0]",
                        not_created=out)


def test_a_config_file_that_is_not_utf8_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"train:\n  epochs: \xff\xfe\n")
    out = tmp_path / "out"
    _assert_clean_error(_invoke("train", "--config", config, "--out", out), "not UTF-8", not_created=out)


def test_an_interrupted_evaluation_says_how_to_continue(trained_dir, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fortify.cli.evaluate_model", interrupt)
    result = _invoke("evaluate", trained_dir, "--attacks", "fgsm", "--n-examples", 10)
    assert result.exit_code == 130 and "rerun the same command to continue" in result.output
    assert "--resume" not in result.output


@pytest.mark.parametrize("argv, interrupted, stem, flag", [
    (["run", "--epochs", 1], "fortify.cli.train_model", "digits", "--resume --out"),
    (["train", "--epochs", 1], "fortify.cli.train_model", "digits-pgd", "--resume --out"),
    (["sweep", "--objectives", "standard", "--epochs", 1], "fortify.sweep.run_sweep", "sweep",
     "command with --out"),
])
def test_a_command_that_chose_its_directory_names_it_and_the_hint_after_ctrl_c_does_too(
        tmp_path, monkeypatch, argv, interrupted, stem, flag):
    # without --out each command picks runs/<stem>-<time>; the hint used to say "rerun the same command",
    # which picked a new directory and trained everything again (run: --resume refused without --out)
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(interrupted, interrupt)
    result = _invoke(*argv)
    assert result.exit_code == 130, result.output
    chosen = re.search(r"run directory: (runs/\S+)", result.output)
    assert chosen is not None and chosen.group(1).startswith(f"runs/{stem}-"), result.output
    assert f"{flag} {chosen.group(1)} " in " ".join(result.output.split())


def test_a_command_given_its_directory_keeps_the_hint_short(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fortify.cli.train_model", interrupt)
    result = _invoke("train", "--epochs", 1, "--out", tmp_path / "t")
    assert result.exit_code == 130
    assert "run directory:" not in result.output and "--out" not in result.output
    assert "rerun the same command with --resume to continue" in result.output


def test_the_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fortify", "train", "--eps", "-1", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "threat.eps" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--epochs", "abc"],
     "Invalid value for '--epochs': 'abc' is not a valid integer; see `fortify train --help`"),
    (["audit", "somewhere", "--n-examples", "0"], "Invalid value for '--n-examples': 0 is not in the range"),
    (["train", "--no-such-flag"], "No such option '--no-such-flag'"),
])
def test_flags_the_parser_refuses_get_one_error_line_from_the_command(monkeypatch, capsys, argv, fragment):
    from fortify import cli

    monkeypatch.setattr(sys, "argv", ["fortify", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("error:") and err.strip().count("\n") == 0 and fragment in err, err


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["evaluate"], 2)])
def test_the_command_keeps_its_exit_codes(monkeypatch, argv, code):
    from fortify import cli

    monkeypatch.setattr(sys, "argv", ["fortify", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code


def test_ctrl_c_while_the_command_line_loads_ends_quietly(monkeypatch, capsys):
    from fortify import launch

    class InterruptedImport:  # a Ctrl-C arriving while torch and the CLI are imported
        def find_spec(self, name, path=None, target=None):
            if name == "fortify.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "fortify.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    try:
        launch.main()
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("the interrupt escaped and would print a traceback")
    except SystemExit as stopped:
        assert stopped.code == 130 and capsys.readouterr().err == "interrupted\n"
    else:
        pytest.fail("the command went on after the interrupt")


@pytest.mark.parametrize("command", [[], ["run"], ["train"], ["evaluate"]])
def test_help(command):
    result = _invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_audit_writes_membership_results(trained_dir):
    result = _invoke("audit", trained_dir, "--no-inversion", "--n-examples", 150)
    assert result.exit_code == 0, result.output
    privacy = json.loads((trained_dir / "privacy.json").read_text())["privacy"]
    attacks = {m["attack"]: m for m in privacy["membership"]}
    assert {"threshold-loss", "threshold-confidence"} <= set(attacks), sorted(attacks)
    assert all(0.0 <= m["auc"] <= 1.0 for m in attacks.values())
    # the advantage is fitted on the scores it is reported for: the table says so
    assert "a blind attack shows some too" in result.output
    assert "members and non-members: 150 and" in result.output


@pytest.mark.slow
def test_a_report_with_reference_models_audits_with_lira(trained_dir, tmp_path):
    # Prepare: a copy of the 1-epoch standard model and an analysis section asking for LiRA
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained_dir, model)
    config = tmp_path / "lira.yaml"
    config.write_text(yaml.safe_dump({"analysis": {"enabled": False, "reference_models": 2}}))
    # Execute
    result = _invoke("evaluate", model, "--config", config, "--attacks", "fgsm", "--n-examples", 20,
                     "--report")
    # Assert: LiRA joins the threshold attacks; every training example is a member, so its reference
    # models train on halves of members and non-members alone
    assert result.exit_code == 0, result.output
    membership = json.loads((model / "robustness.json").read_text())["privacy"]["membership"]
    lira = {m["attack"]: m for m in membership if m["attack"].startswith("lira")}
    assert set(lira) == {"lira-online", "lira-offline"}
    assert lira["lira-online"]["settings"]["n_reference_models"] == 2
    assert any(m["attack"] == "threshold-loss" for m in membership)


def test_audit_leaves_the_inputs_of_the_extra_data_out(tmp_path):
    # Prepare: a model trained with extra data that repeats two training and three test digits
    from fortify.config import RunConfig
    from fortify.pipeline import prepare

    dataset = prepare(RunConfig()).dataset
    x = np.concatenate([dataset.train.x[:2].numpy(), dataset.test.x[:3].numpy()])
    y = np.concatenate([dataset.train.y[:2].numpy(), dataset.test.y[:3].numpy()])
    np.savez(tmp_path / "extra.npz", x=x, y=y)
    config = tmp_path / "extra.yaml"
    config.write_text(yaml.safe_dump({"train": {"extra_data": str(tmp_path / "extra.npz"),
                                                "extra_fraction": 0.25}}))
    model_dir = tmp_path / "m"
    trained = _invoke("train", "--config", config, "--out", model_dir, "--objective", "standard",
                      "--epochs", 1, "--quiet")
    assert trained.exit_code == 0, trained.output
    # Execute
    result = _invoke("audit", model_dir, "--no-inversion")
    # Assert: the model trained on all five, so none is a non-member, nor a member LiRA could score
    assert result.exit_code == 0, result.output
    privacy = json.loads((model_dir / "privacy.json").read_text())["privacy"]
    assert privacy["n_members"] == len(dataset.train) - 2
    assert privacy["n_nonmembers"] == len(dataset.test) - 3
    note = "2 training and 3 test input(s) also occur in train.extra_data"
    assert any(note in warning for warning in privacy["warnings"])


@pytest.mark.parametrize("command", [("train", "--epochs", 1, "-q", "--out", "{blocked}/m"),
                                     ("export", "{model}", "-f", "safetensors", "--out",
                                      "{blocked}/x.safetensors")])
def test_a_file_where_an_output_folder_belongs_is_named_as_such(trained_dir, tmp_path, command):
    blocked = tmp_path / "settings.yaml"
    blocked.write_text("a: 1\n")
    args = [str(a).format(blocked=blocked, model=trained_dir) for a in command]
    _assert_clean_error(_invoke(*args), "a file stands where a folder is needed; choose another path")
    assert blocked.read_text() == "a: 1\n"


def test_changed_extra_data_stop_a_resumed_training_and_an_audit_but_not_an_evaluation(tmp_path):
    # Prepare: a model trained with extra data, whose file then changes
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 1, 8, 8)).astype(np.float32), np.arange(20) % 10
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=x, y=y)
    config = tmp_path / "extra.yaml"
    config.write_text(yaml.safe_dump({"train": {"extra_data": str(extra), "extra_fraction": 0.25}}))
    out = tmp_path / "m"
    train = ("train", "--config", config, "--out", out, "--model", "mlp", "--objective", "standard",
             "--epochs", 1, "--quiet")
    assert _invoke(*train).exit_code == 0
    assert re.fullmatch("[0-9a-f]{64}", json.loads((out / "model.json").read_text())["extra_data_sha256"])
    np.savez(extra, x=x[::-1].copy(), y=y)
    # Execute / Assert: the evaluation reads none of them; a resumed training would, and so would an
    # audit (it leaves the extra inputs out of members and non-members) and the report's audit
    evaluated = _invoke("evaluate", out, "--attacks", "fgsm", "--n-examples", 12)
    assert evaluated.exit_code == 0, evaluated.output
    changed = f"the extra training data in {extra} differ from those"
    _assert_clean_error(_invoke(*train, "--resume"), changed)
    _assert_clean_error(_invoke("audit", out, "--n-examples", 20), changed)
    reported = _invoke("evaluate", out, "--attacks", "fgsm", "--n-examples", 12, "--report")
    _assert_clean_error(reported, changed)
    assert not (out / "privacy.json").exists()


def test_audit_and_evaluate_of_a_run_directory_name_its_models(tmp_path):
    # a run directory as fortify run leaves it: its models one level down
    run = tmp_path / "run"
    trained = _invoke("train", "--model", "mlp", "--objective", "standard", "--epochs", 1, "--quiet",
                      "--out", run / "models" / "standard")
    assert trained.exit_code == 0, trained.output
    shutil.copy(run / "models" / "standard" / "config.yaml", run / "config.yaml")
    for command in (("audit", run, "--no-inversion"), ("evaluate", run, "--attacks", "fgsm")):
        _assert_clean_error(_invoke(*command), f"{run} is a run directory; give one of its models: "
                                               f"{run / 'models' / 'standard'}")


def test_audit_refuses_more_reference_models_than_it_would_ever_need(trained_dir):
    result = _invoke("audit", trained_dir, "--reference-models", 1_000_000)
    assert result.exit_code == 2, result.output
    assert "1000000 is not in the range" in result.output and "0<=x<=256" in result.output


def test_audit_refuses_lira_with_one_reference_model(trained_dir):
    _assert_clean_error(_invoke("audit", trained_dir, "--reference-models", 1), "reference")


@pytest.mark.slow
def test_audit_lira_queries_the_views_the_model_trained_on(tmp_path):
    # Prepare: a model trained with flips and 1-pixel crops
    config = tmp_path / "augment.yaml"
    config.write_text(yaml.safe_dump({"train": {"augment": {"flip": True, "crop_padding": 1}}}))
    model_dir = tmp_path / "m"
    trained = _invoke("train", "--config", config, "--out", model_dir, "--objective", "standard",
                      "--epochs", 1, "--quiet")
    assert trained.exit_code == 0, trained.output
    # Execute
    result = _invoke("audit", model_dir, "--reference-models", 2, "--lira-queries", "training",
                     "--no-inversion", "--n-examples", 60)
    # Assert: the image and its mirror, each under the 9 shifts of up to one pixel, padded as the
    # Trainer pads its crops (with the box's low end)
    assert result.exit_code == 0, result.output
    privacy = json.loads((model_dir / "privacy.json").read_text())["privacy"]
    lira = {m["attack"]: m for m in privacy["membership"]}["lira-online"]
    assert lira["settings"]["queries"] == {"mirror": True, "max_shift": 1, "padding": "constant", "fill": 0.0,
                                           "n_queries": 18}


@pytest.mark.parametrize("args, fragment", [
    (("--lira-queries", "training"), "give --reference-models N"),
    (("--reference-models", 2, "--lira-queries", "mirror"), "valid: single, training"),
])
def test_audit_refuses_lira_queries_it_cannot_use(trained_dir, args, fragment):
    _assert_clean_error(_invoke("audit", trained_dir, *args), fragment)


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: _touched(tmp / "file")],
                         ids=["missing", "file"])
def test_audit_names_a_model_dir_that_is_missing_or_a_file(tmp_path, make):
    target = make(tmp_path)
    expected = "is not a directory" if target.exists() else "does not exist"
    _assert_clean_error(_invoke("audit", target), f"{target} {expected}")


def _touched(path):
    path.write_text("")
    return path


def test_an_unknown_command_lists_the_commands():
    result = _invoke("trian")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "no such command 'trian'; valid: run, train, evaluate, audit" in " ".join(result.output.split())


def test_audit_refuses_a_negative_example_count(trained_dir):
    result = _invoke("audit", trained_dir, "--n-examples", -5, "--no-inversion")
    assert result.exit_code == 2 and "--n-examples" in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("settings", "message"), [
    ({"data": {"path": "mine.npz"}}, "dataset 'digits' does not read data.path (mine.npz)"),
    ({"data": {"target": "label"}}, "dataset 'digits' has no target column to choose"),
])
def test_data_settings_the_dataset_would_ignore_are_refused(settings, message):
    from fortify.config import load_config
    from fortify.errors import ConfigError
    from fortify.pipeline import prepare

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(load_config(None, settings), "cpu")


def test_a_data_file_picks_its_dataset_by_suffix(tmp_path):
    # an .npz file given without --dataset is loaded as npz, not dropped for digits
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((60, 1, 4, 4)).astype(np.float32), y=np.arange(60) % 3)
    result = _invoke("train", "--data", path, "--model", "mlp", "--objective", "standard", "--epochs", 1,
                     "-q", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["name"] == "npz"


def test_a_data_file_changed_under_its_path_is_refused_by_resume_evaluate_and_audit(tmp_path):
    # Prepare: a model trained on a file, evaluated once, then one label of the file changed
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 1, 4, 4)).astype(np.float32), np.arange(60) % 3
    np.savez(path, x=x, y=y)
    out = tmp_path / "m"
    train = ("train", "--data", path, "--model", "mlp", "--objective", "standard", "--epochs", 1, "-q",
             "--out", out)
    evaluate = ("evaluate", out, "--attacks", "fgsm", "--n-examples", 12)
    assert _invoke(*train).exit_code == 0
    assert re.fullmatch("[0-9a-f]{64}", json.loads((out / "model.json").read_text())["data_sha256"])
    assert _invoke(*evaluate).exit_code == 0  # the same data: no complaint
    y[0] = (y[0] + 1) % 3
    np.savez(path, x=x, y=y)
    before = _files_of(out)
    # Execute / Assert: each command refuses, and the directory stays as it was
    alias = tmp_path / "alias.yaml"  # the same file by another spelling of its path
    (tmp_path / "sub").mkdir()
    aliased = str(tmp_path / "sub" / ".." / "tiny.npz")
    alias.write_text(yaml.safe_dump({"data": {"name": "npz", "path": aliased}}))
    for command in ((*train, "--resume"), evaluate, ("audit", out), (*evaluate, "--config", alias)):
        _assert_clean_error(_invoke(*command), f"differ from those {out} was trained on")
    assert _files_of(out) == before
    # the data restored, evaluation goes on
    y[0] = (y[0] - 1) % 3
    np.savez(path, x=x, y=y)
    assert _invoke(*evaluate).exit_code == 0


def test_a_negative_seed_is_refused():
    _assert_clean_error(_invoke("train", "--seed", -1, "--out", "unused"), "seed")


def test_resume_ignores_where_data_is_cached_and_how_the_step_runs(tmp_path):
    from fortify.config import load_config
    from fortify.errors import ConfigError
    from fortify.pipeline import check_same_settings

    # channels_last false: what a run recorded before the layout became the CPU default (unset)
    saved = load_config(None, {"data": {"cache_dir": "/home/a/.cache"}, "train": {"channels_last": False}})
    (tmp_path / "config.yaml").write_text(saved.to_yaml())
    check_same_settings(tmp_path, load_config(None, {"data": {"cache_dir": "/root/.cache", "download": False},
                                                     "train": {"compile": True}}))
    with pytest.raises(ConfigError, match="train.amp was False, now True"):
        check_same_settings(tmp_path, load_config(None, {"train": {"channels_last": False, "amp": True}}))


def test_a_test_fraction_a_fixed_test_split_would_ignore_is_refused(tmp_path):
    from fortify.config import load_config
    from fortify.errors import ConfigError
    from fortify.pipeline import prepare

    rng = np.random.default_rng(0)
    path = tmp_path / "with-test.npz"
    np.savez(path, x=rng.random((40, 6)).astype(np.float32), y=np.arange(40) % 2,
             x_test=rng.random((10, 6)).astype(np.float32), y_test=np.arange(10) % 2)
    settings = {"data": {"name": "npz", "path": str(path)}}
    prepare(load_config(None, settings), "cpu")  # the default test_fraction: fine
    with pytest.raises(ConfigError, match="comes with its own test split, so data.test_fraction=0.3"):
        prepare(load_config(None, {"data": {**settings["data"], "test_fraction": 0.3}}), "cpu")


def test_a_loss_that_turns_nan_takes_back_what_the_run_wrote(tmp_path):
    out = tmp_path / "m"
    diverging = ("train", "--out", out, "--objective", "standard", "--epochs", 1, "--quiet")
    _assert_clean_error(_invoke(*diverging, "--lr", "1e30"), "training loss became", not_created=out)
    result = _invoke(*diverging, "--lr", "0.05")  # the same command, corrected, runs in the same place
    assert result.exit_code == 0, result.output


def test_a_failed_first_epoch_leaves_an_existing_directory_as_it_was(tmp_path):
    # Prepare: a run directory that holds its config.yaml (what --resume asks for) and a file of the user's
    from fortify.config import load_config

    config = tmp_path / "diverging.yaml"
    config.write_text("train:\n  lr: 1.0e+30\n  epochs: 1\n")
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.yaml").write_text(load_config(config).to_yaml())
    (out / "notes.txt").write_text("mine")
    # Execute
    result = _invoke("run", "--config", config, "--out", out, "--resume", "--quiet")
    # Assert: what the run added went again; what was there stays
    _assert_clean_error(result, "training loss became")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]


def test_a_failure_after_a_checkpoint_keeps_the_run_for_resume(tmp_path):
    from fortify.pipeline import discarded_on_error

    out = tmp_path / "run"
    with pytest.raises(RuntimeError), discarded_on_error(out):
        (out / "models" / "standard").mkdir(parents=True)
        (out / "models" / "standard" / "state.json").write_text("{}")  # the first model checkpointed
        raise RuntimeError("the second model failed")
    assert (out / "models" / "standard" / "state.json").is_file()
    with pytest.raises(KeyboardInterrupt), discarded_on_error(tmp_path / "interrupted"):
        (tmp_path / "interrupted").mkdir()
        raise KeyboardInterrupt  # an interrupt keeps what was written (--resume starts it again)
    assert (tmp_path / "interrupted").is_dir()


def test_evaluating_data_of_another_shape_or_class_count_is_refused_by_name(trained_dir, tmp_path):
    copy = _copy_of(trained_dir, tmp_path)
    (tmp_path / "bc.yaml").write_text("data: {name: breast-cancer}\n")
    result = _invoke("evaluate", copy, "--config", tmp_path / "bc.yaml", "--attacks", "fgsm",
                     "--n-examples", 20)
    _assert_clean_error(result, "takes inputs of shape (1, 8, 8) and scores 10 classes; the data "
                                "'breast-cancer' has inputs of shape (30,) and 2 classes")


def test_evaluating_data_in_another_box_is_refused(trained_dir, tmp_path):
    # digits' images, declared to lie in [-1, 2]: same shape and classes, another scale
    from fortify.data import load_dataset

    digits = load_dataset("digits")
    np.savez(tmp_path / "wide.npz", x=digits.train.x.numpy(), y=digits.train.y.numpy(),
             x_test=digits.test.x.numpy(), y_test=digits.test.y.numpy(), bounds=np.array([-1.0, 2.0]))
    (tmp_path / "wide.yaml").write_text(f"data: {{name: npz, path: {tmp_path / 'wide.npz'}}}\n")
    result = _invoke("evaluate", _copy_of(trained_dir, tmp_path), "--config", tmp_path / "wide.yaml",
                     "--attacks", "fgsm", "--n-examples", 20)
    _assert_clean_error(result, "was trained on inputs in [0, 1]; the data 'npz' lie in [-1, 2]")


def test_a_model_resumed_under_other_speed_settings_still_loads(tmp_path):
    # the resumed run rewrites config.yaml (channels_last now unset); its hash in state.json must be
    # the new one, or evaluate would call the settings edited
    out = tmp_path / "m"
    flags = ("train", "--model", "mlp", "--objective", "standard", "--epochs", 1, "--out", out, "--quiet")
    assert _invoke(*flags, "--no-channels-last").exit_code == 0
    resumed = _invoke(*flags, "--resume")
    assert resumed.exit_code == 0, resumed.output
    result = _invoke("evaluate", out, "--attacks", "fgsm", "--n-examples", 20)
    assert result.exit_code == 0, result.output


def test_resume_refuses_a_directory_that_holds_no_run(tmp_path):
    own = tmp_path / "proj"
    own.mkdir()
    (own / "model.json").write_text('{"my": "own file"}')
    result = _invoke("train", "--out", own, "--resume", "--epochs", 1, "--quiet")
    _assert_clean_error(result, "holds no config.yaml, so it is not a run to continue")
    assert (own / "model.json").read_text() == '{"my": "own file"}'
    _assert_clean_error(_invoke("run", "--out", own, "--resume", "--quiet"), "holds no config.yaml")


def _files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_run_resume_refuses_a_train_directory_and_train_resume_a_run_directory(trained_dir, tmp_path):
    from fortify.config import load_config

    # Prepare: a model directory whose config.yaml is the one fortify run writes (its settings would
    # pass run's check), and a run directory holding that model under models/
    model_dir = _copy_of(trained_dir, tmp_path)
    (model_dir / "config.yaml").write_text(load_config(None, {"train": {"epochs": 1}}).to_yaml())
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir / "models" / "standard")
    shutil.copy(trained_dir / "config.yaml", run_dir / "config.yaml")
    before = {d: _files_of(d) for d in (model_dir, run_dir)}
    # Execute and assert: each refused before anything is written over
    _assert_clean_error(_invoke("run", "--out", model_dir, "--resume", "--epochs", 1, "--quiet"),
                        "holds the output of fortify train, not of fortify run")
    _assert_clean_error(_invoke("train", "--out", run_dir, "--resume", "--objective", "standard",
                                "--epochs", 1, "--quiet"),
                        "holds the output of fortify run, not of fortify train")
    assert {d: _files_of(d) for d in (model_dir, run_dir)} == before


def test_a_run_cut_off_before_its_first_checkpoint_is_not_continued_by_train(tmp_path, monkeypatch):
    # Prepare: fortify run interrupted in its first training, with only its config.yaml written
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patched:  # undoes this patch alone, not the autouse fixtures'
        patched.setattr("fortify.cli.train_model", interrupt)
        assert _invoke("run", "--out", run_dir, "--epochs", 1, "--quiet").exit_code == 130
    before = _files_of(run_dir)
    assert "config.yaml" in before
    # Execute and assert: train --resume would have trained a model over the run's own directory
    # (without --objective: train's default, pgd, is the objective the run's config.yaml holds, so no
    # settings check stops it)
    _assert_clean_error(_invoke("train", "--out", run_dir, "--resume", "--epochs", 1, "--quiet"),
                        "holds the output of fortify run, not of fortify train")
    assert _files_of(run_dir) == before
    assert not (run_dir / "model.safetensors").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_cut_off_before_its_config_starts_again_in_its_directory(tmp_path, monkeypatch, resume):
    # Prepare: fortify run interrupted between making models/ and writing config.yaml
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr("fortify.cli.ckpt.atomic_write_text", interrupt)
        assert _invoke("run", "--out", run_dir, "--epochs", 1, "--quiet").exit_code == 130
    assert _files_of(run_dir) == {} and [p.name for p in run_dir.iterdir()] == ["models"]
    # Execute: the same command again, with or without --resume; it gets as far as training
    monkeypatch.setattr("fortify.cli.train_model", interrupt)
    again = _invoke("run", "--out", run_dir, "--epochs", 1, "--quiet", *(["--resume"] if resume else []))
    # Assert: nothing refused the directory, and the run wrote its config.yaml there
    assert again.exit_code == 130, again.output
    assert (run_dir / "config.yaml").is_file()


def test_a_run_that_fails_in_a_directory_left_with_an_empty_models_leaves_it_reusable(tmp_path, monkeypatch):
    # Prepare: the directory of a run cut off before its config.yaml
    run_dir = tmp_path / "run"
    (run_dir / "models").mkdir(parents=True)

    def diverge(*args, **kwargs):
        raise RuntimeError("loss is NaN")

    # Execute: a retry fails after writing the first model's files
    with monkeypatch.context() as patched:
        patched.setattr("fortify.training.trainer.Trainer.fit", diverge)
        assert _invoke("run", "--out", run_dir, "--epochs", 1, "--quiet").exit_code != 0
    # Assert: the failure took back everything, so the same command starts again there
    assert list(run_dir.iterdir()) == []

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fortify.cli.train_model", interrupt)
    assert _invoke("run", "--out", run_dir, "--epochs", 1, "--quiet").exit_code == 130
    assert (run_dir / "config.yaml").is_file()


def test_an_empty_models_directory_is_not_empty_to_train(tmp_path):
    # only fortify run makes models/ before its first file; to train it is another command's directory
    (tmp_path / "models").mkdir()
    _assert_clean_error(_invoke("train", "--out", tmp_path, "--epochs", 1, "--quiet"), "is not empty")
    _assert_clean_error(_invoke("train", "--out", tmp_path, "--resume", "--epochs", 1, "--quiet"),
                        "holds no config.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


@pytest.mark.parametrize("command, made_first", [("train", []), ("run", ["models"])])
def test_a_run_cut_off_while_its_config_was_written_resumes_from_the_start(tmp_path, command, made_first):
    # a kill between config.yaml.tmp and its rename left a directory neither --resume nor a rerun took
    for name in made_first:
        (tmp_path / name).mkdir()
    (tmp_path / "config.yaml.tmp").write_text("threat: {eps: 0.")
    assert _invoke(command, "--out", tmp_path, "--resume", "--epochs", 1, "--quiet").exit_code == 0
    assert (tmp_path / "config.yaml").is_file() and not (tmp_path / "config.yaml.tmp").exists()


def test_a_directory_holding_other_tmp_files_is_not_taken_for_an_unfinished_run(tmp_path):
    (tmp_path / "notes.tmp").write_text("keep me")
    _assert_clean_error(_invoke("train", "--out", tmp_path, "--epochs", 1, "--quiet"), "is not empty")
    assert (tmp_path / "notes.tmp").read_text() == "keep me"


def test_a_models_link_or_a_models_directory_with_files_is_not_an_empty_run(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked, filled = tmp_path / "linked", tmp_path / "filled"
    linked.mkdir()
    (linked / "models").symlink_to(elsewhere, target_is_directory=True)
    (filled / "models").mkdir(parents=True)
    (filled / "models" / "notes.txt").write_text("keep me")
    for out in (linked, filled):
        _assert_clean_error(_invoke("run", "--out", out, "--epochs", 1, "--quiet"), "is not empty")
    assert list(elsewhere.iterdir()) == [] and (filled / "models" / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(not file_size_limit.SUPPORTED, reason="needs POSIX file size limits")
def test_a_checkpoint_the_disk_cannot_hold_is_one_error_line_and_leaves_no_directory(tmp_path):
    # small-cnn's weights pass 20 kB, config.yaml does not: the first checkpoint fails to be written
    out = tmp_path / "m"
    proc = file_size_limit.run_with_file_size_limit(
        file_size_limit.FORTIFY_CLI, "train", "--epochs", 1, "--objective", "standard", "--out", out,
        "--quiet", limit=20_000)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()  # nothing written before the first checkpoint stays


@pytest.mark.parametrize("best_epoch", [5, 0, -1])
def test_a_state_json_whose_best_epoch_is_not_in_its_history_is_refused(trained_dir, tmp_path, best_epoch):
    copy = _copy_of(trained_dir, tmp_path)
    state = json.loads((copy / "state.json").read_text())
    state["progress"]["best_epoch"] = best_epoch
    (copy / "state.json").write_text(json.dumps(state))
    result = _invoke("train", "--out", copy, "--resume", "--objective", "standard", "--epochs", 1, "--quiet")
    _assert_clean_error(result, "'progress.best_epoch' must be an epoch of the history (1..1)")


def test_true_in_the_eps_grid_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("eval:\n  eps_grid: [true, 0.1]\n")
    _assert_clean_error(_invoke("train", "--config", config, "--out", tmp_path / "o"),
                        "numbers are expected, not true or false", not_created=tmp_path / "o")


def test_a_preset_refuses_the_flags_it_would_override_and_records_what_it_runs(trained_dir):
    from fortify.config import EvalConfig

    _assert_clean_error(_invoke("evaluate", trained_dir, "--preset", "autoattack", "--attacks", "fgsm"),
                        "--attacks does not apply to it")
    _assert_clean_error(_invoke("evaluate", trained_dir, "--preset", "autoattack", "--no-cascade"),
                        "--no-cascade does not apply to it")
    # from a config file: refused as well; the recorded settings name the attacks that ran, in a
    # cascade, and read back as they are
    for given in ({"attacks": ["fgsm"]}, {"cascade": False}):
        with pytest.raises(ValueError, match="preset 'autoattack'"):
            EvalConfig(preset="autoattack", **given)
    config = EvalConfig(preset="autoattack")
    assert (config.attacks, config.cascade) == (["apgd-ce", "apgd-t", "fab-t", "square"], True)
    assert EvalConfig(**config.model_dump()) == config


def test_a_preset_asked_for_replaces_the_attacks_a_model_directory_recorded(trained_dir, tmp_path):
    from fortify.pipeline import evaluation_config

    # the directory's config.yaml lists the default attacks; the preset must not be refused over them
    by_flag = evaluation_config(trained_dir, None, {"eval": {"preset": "autoattack"}}).eval
    file = tmp_path / "aa.yaml"
    file.write_text("eval:\n  preset: autoattack\n")
    by_file = evaluation_config(trained_dir, file, {}).eval
    for config in (by_flag, by_file):
        assert (config.attacks, config.cascade) == (["apgd-ce", "apgd-t", "fab-t", "square"], True)
    result = _invoke("evaluate", trained_dir, "--preset", "autoattack", "--n-examples", 5, "--steps", 2,
                     "--queries", 10)
    assert result.exit_code == 0, result.output


def test_attacks_asked_for_replace_the_preset_a_model_was_trained_under(tmp_path):
    from fortify.config import RunConfig
    from fortify.pipeline import evaluation_config

    # Prepare: a model directory whose config evaluates with the AutoAttack preset
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    recorded = RunConfig.model_validate({"eval": {"preset": "autoattack"}}).model_dump(mode="json")
    (model_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    file = tmp_path / "fgsm.yaml"
    file.write_text("eval:\n  attacks: [fgsm, pgd]\n")
    # Execute: the attacks from the flags, and from a config file
    by_flag = evaluation_config(model_dir, None, {"eval": {"attacks": ["fgsm"]}}).eval
    by_file = evaluation_config(model_dir, file, {}).eval
    kept = evaluation_config(model_dir, None, {"eval": {"n_examples": 50}}).eval
    # Assert: they ran the preset's four attacks, cascaded, in place of the ones asked for
    assert (by_flag.preset, by_flag.attacks, by_flag.cascade) == (None, ["fgsm"], False)
    assert (by_file.preset, by_file.attacks, by_file.cascade) == (None, ["fgsm", "pgd"], False)
    assert (kept.preset, kept.cascade) == ("autoattack", True)


@pytest.mark.parametrize("objective", ["trades", "no-such-objective"])
def test_run_refuses_a_train_objective_it_would_ignore(tmp_path, objective):
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  objective: {objective}\n")
    _assert_clean_error(_invoke("run", "--config", config, "--out", tmp_path / "o", "--quiet"),
                        f"train.objective='{objective}' does not apply", not_created=tmp_path / "o")


@pytest.mark.parametrize("flags, fragment", [
    (["--attacks", "fgsm", "--queries", 50], "--queries is read by square, hopskipjump; none of the attacks "
                                             "to run (fgsm) reads it"),
    (["--attacks", "fgsm,square", "--steps", 5], "--steps is read by pgd, apgd-ce"),
    (["--attacks", "fgsm", "--surrogate", "elsewhere"], "--surrogate is read by transfer"),
])
def test_a_generic_flag_no_chosen_attack_reads_is_refused(trained_dir, flags, fragment):
    _assert_clean_error(_invoke("evaluate", trained_dir, *flags), fragment)


def test_a_surrogate_of_other_data_is_refused_before_any_attack(trained_dir, tmp_path):
    # Prepare: a surrogate whose card says it scores 2 classes of 30 features
    surrogate = tmp_path / "tabular"
    shutil.copytree(trained_dir, surrogate)
    card = json.loads((surrogate / "model.json").read_text())
    (surrogate / "model.json").write_text(json.dumps({**card, "input_shape": [30], "num_classes": 2}))
    # Execute / Assert: named up front, not as "the model does not run" in the middle of the attacks
    _assert_clean_error(_invoke("evaluate", trained_dir, "--attacks", "transfer", "--surrogate", surrogate),
                        f"{surrogate} takes inputs of shape (30,) and scores 2 classes")


@pytest.mark.parametrize("command", ["evaluate", "run", "sweep"])
def test_a_generic_setting_in_a_config_file_that_no_attack_reads_is_refused(trained_dir, tmp_path, command):
    # Prepare: a config file that sets PGD's steps for an evaluation that runs FGSM alone (a sweep
    # used to accept it and record steps 50 beside results no attack with steps produced)
    config = tmp_path / "fgsm.yaml"
    config.write_text("eval:\n  attacks: [fgsm]\n  steps: 50\n")
    args = {"evaluate": ["evaluate", trained_dir, "--config", config],
            "run": ["run", "--config", config, "--out", tmp_path / "o", "--quiet"],
            "sweep": ["sweep", "--config", config, "--objectives", "standard", "--epochs", 1,
                      "--out", tmp_path / "o", "--quiet"]}[command]
    # Execute / Assert: refused before anything runs, naming the file
    _assert_clean_error(_invoke(*args), f"eval.steps in {config} is read by pgd", not_created=tmp_path / "o")



def test_results_files_hold_standard_json_whatever_the_numbers(tmp_path):
    # an epsilon without noise is infinite; Python's json would write the non-standard Infinity
    from fortify.pipeline import write_json

    write_json(tmp_path / "r.json", {"epsilon": float("inf"), "pair": (1.0, float("nan")), "n": [2]})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == {
        "epsilon": None, "pair": [1.0, None], "n": [2]}


def test_the_terminal_table_prints_bracketed_names_as_text(capsys):
    from fortify.cli import _print_comparison

    rob = {"clean_accuracy": 0.9, "worst_case_accuracy": 0.5,
           "attacks": [{"name": "fgsm", "mode": "independent", "adversarial_accuracy": 0.5}]}
    _print_comparison({"dataset": {"name": "d[x]"}, "threat": {"norm": "linf", "eps": 0.1},
                       "models": {"lr[eps=0.1]/pgd": {"robustness": rob}}})
    printed = capsys.readouterr().out
    assert "lr[eps=0.1]/pgd" in printed and "d[x]" in printed


@pytest.mark.slow
def test_an_evaluation_without_report_refreshes_an_earlier_report(trained_dir, tmp_path):
    # Prepare: a copy of the model with a report at eps 0.2
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained_dir, model)
    first = _invoke("evaluate", model, "--attacks", "fgsm", "--n-examples", 10, "--report")
    assert first.exit_code == 0, first.output
    assert "eps=0.2" in (model / "report.html").read_text()
    # Execute: evaluate again at another eps, without --report
    second = _invoke("evaluate", model, "--attacks", "fgsm", "--n-examples", 10, "--eps", 0.1)
    # Assert: the page beside robustness.json shows the new numbers
    assert second.exit_code == 0, second.output
    page = (model / "report.html").read_text()
    assert "eps=0.1" in page and "eps=0.2" not in page


def test_the_command_line_formats_a_warning_as_one_line(monkeypatch):
    from fortify import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored afterwards
    monkeypatch.setattr(sys, "argv", ["fortify", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    # what Python's warning display prints: no file name, no source line
    shown = warnings.formatwarning("train.amp: slow here", RuntimeWarning, "/src/fortify/pipeline.py", 363,
                                   "    trainer = Trainer(model)")
    assert shown == "warning: train.amp: slow here\n"


def test_paths_that_look_like_markup_are_printed_as_they_are(trained_dir, tmp_path):
    """Rich reads "[...]" as markup: a closing tag in a path crashed the command after its work was
    done, and a style-like one vanished from what was printed."""
    import shutil

    # Prepare: the model in a directory whose name holds both
    model = tmp_path / "m[/x][red]"
    shutil.copytree(trained_dir, model)
    # Execute: evaluate (table title, report line), then report and export to such paths
    evaluated = _invoke("evaluate", model, "--attacks", "fgsm,pgd", "--steps", 2, "--n-examples", 10,
                        "--cascade", "--report")
    reported = _invoke("report", model, "--out", tmp_path / "r[/y].html")
    exported = _invoke("export", model, "--format", "safetensors", "--out", tmp_path / "e[/z].safetensors")
    # Assert: each finished, printing the paths letter for letter
    for result in (evaluated, reported, exported):
        assert result.exit_code == 0, (result.output, result.exception)
    evaluated_text, reported_text, exported_text = (r.output.replace("\n", "")  # rich wraps long lines
                                                    for r in (evaluated, reported, exported))
    assert f"report: {model / 'report.html'}" in evaluated_text
    assert "fgsm (cascade)" in evaluated_text  # cumulative columns marked as on the page
    assert f"report: {tmp_path / 'r[/y].html'}" in reported_text
    assert str(tmp_path / "e[/z].safetensors") in exported_text


def test_a_config_that_is_not_a_regular_file_is_refused(tmp_path):
    # a pipe (--config <(...)) reads once; a command that reads its config twice dropped its settings
    import os

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    _assert_clean_error(_invoke("train", "--config", pipe, "--out", tmp_path / "o"),
                        "is not a regular file; write the config to a file first", not_created=tmp_path / "o")
