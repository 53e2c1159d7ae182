"""fortify sweep: the grid, the Pareto front, run directories, outputs and resume."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import fortify.sweep as sweep_module
from fortify.cli import app
from fortify.config import load_config
from fortify.errors import CheckpointError, ConfigError, ResultsError
from fortify.sweep import (
    RunResult,
    RunSpec,
    SweepGrid,
    expand_grid,
    load_sweep,
    pareto_front,
    pareto_fronts,
    plot_tradeoff,
    run_sweep,
    table_rows,
)
from fortify.training import checkpoint as ckpt

# -- the Pareto front: a pure function ---------------------------------------------------------


def test_pareto_front_of_hand_made_points():
    points = [(0.9, 0.1), (0.8, 0.4), (0.7, 0.3), (0.5, 0.5), (0.9, 0.1), (0.5, 0.45), (0.95, 0.05)]
    # (0.7, 0.3) loses to (0.8, 0.4); (0.5, 0.45) to (0.5, 0.5); equal points do not dominate each other
    assert pareto_front(points) == [0, 1, 3, 4, 6]


def test_pareto_front_of_a_chain_is_its_top():
    assert pareto_front([(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)]) == [2]
    assert pareto_front([]) == []


def _dominates(p, q):
    return p[0] >= q[0] and p[1] >= q[1] and p != q


@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 10)), max_size=30))
def test_pareto_front_holds_exactly_the_undominated_points(points):
    front = pareto_front(points)
    assert front == sorted(front)
    for i, p in enumerate(points):
        assert (i in front) == (not any(_dominates(q, p) for q in points))


def _result(name, eps, clean, robust):
    return RunResult(name=name, objective="standard", eps=eps, trades_beta=6.0, mix_ratio=0.5, epochs=1,
                     clean_accuracy=clean, robust_accuracy=robust, attack_accuracy={}, n_examples=10,
                     train_seconds=1.0, passes_per_epoch=1.0, best_epoch=1)


def test_runs_of_different_eps_are_on_fronts_of_their_own():
    # one front over all eps let a run measured in a small ball dominate the same training measured
    # in a larger one
    results = [_result("a_eps0.1", 0.1, 0.9, 0.5), _result("a_eps0.2", 0.2, 0.9, 0.3),
               _result("b_eps0.2", 0.2, 0.8, 0.2)]
    assert pareto_fronts(results) == {0.1: [0], 0.2: [1]}
    assert [row["pareto"] for row in table_rows(results)] == [True, True, False]


@pytest.mark.parametrize("n_eps", [2, 9])
def test_the_tradeoff_plot_draws_the_front_of_every_eps(tmp_path, monkeypatch, n_eps):
    import matplotlib.figure

    # Prepare: two runs per eps, one dominating the other; the figure is caught before it is saved
    results = [_result(f"{kind}_eps{i}", 0.01 * i, clean, robust)
               for i in range(1, n_eps + 1) for kind, clean, robust in (("a", 0.9, 0.5), ("b", 0.8, 0.4))]
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    # Execute
    plot_tradeoff(results, tmp_path / "tradeoff.png")
    # Assert: one labelled front per eps, in colours of their own
    lines = saved[0].axes[0].get_lines()
    expected = [f"Pareto front, eps {0.01 * i:g}" for i in range(1, n_eps + 1)]
    assert [line.get_label() for line in lines] == expected
    assert len({tuple(matplotlib.colors.to_rgba(line.get_color())) for line in lines}) == n_eps


# -- the grid ------------------------------------------------------------------------------------

def test_a_setting_multiplies_only_the_objectives_that_read_it():
    base = load_config(None, {"train": {"epochs": 3, "trades_beta": 6.0}})
    grid = SweepGrid(objective=["pgd", "trades"], trades_beta=[1.0, 6.0], epochs=[1, 2])
    specs = expand_grid(grid, base)
    # pgd ignores beta: 2 epoch values; trades: 2 betas x 2 epoch values
    assert [s.name for s in specs] == ["pgd_eps0.2_ep1", "pgd_eps0.2_ep2", "trades_eps0.2_beta1_ep1",
                                       "trades_eps0.2_beta1_ep2", "trades_eps0.2_beta6_ep1",
                                       "trades_eps0.2_beta6_ep2"]
    assert {s.trades_beta for s in specs if s.objective == "pgd"} == {6.0}


def test_run_spec_config_sets_the_grid_values():
    base = load_config(None, {"train": {"lr": 0.01}})
    config = RunSpec("pgd-mix", 0.1, 6.0, 0.25, 4).config(base)
    assert (config.train.objective, config.threat.eps, config.train.mix_ratio, config.train.epochs,
            config.train.lr) == ("pgd-mix", 0.1, 0.25, 4, 0.01)


def test_yaml_sweep_section_and_flags_flags_win(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.02},
                                    "sweep": {"objective": ["pgd", "trades"], "eps": [0.1, 0.2]}}))
    base, grid = load_sweep(path, {}, {"eps": [0.3], "objective": None})
    assert base.train.lr == 0.02
    assert grid.objective == ["pgd", "trades"] and grid.eps == [0.3]


@pytest.mark.parametrize(("section", "match"), [({"beta": [1]}, "valid settings: objective, eps"),
                                                 ({"eps": []}, "eps"), ([1, 2], "must be a mapping")])
def test_bad_sweep_sections_are_config_errors(tmp_path, section, match):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": section}))
    with pytest.raises(ConfigError, match=match):
        load_sweep(path, {}, {})


@pytest.mark.parametrize(("text", "match"), [
    ("0.1,,0.2", "empty item at position 2"), ("0.1,0.2,", "empty item at position 3"),
    (",0.1", "empty item at position 1"), ("0.1,0.1", "lists '0.1' twice"),
    ("0.1,0.10", "lists '0.10' twice"), ("0.1,abc", "float values, got 'abc'")])
def test_grid_flag_values_with_an_empty_or_repeated_item_are_refused(text, match):
    with pytest.raises(ConfigError, match=match):
        sweep_module.parse_grid_values(text, "--eps", float)


def test_grid_flag_values_parse_in_order():
    assert sweep_module.parse_grid_values(" 10, 30 ", "--epochs", int) == [10, 30]
    assert sweep_module.parse_grid_values(None, "--epochs", int) is None


@pytest.mark.parametrize(("section", "flags", "match"), [
    ({"eps": [0.1, 0.2, 0.1]}, {}, "eps: 0.1 is listed twice"),
    ({}, {"objective": ["pgd", "trades", "pgd"]}, "objective: 'pgd' is listed twice"),
    ({"epochs": [10, 10.0]}, {}, "epochs: 10 is listed twice")])
def test_a_value_listed_twice_in_the_grid_is_refused(tmp_path, section, flags, match):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": section}))
    with pytest.raises(ConfigError, match=match):
        load_sweep(path, {}, flags)


@pytest.mark.parametrize(("text", "match"), [
    ("train:\n  lr: 0.1\nsweep: {eps: [0.1}\n", "line 3, column 18: expected ',' or ']', but got '}'"),
    ("sweep:\n  eps: [0.1]\n  eps: [0.2]\n", "line 3, column 3: key 'eps' is given twice")])
def test_a_yaml_error_in_a_sweep_file_is_one_line_naming_where(tmp_path, text, match):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_sweep(path, {}, {})
    assert "\n" not in str(caught.value)
    assert match in str(caught.value)


def test_an_eps_outside_the_box_stops_the_sweep_before_any_run(tmp_path):
    base = load_config(None, {"train": {"epochs": 1}})
    with pytest.raises(ConfigError):
        run_sweep(base, SweepGrid(objective=["standard"], eps=[0.1, 2.0]), tmp_path / "out", device="cpu",
                  show_progress=False)
    assert not (tmp_path / "out").exists()


# -- a tiny sweep end to end -----------------------------------------------------------------------

TINY = {"train": {"epochs": 1, "batch_size": 128, "attack_steps": 1, "val_attack_steps": 1,
                  "early_stopping": False},
        "eval": {"attacks": ["pgd"], "steps": 2, "n_examples": 48}}
TINY_GRID = SweepGrid(objective=["standard", "trades"], trades_beta=[1.0, 6.0])
NAMES = ["standard_eps0.2_ep1", "trades_eps0.2_beta1_ep1", "trades_eps0.2_beta6_ep1"]


class Stop(Exception):
    pass


@pytest.mark.parametrize("model, passes", [
    ("small-cnn", {"standard": 1.0, "fgsm": 2.0, "trades": 3.0, "pgd": 2.0, "free": 8.0}),  # free: 8 replays
    # BatchNorm reads the mode: fgsm and TRADES take their attack's own clean pass (eval mode)
    ("preact-resnet18", {"fgsm": 3.0, "trades": 4.0}),
])
def test_the_passes_counted_per_epoch_are_the_ones_training_takes(model, passes):
    # the count's own hook on the model made it count as mode-dependent: fgsm and TRADES were counted
    # with the pass more that only mode-dependent models take (3 and 4 on small-cnn)
    base = load_config(None, {**TINY, "model": {"name": model}, "data": {"name": "digits"}})
    setup = sweep_module.prepare(base, "cpu", objectives=tuple(passes))
    setup = sweep_module._setup_for(setup, base)
    counted = {name: sweep_module.count_forward_passes(setup, name) for name in passes}
    assert counted == passes




@pytest.mark.slow
def test_sweep_writes_runs_table_plot_and_resumes_skipping_finished_runs(tmp_path, monkeypatch):
    # Prepare: the first invocation dies while attacking the second run (trained, not evaluated)
    base = load_config(None, TINY)
    out = tmp_path / "sweep"
    evaluate = sweep_module.evaluate_model
    calls = {"evaluate": 0, "train": []}

    def evaluate_then_die(setup, model):
        calls["evaluate"] += 1
        if calls["evaluate"] == 2:
            raise Stop
        return evaluate(setup, model)

    monkeypatch.setattr(sweep_module, "evaluate_model", evaluate_then_die)
    with pytest.raises(Stop):
        run_sweep(base, TINY_GRID, out, device="cpu", show_progress=False)
    second_state = json.loads((out / NAMES[1] / "state.json").read_text())
    # Execute: the same sweep again
    monkeypatch.setattr(sweep_module, "evaluate_model", evaluate)
    train = sweep_module.train_model

    def record_train(setup, objective, run_dir, **kwargs):
        calls["train"].append(run_dir.name)
        return train(setup, objective, run_dir, **kwargs)

    monkeypatch.setattr(sweep_module, "train_model", record_train)
    results = run_sweep(base, TINY_GRID, out, device="cpu", show_progress=False)
    # Assert: the finished run was skipped, the trained one reused without new epochs, the last trained
    assert [r.name for r in results] == NAMES
    assert [r.status for r in results] == ["skipped", "done", "done"]
    assert calls["train"] == NAMES[1:]
    assert json.loads((out / NAMES[1] / "state.json").read_text())["progress"] == second_state["progress"]
    for name in NAMES:
        assert (out / name / "model.safetensors").is_file() and (out / name / "result.json").is_file()
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == NAMES
    assert set(rows[0]) >= {"clean_accuracy", "robust_accuracy", "acc_pgd-2", "train_seconds",
                            "passes_per_epoch", "pareto", "norm", "n_examples"}
    assert {(row["norm"], row["n_examples"]) for row in rows} == {("linf", "48")}
    summary = json.loads((out / "sweep.json").read_text())
    points = [(r.clean_accuracy, r.robust_accuracy) for r in results]
    assert summary["pareto"] == [NAMES[i] for i in pareto_front(points)]
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # forward passes per example: standard 1; TRADES with 1 attack step on small-cnn, which runs alike
    # in both modes: the clean pass (the attack's target and the loss's clean term), the attack's
    # step and the adversarial training pass = 3
    assert [r.passes_per_epoch for r in results] == [1.0, 3.0, 3.0]
    assert all(r.robust_accuracy <= r.clean_accuracy for r in results)
    # each finished run is a results directory that `fortify compare` and `fortify report` read
    from fortify.report.compare import merge_runs
    from fortify.report.results import load_results

    merged = merge_runs([load_results(out / name) for name in NAMES])
    shown = {name: model["robustness"]["clean_accuracy"] for name, model in merged["models"].items()}
    assert shown == {f"{name}/{name}": r.clean_accuracy for name, r in zip(NAMES, results)}


def test_sweep_with_other_settings_in_a_finished_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "out" / "standard_eps0.2_ep1"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"config": {"other": True}, "result": {}}))
    ckpt.write_state_json(run_dir, {"finished": True})
    base = load_config(None, TINY)
    with pytest.raises(ConfigError, match="other settings"):
        run_sweep(base, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                  show_progress=False)


def test_cli_sweep_rejects_a_bad_grid_value_without_a_traceback(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--eps", "0.1,abc", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "--eps takes comma-separated float values" in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_sweep_refuses_a_repeated_grid_value_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "run_sweep", _no_run)
    result = CliRunner().invoke(app, ["sweep", "--eps", "0.1,0.1", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    # refused by the flag's parsing or by the grid's check, each naming the value
    assert "0.1" in result.output and "twice" in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_sweep_prints_a_yaml_error_on_one_line(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep: {eps: [0.1}\n")
    result = CliRunner().invoke(app, ["sweep", "-c", str(path), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "line 1, column 18" in result.output


# -- run directories already in OUT: kept, checked, refused -------------------------------------------

def _no_run(*_args, **_kwargs):
    raise Stop


def _fake_finished_run(out, spec, base, *, config=None, robust=0.3):
    """A run directory as a finished run leaves it (result.json), without training anything."""
    run_dir = out / spec.name
    run_dir.mkdir(parents=True)
    result = RunResult(spec.name, spec.objective, spec.eps, spec.trades_beta, spec.mix_ratio, spec.epochs,
                       clean_accuracy=0.9, robust_accuracy=robust, attack_accuracy={"pgd-2": robust},
                       n_examples=48, train_seconds=1.0, passes_per_epoch=1.0, best_epoch=1)
    config = config or spec.config(base).model_dump(mode="json")
    (run_dir / "result.json").write_text(json.dumps({"config": config, "result": asdict(result)}))
    ckpt.write_state_json(run_dir, {"finished": True})
    return run_dir


def _config_with(spec, base, **train):
    config = spec.config(base).model_dump(mode="json")
    config["train"].update(train)
    return config


def test_a_rerun_with_a_smaller_grid_keeps_every_finished_run_of_the_same_settings(tmp_path, monkeypatch):
    # Prepare: the three runs of TINY_GRID finished, and one made with another learning rate
    base = load_config(None, TINY)
    out = tmp_path / "sweep"
    specs = expand_grid(TINY_GRID, base)
    for robust, spec in zip([0.1, 0.3, 0.2], specs):
        _fake_finished_run(out, spec, base, robust=robust)
    other = RunSpec("pgd", 0.2, 6.0, 0.5, 1)
    _fake_finished_run(out, other, base, config=_config_with(other, base, lr=0.001))
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    lines = []
    # Execute: the first run's grid point alone
    results = run_sweep(base, SweepGrid(objective=["standard"]), out, device="cpu", show_progress=False,
                        log=lines.append)
    # Assert: the summary holds all three runs of these settings, the grid's first; the other is named
    assert [(r.name, r.status) for r in results] == [(NAMES[0], "skipped"), (NAMES[1], "kept"),
                                                     (NAMES[2], "kept")]
    with open(out / "sweep.csv", newline="") as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == NAMES
    summary = json.loads((out / "sweep.json").read_text())
    assert [run["name"] for run in summary["runs"]] == NAMES
    assert summary["pareto"] == [NAMES[1]]
    assert any("other settings" in line and other.name in line for line in lines)


def test_a_settings_mismatch_names_each_differing_setting_with_both_values(tmp_path):
    base = load_config(None, TINY)
    spec = expand_grid(SweepGrid(objective=["standard"]), base)[0]
    config = _config_with(spec, base, lr=0.01)
    config["eval"]["steps"] = 5
    _fake_finished_run(tmp_path / "out", spec, base, config=config)
    with pytest.raises(ConfigError, match="other settings") as caught:
        run_sweep(base, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                  show_progress=False)
    assert "eval.steps was 5, now 2" in str(caught.value)
    assert "train.lr was 0.01, now 0.05" in str(caught.value)


def test_a_run_attacked_under_other_eval_settings_is_refused_with_the_file_to_remove(tmp_path):
    # the model is kept: the advice used to be to remove the whole run directory, i.e. to train again
    base = load_config(None, TINY)
    spec = expand_grid(SweepGrid(objective=["standard"]), base)[0]
    config = spec.config(base).model_dump(mode="json")
    config["eval"]["steps"] = 5
    run_dir = _fake_finished_run(tmp_path / "out", spec, base, config=config)
    with pytest.raises(ConfigError, match=re.escape(f"remove {run_dir / 'result.json'} to attack its model "
                                                    "again under these")):
        run_sweep(base, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                  show_progress=False)


def test_a_finished_run_evaluated_in_another_memory_layout_is_kept(tmp_path, monkeypatch):
    # eval.channels_last changes float rounding at most, as train.channels_last does: a finished
    # sweep rerun with --no-channels-last (or the reverse) was refused as "other settings"
    base = load_config(None, TINY)
    spec = expand_grid(SweepGrid(objective=["standard"]), base)[0]
    config = spec.config(base).model_dump(mode="json")
    config["eval"]["channels_last"] = not config["eval"]["channels_last"]
    _fake_finished_run(tmp_path / "out", spec, base, config=config)
    results = run_sweep(base, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                        show_progress=False)
    assert [r.status for r in results] == ["skipped"]


def test_a_run_the_trainer_would_refuse_stops_the_sweep_before_any_run_trains(tmp_path, monkeypatch):
    # DP cannot train Free AT: the standard run used to train first, then the sweep stopped with no table
    base = load_config(None, {**TINY, "dp": {"enabled": True, "noise_multiplier": 1.0},
                              "model": {"name": "mlp"}})
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    with pytest.raises(ConfigError, match="objective 'free' cannot be trained with DP"):
        run_sweep(base, SweepGrid(objective=["standard", "free"]), tmp_path / "out", device="cpu",
                  show_progress=False)
    assert not (tmp_path / "out").exists()


DAMAGED_RESULTS = {"truncated": lambda text: text[: len(text) // 2], "not a mapping": lambda _: "[1, 2]",
                   "a field missing": lambda text: text.replace('"best_epoch"', '"best"'),
                   # values the table would print as 700.0% or nan%
                   "an accuracy above 1": lambda text: re.sub(r'"clean_accuracy": [^,}]+',
                                                             '"clean_accuracy": 7.0', text),
                   "a NaN accuracy": lambda text: re.sub(r'"robust_accuracy": [^,}]+',
                                                        '"robust_accuracy": NaN', text)}


@pytest.mark.parametrize("damage", DAMAGED_RESULTS)
@pytest.mark.parametrize("in_grid", [True, False])
def test_a_damaged_result_json_stops_the_sweep_before_any_run(tmp_path, monkeypatch, damage, in_grid):
    # Prepare: a damaged finished run, the grid's second run or one outside the grid
    base = load_config(None, TINY)
    damaged = RunSpec("pgd", 0.2, 6.0, 0.5, 1 if in_grid else 2)
    path = _fake_finished_run(tmp_path / "out", damaged, base) / "result.json"
    path.write_text(DAMAGED_RESULTS[damage](path.read_text()))
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    # Execute / Assert: a clear error, before the first run trains
    with pytest.raises(ResultsError, match=f"{damaged.name}/result.json is not a readable sweep result"):
        run_sweep(base, SweepGrid(objective=["standard", "pgd"]), tmp_path / "out", device="cpu",
                  show_progress=False)


def test_cli_sweep_reports_a_damaged_result_json_in_one_line(tmp_path):
    run_dir = tmp_path / "out" / "standard_eps0.2_ep1"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text('{"config": {"data": ')
    ckpt.write_state_json(run_dir, {"finished": True})
    result = CliRunner().invoke(app, ["sweep", "--objectives", "standard", "--epochs", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "result.json is not a readable sweep result (not valid JSON" in result.output
    assert isinstance(result.exception, SystemExit) and result.output.strip().count("\n") == 0


@pytest.mark.parametrize(("finished", "objectives"), [(True, ["pgd"]), (False, ["standard", "pgd"])])
def test_a_truncated_state_json_stops_the_sweep_before_any_run(tmp_path, monkeypatch, finished, objectives):
    # Prepare: a finished run (skipped if state.json were not read) or the grid's second run, interrupted
    base = load_config(None, TINY)
    spec = RunSpec("pgd", 0.2, 6.0, 0.5, 1)
    run_dir = tmp_path / "out" / spec.name
    if finished:
        _fake_finished_run(tmp_path / "out", spec, base)
    else:
        run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text('{"format": "fortify", "version": "1", "finished": tr')
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=f"state.json is not valid JSON.*remove .*{spec.name}"):
        run_sweep(base, SweepGrid(objective=objectives), tmp_path / "out", device="cpu", show_progress=False)


@pytest.mark.parametrize("section", [{"epochs": [True]}, {"eps": [0.1, False]}])
def test_true_or_false_in_a_numeric_grid_is_refused(tmp_path, section):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": section}))
    with pytest.raises(ConfigError, match="numbers are expected, not true or false"):
        load_sweep(path, {}, {})


def test_a_finished_run_without_its_state_json_stops_the_sweep(tmp_path, monkeypatch):
    # a model directory without state.json cannot be loaded by fortify evaluate: not a finished run
    base = load_config(None, TINY)
    spec = RunSpec("pgd", 0.2, 6.0, 0.5, 1)
    (_fake_finished_run(tmp_path / "out", spec, base) / "state.json").unlink()
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    with pytest.raises(CheckpointError, match=f"{spec.name} has a result.json but no state.json"):
        run_sweep(base, SweepGrid(objective=["pgd"]), tmp_path / "out", device="cpu", show_progress=False)


def test_a_finished_run_cached_elsewhere_is_still_the_same_run(tmp_path, monkeypatch):
    # another user or container: only data.cache_dir and data.download differ
    base = load_config(None, TINY)
    spec = RunSpec("pgd", 0.2, 6.0, 0.5, 1)
    config = spec.config(base).model_dump(mode="json")
    config["data"].update(cache_dir="/home/someone/.cache/fortify", download=False)
    _fake_finished_run(tmp_path / "out", spec, base, config=config)
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    results = run_sweep(base, SweepGrid(objective=["pgd"]), tmp_path / "out", device="cpu",
                        show_progress=False)
    assert [r.status for r in results] == ["skipped"]


def test_a_run_whose_loss_turns_nan_takes_back_what_it_wrote_and_the_corrected_sweep_runs(tmp_path):
    # Prepare: a learning rate that makes the loss NaN in the first epoch
    diverging = load_config(None, {**TINY, "train": {**TINY["train"], "lr": 1e30}})
    grid = SweepGrid(objective=["standard"])
    # Execute / Assert: the run directory goes, so the corrected sweep is no 'resume' of it
    with pytest.raises(ConfigError, match="training loss became"):
        run_sweep(diverging, grid, tmp_path / "out", device="cpu", show_progress=False)
    assert not (tmp_path / "out" / "standard_eps0.2_ep1").exists()
    results = run_sweep(load_config(None, TINY), grid, tmp_path / "out", device="cpu", show_progress=False)
    assert [r.name for r in results] == ["standard_eps0.2_ep1"]


def test_grid_values_that_would_share_a_run_directory_are_refused_before_any_run():
    with pytest.raises(ConfigError, match="would share the run directory 'standard_eps0.123456_ep1'"):
        expand_grid(SweepGrid(objective=["standard"], eps=[0.1234561, 0.1234562]), load_config(None, TINY))


@pytest.mark.parametrize(("grid", "fragment"), [
    (SweepGrid(objective=["pgd"], trades_beta=[1.0, 6.0]),
     "trades_beta = [1.0, 6.0], which only trades, awp-trades"),
    (SweepGrid(objective=["standard", "trades"], mix_ratio=[0.5]),
     "mix_ratio = [0.5], which only pgd-mix reads"),
], ids=["trades-beta", "mix-ratio"])
def test_a_grid_setting_no_objective_reads_is_refused_before_any_run(grid, fragment):
    # the runs would all train with the base value: a sweep over nothing, silently
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        expand_grid(grid, load_config(None, TINY))


def test_a_grid_setting_that_one_objective_reads_is_kept_for_that_one():
    grid = SweepGrid(objective=["pgd", "trades"], trades_beta=[1.0, 6.0])
    specs = expand_grid(grid, load_config(None, TINY))
    assert [(s.objective, s.trades_beta) for s in specs] == [("pgd", 6.0), ("trades", 1.0), ("trades", 6.0)]


def test_another_analysis_section_does_not_stop_a_finished_sweep(tmp_path, monkeypatch):
    # Prepare: the sweep's runs finished; the same sweep again with analysis settings changed, which a
    # sweep never reads (it trains and evaluates, no analysis)
    base = load_config(None, TINY)
    out = tmp_path / "sweep"
    for spec in expand_grid(TINY_GRID, base):
        _fake_finished_run(out, spec, base)
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    again = load_config(None, {**TINY, "analysis": {"margin_examples": 7}})
    # Execute / Assert: every run is taken as finished, none is refused or retrained
    results = run_sweep(again, TINY_GRID, out, device="cpu", show_progress=False)
    assert [(r.name, r.status) for r in results] == [(name, "skipped") for name in NAMES]


@pytest.mark.parametrize("foreign, fragment", [
    ("notes.txt", "holds 'notes.txt', which a sweep does not write"),
    ("photos/", "holds 'photos', which a sweep does not write"),
    ("results.json", "holds the output of fortify run, not of fortify sweep"),
    ("state.json", "holds the output of fortify train, not of fortify sweep"),
])
def test_a_sweep_refuses_a_directory_that_is_not_a_sweeps_and_leaves_it_as_it_was(tmp_path, foreign,
                                                                                   fragment):
    # Prepare: someone else's directory (a file, a folder with content, a run's or a model's files)
    out = tmp_path / "elsewhere"
    (out / foreign.rstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    if foreign.endswith("/"):
        (out / foreign / "cat.png").parent.mkdir(parents=True)
        (out / foreign / "cat.png").write_bytes(b"not a run")
    else:
        (out / foreign).write_text("{}")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    # Execute
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        run_sweep(load_config(None, TINY), SweepGrid(objective=["standard"]), out, device="cpu",
                  show_progress=False)
    # Assert: nothing was added
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_a_sweep_continues_a_directory_of_its_summary_runs_and_a_run_cut_off_at_its_start(tmp_path):
    from fortify.sweep import check_sweep_directory

    out = tmp_path / "sweep"
    (out / "standard_eps0.2_ep1").mkdir(parents=True)
    (out / "standard_eps0.2_ep1" / "config.yaml").write_text("")
    (out / "trades_eps0.2_beta1_ep1").mkdir()  # cut off before its first file
    (out / "fgsm_eps0.2_ep1").mkdir()  # cut off while its first file was written
    (out / "fgsm_eps0.2_ep1" / "config.yaml.tmp").write_text("threat:")
    (out / "sweep.json.tmp").write_text("")  # cut off while the summary was written
    (out / ".DS_Store").write_text("")
    check_sweep_directory(out)  # no error
    (out / "trades_eps0.2_beta1_ep1" / "weights.bin").write_text("")
    with pytest.raises(ConfigError, match="holds 'trades_eps0.2_beta1_ep1', which a sweep does not write"):
        check_sweep_directory(out)


def _card_of_other_data(run_dir):
    (run_dir / "model.json").write_text(json.dumps({"data_sha256": "0" * 64}))


def test_a_rerun_under_another_seed_names_the_settings_not_the_data(tmp_path, monkeypatch):
    # another seed splits the data otherwise, so their hash differs too: the settings are the cause
    base = load_config(None, TINY)
    spec = expand_grid(SweepGrid(objective=["standard"]), base)[0]
    run_dir = _fake_finished_run(tmp_path / "out", spec, base)
    (run_dir / "config.yaml").write_text(spec.config(base).to_yaml())
    _card_of_other_data(run_dir)
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    reseeded = load_config(None, {**TINY, "data": {"seed": 3}})
    with pytest.raises(ConfigError, match="other settings than this sweep's: data.seed was 0, now 3"):
        run_sweep(reseeded, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                  show_progress=False)


def test_a_finished_run_outside_the_grid_of_data_since_changed_stops_the_sweep(tmp_path, monkeypatch):
    # Prepare: the grid's run, and one outside it that the summary would keep, of other data
    base = load_config(None, TINY)
    inside, outside = expand_grid(SweepGrid(objective=["standard", "fgsm"]), base)
    for spec in (inside, outside):
        run_dir = _fake_finished_run(tmp_path / "out", spec, base)
        (run_dir / "config.yaml").write_text(spec.config(base).to_yaml())
    _card_of_other_data(tmp_path / "out" / outside.name)
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    # Execute / Assert: refused, naming the run outside the grid
    with pytest.raises(ConfigError, match=f"differ from those .*{outside.name} was trained on"):
        run_sweep(base, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                  show_progress=False)


def test_a_file_beside_a_sweeps_summary_does_not_stop_the_sweep(tmp_path):
    from fortify.sweep import check_sweep_directory

    (tmp_path / "sweep.json").write_text("{}")
    (tmp_path / "comparison.html").write_text("<html></html>")  # fortify compare of two of its runs
    check_sweep_directory(tmp_path)  # no error


@pytest.mark.parametrize("same_data", [True, False])
def test_a_finished_run_of_data_since_changed_stops_the_sweep_and_one_of_the_same_data_is_kept(
        tmp_path, monkeypatch, same_data):
    from fortify.pipeline import prepare

    # Prepare: a finished run whose model card records the data's hash, or another one
    base = load_config(None, TINY)
    spec = expand_grid(SweepGrid(objective=["standard"]), base)[0]
    run_dir = _fake_finished_run(tmp_path / "out", spec, base)
    (run_dir / "config.yaml").write_text(spec.config(base).to_yaml())
    recorded = prepare(spec.config(base), "cpu").dataset.sha256() if same_data else "0" * 64
    (run_dir / "model.json").write_text(json.dumps({"data_sha256": recorded}))
    monkeypatch.setattr(sweep_module, "train_model", _no_run)
    monkeypatch.setattr(sweep_module, "write_outputs", lambda *args: None)
    # Execute / Assert
    def sweep():
        return run_sweep(base, SweepGrid(objective=["standard"]), tmp_path / "out", device="cpu",
                         show_progress=False)

    if same_data:
        assert [r.status for r in sweep()] == ["skipped"]
    else:
        with pytest.raises(ConfigError, match="the data 'digits' differ from those .* was trained on"):
            sweep()


def test_a_cascades_columns_in_sweep_csv_say_cascade(tmp_path):
    # a cascade's accuracy is cumulative; its csv column read like the attack's own accuracy
    base = load_config(None, {**TINY, "eval": {**TINY["eval"], "attacks": ["fgsm", "pgd"], "cascade": True}})
    out = tmp_path / "sweep"
    run_sweep(base, SweepGrid(objective=["standard"]), out, device="cpu", show_progress=False)
    with open(out / "sweep.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert {"acc_fgsm (cascade)", "acc_pgd-2 (cascade)"} <= set(row)
    assert row["acc_pgd-2 (cascade)"] == row["robust_accuracy"]
