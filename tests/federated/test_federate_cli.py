"""``fortify federate``: Flower's simulation end to end, and bad input refused before it starts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fortify.cli import app
from fortify.config import load_config
from fortify.federated import command
from fortify.pipeline import prepare

runner = CliRunner()


def _federate(*args):
    return runner.invoke(app, ["federate", *[str(a) for a in args]])


@pytest.mark.slow
def test_simulation_trains_a_global_model_that_improves(tmp_path, monkeypatch):
    out = tmp_path / "fed"
    settings = ("--clients", 2, "--workers", 1, "--rounds", 2, "--local-epochs", 2, "--objective", "pgd",
                "--attack-steps", 2, "--model", "mlp", "--eps", 0.1, "--eval-examples", 200,
                "--eval-steps", 5, "--out", out)
    result = _federate(*settings)
    assert result.exit_code == 0, result.output
    # a finished run resumed is read back, not simulated again
    monkeypatch.setattr(command, "run_simulation", lambda *a, **k: pytest.fail("simulated again"))
    again = _federate(*settings, "--resume")
    assert again.exit_code == 0 and result.output.splitlines()[-1] in again.output, again.output
    record = json.loads((out / "federated.json").read_text())
    clean = [r["clean_accuracy"] for r in record["rounds"]]
    robust = [r["robust_accuracy"] for r in record["rounds"]]
    assert len(clean) == 3
    assert clean[-1] > clean[0] + 0.2
    assert all(0 <= r <= c for r, c in zip(robust, clean))
    assert record["threat"] == {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0], "attack": "pgd",
                                "steps": 5, "restarts": 1, "n_examples": 200}
    assert "local-robust-accuracy" in record["train_metrics"]["1"]  # clients trained adversarially
    assert (out / "model.safetensors").is_file()
    # the card records the data as fortify evaluate loads them, so evaluating the model passes the check
    card = json.loads((out / "model.json").read_text())
    assert card["data_sha256"] == prepare(load_config(out / "config.yaml")).dataset.sha256()
    evaluated = runner.invoke(app, ["evaluate", str(out), "--attacks", "fgsm", "--n-examples", "20"])
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.parametrize(("args", "message"), [
    (["--rounds", 0], "federation.rounds"),
    (["--clients", 5000], "5000 clients need"),
    (["--strategy", "fedsgd"], "federation.strategy"),
    (["--objective", "pgdd"], "valid names"),
    (["--malicious-clients", 4], "malicious_clients must be below"),
    # what each client on Ray would otherwise find, with one traceback per client
    (["--strategy", "krum", "--malicious-clients", 1], "needs at least 5 clients (n >= 2f + 3), got 4"),
    (["--strategy", "trimmed-mean", "--clients", 3], "use at least 4 clients"),
    (["--partition", "dirichlet", "--alpha", 0.01, "--clients", 50], "no Dirichlet(alpha=0.01) partition"),
    (["--dp", "--noise-multiplier", 1.0, "--model", "preact-resnet18"], "a model without BatchNorm"),
    (["--dp", "--noise-multiplier", 1.0, "--model", "mlp", "--delta", 0.01],
     "(the largest of the 4 client shards); lower --delta"),
    # infinite values passed and failed later, some after a round: a Dirichlet partition "to raise
    # alpha", a NaN training loss, an update refused as non-finite
    (["--partition", "dirichlet", "--alpha", "inf"], "federation.alpha"),
    (["--strategy", "fedprox", "--proximal-mu", "inf"], "federation.proximal_mu"),
    (["--malicious-clients", 1, "--malicious-mode", "scale", "--malicious-scale", "inf"],
     "federation.malicious_scale"),
])
def test_bad_settings_exit_2_with_a_one_line_reason(tmp_path, args, message):
    result = _federate(*args, "--out", tmp_path / "fed")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1, result.output  # not one traceback per client
    assert not (tmp_path / "fed").exists()  # refused before anything was written


def test_resume_needs_the_run_directory_and_a_full_directory_needs_resume(tmp_path):
    missing_out = _federate("--resume")
    assert missing_out.exit_code == 2 and "--resume needs --out" in missing_out.output
    typo = _federate("--resume", "--out", tmp_path / "no-such-run")
    assert typo.exit_code == 2 and "does not exist" in typo.output
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "notes.txt").write_text("x")
    full = _federate("--out", tmp_path / "fed")
    assert full.exit_code == 2 and "pass --resume to continue" in full.output
    # a directory of something else (a trained model, notes) is not continued, so not overwritten
    unrelated = _federate("--out", tmp_path / "fed", "--resume")
    assert unrelated.exit_code == 2 and "holds no federation-progress.json" in unrelated.output
    assert not (tmp_path / "fed" / "config.yaml").exists()


def test_the_accountant_flag_reaches_the_clients_and_needs_dp(tmp_path):
    app_dir = tmp_path / "app"
    result = _federate("--dp", "--noise-multiplier", 1.0, "--model", "mlp", "--accountant", "rdp",
                       "--write-app", app_dir, "--out", tmp_path / "fed")
    assert result.exit_code == 0, result.output
    assert '"dp.accountant" = "rdp"' in (app_dir / "pyproject.toml").read_text()
    alone = _federate("--accountant", "rdp", "--out", tmp_path / "fed2")
    assert alone.exit_code == 2 and "--accountant only applies to DP training" in alone.output


def test_trim_beta_and_partition_seed_flags_reach_the_run(tmp_path):
    # 3 clients trim nobody at the default 0.25; --trim-beta 0.4 trims one at each end
    app_dir = tmp_path / "app"
    result = _federate("--strategy", "trimmed-mean", "--clients", 3, "--trim-beta", 0.4,
                       "--partition-seed", 7, "--write-app", app_dir, "--out", tmp_path / "fed")
    assert result.exit_code == 0, result.output
    config = (app_dir / "pyproject.toml").read_text()
    assert '"federation.trim_beta" = 0.4' in config and '"federation.partition_seed" = 7' in config


def _submit_and_fail(monkeypatch, submit) -> None:
    """``fortify federate --superlink`` with Flower's submission replaced by ``submit``."""
    monkeypatch.setattr(command, "wait_for_superlink", lambda address, timeout=10.0: None)
    monkeypatch.setattr(command, "submit", submit)


def test_a_run_that_failed_on_the_superlink_names_the_servers_error(tmp_path, monkeypatch):
    # `flwr run --stream` exits 0 when the ServerApp raises; its log holds the cause, which used to be
    # replaced by advice about shared file systems
    log = ("INFO : Starting run\nERROR : ServerApp raised\nTraceback (most recent call last):\n"
           "fortify.federated.server.FederationError: round 1: partition 1 was trained by no node\n")
    _submit_and_fail(monkeypatch, lambda app_dir, address, timeout=10.0: log)
    result = _federate("--superlink", "127.0.0.1:9093", "--clients", 2, "--rounds", 1, "--model", "mlp",
                       "--out", tmp_path / "fed")
    assert result.exit_code == 2, result.output
    assert "the run on the SuperLink failed: FederationError: round 1: partition 1 was trained by no node" \
        in " ".join(result.output.split())
    # and without an error in the log, the file system the two must share
    _submit_and_fail(monkeypatch, lambda app_dir, address, timeout=10.0: "INFO : run finished\n")
    result = _federate("--superlink", "127.0.0.1:9093", "--clients", 2, "--rounds", 1, "--model", "mlp",
                       "--out", tmp_path / "fed")
    assert result.exit_code == 2 and "so it must share this file system" in " ".join(result.output.split())


def test_a_failed_submission_leaves_out_as_it_was_for_the_same_command(tmp_path, monkeypatch):
    # the Flower app written into --out before the submission failed made the same command refuse the
    # folder as "not empty", and --resume refuse it as holding no federation
    def refused(app_dir, address, timeout=10.0):
        raise command.FederationError("`flwr run` failed (exit 1): connection reset")

    _submit_and_fail(monkeypatch, refused)
    args = ("--superlink", "127.0.0.1:9093", "--clients", 2, "--rounds", 1, "--model", "mlp",
            "--out", tmp_path / "fed")
    for _ in range(2):
        result = _federate(*args)
        assert result.exit_code == 2 and "connection reset" in result.output, result.output
        assert not (tmp_path / "fed").exists() or not any((tmp_path / "fed").iterdir())


def test_a_run_that_failed_on_the_superlink_after_saving_a_round_keeps_it_for_resume(tmp_path, monkeypatch):
    # the rounds the ServerApp saved before it failed are what --resume continues from
    from fortify.federated.progress import PROGRESS_JSON

    def saved_a_round_then_failed(app_dir, address, timeout=10.0):
        (app_dir.parent / PROGRESS_JSON).write_text("{}")
        return "FederationError: round 2: every client failed\n"

    _submit_and_fail(monkeypatch, saved_a_round_then_failed)
    result = _federate("--superlink", "127.0.0.1:9093", "--clients", 2, "--rounds", 3, "--model", "mlp",
                       "--out", tmp_path / "fed")
    assert result.exit_code == 2 and "round 2: every client failed" in result.output
    assert (tmp_path / "fed" / PROGRESS_JSON).is_file() and (tmp_path / "fed" / "flower-app").is_dir()


def test_without_out_the_run_directory_is_named_after_the_dataset_of_the_config_file(tmp_path, monkeypatch):
    # it said "digits" whatever the config file named
    seen = []

    def interrupted(config, overrides, federation, **kwargs):
        seen.append(kwargs["out"])
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "federate", interrupted)
    config = tmp_path / "fed.yaml"
    config.write_text("data: {name: breast-cancer}\n")
    monkeypatch.chdir(tmp_path)
    result = _federate("-c", config)
    assert result.exit_code == 130
    assert str(seen[0]).startswith("runs/breast-cancer-federated-")
    assert f"--resume --out {seen[0]} " in " ".join(result.output.split())
