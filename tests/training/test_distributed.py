"""Data-parallel training and sharded evaluation: real torchrun processes, 2 ranks, gloo on CPU.

The worker (``_ddp_worker.py``) does the distributed side; this process computes the single-process
reference and compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fortify.cli import app
from fortify.errors import ConfigError
from fortify.evaluation import evaluate
from fortify.training import checkpoint as ckpt
from fortify.training import distributed

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as worker  # noqa: E402

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _rank_errors(stderr: str) -> str:
    """What a failed launch says about its ranks: their tracebacks first, then torchrun's summary."""
    start = stderr.find("Traceback")
    return (stderr[start:start + 4000] + "\n...\n" if start >= 0 else "") + stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Training, sharded evaluation, then a run in which rank 1 dies (so the launch fails)."""
    out = tmp_path_factory.mktemp("ddp")
    return out, _torchrun(str(WORKER), "train-eval-crash", str(out))


@pytest.fixture(scope="module")
def finished_run(two_rank_run: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    out, launch = two_rank_run
    assert (out / "sharded.json").is_file(), launch.stderr[-3000:]
    return out


# -- local pieces (no processes) ---------------------------------------------------------------

@pytest.mark.parametrize("total", [1, 2, 7, 32])
def test_local_batches_cover_the_global_batch_and_weights_restore_its_mean(total):
    # Prepare: a global batch of `total` examples split over 3 ranks
    x, y = torch.arange(total, dtype=torch.float32)[:, None], torch.arange(total)
    world = 3
    slices = [next(distributed.DistributedContext(r, world, r, torch.device("cpu"))
                   .local_batches(iter([(x, y)]))) for r in range(world)]
    # Assert: real examples are the batch, once each
    real = torch.cat([s.y[:s.count] for s in slices])
    assert torch.equal(real.sort().values, y)
    # Assert: DDP's mean over ranks of weight * (slice mean) is the global mean, for any values
    values = torch.rand(total)
    ddp = sum(s.weight * float(values[s.y].mean()) for s in slices) / world
    assert ddp == pytest.approx(float(values.mean()), rel=1e-6)


def test_each_rank_gets_its_share_of_the_extra_examples_at_the_end_of_a_batch():
    # Prepare: a global batch of 48 real examples (label 0) and 16 extra ones appended (label 1), as
    # ExtraDataMixer builds it for train.extra_fraction 0.25
    x = torch.rand(64, 3)
    y = torch.cat([torch.zeros(48, dtype=torch.long), torch.ones(16, dtype=torch.long)])
    # Execute
    shares = [next(distributed.DistributedContext(r, 2, r, torch.device("cpu")).local_batches(iter([(x, y)])))
              for r in range(2)]
    # Assert: a quarter of each rank's 32 examples is extra, not all 16 on rank 1
    assert [int(s.y.sum()) for s in shares] == [8, 8]
    assert [s.count for s in shares] == [32, 32] and [s.weight for s in shares] == [1.0, 1.0]


def test_batch_seed_keeps_the_attack_seed_for_the_first_batch_and_varies_after():
    seeds = [distributed.batch_seed(7, n) for n in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4


def test_without_option_drops_the_flag_and_its_value_in_both_spellings():
    argv = ["train", "--nproc", "2", "--epochs", "3", "--nproc=4", "-q"]
    assert distributed.without_option(argv, "--nproc") == ["train", "--epochs", "3", "-q"]


def test_nproc_below_one_is_a_clean_cli_error():
    result = CliRunner().invoke(app, ["train", "--nproc", "0", "--out", "unused"])
    assert result.exit_code == 2, result.output
    assert "--nproc must be >= 1, got 0" in result.output and isinstance(result.exception, SystemExit)


def test_nproc_with_dp_is_refused_before_any_rank_starts(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(distributed, "launch", lambda *args: started.append(args) or 0)
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--dp", "--noise-multiplier", "1",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "--dp cannot be combined with --nproc" in result.output and not started


@pytest.mark.slow
def test_a_rank_error_under_nproc_is_one_line_per_rank_and_the_exit_code(tmp_path):
    # Prepare: data that every rank fails to load (the launching process does not load it)
    missing = tmp_path / "missing.npz"
    command = [sys.executable, "-m", "fortify", "train", "--nproc", "2", "--epochs", "1", "-q",
               "--dataset", "npz", "--data", str(missing), "--out", str(tmp_path / "run")]
    # Act
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Assert: the ranks' own message, the rank's exit code, no launcher traceback
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(f"npz data file '{missing}' does not exist") == 2, done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr


def test_under_nproc_a_directory_no_rank_could_use_is_refused_once_before_any_starts(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(distributed, "launch", lambda *args: started.append(args) or 0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and result.output.count("already exists and is not empty") == 1
    assert not started
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--resume"])
    assert result.exit_code == 2 and "--resume needs --out" in result.output and not started


def test_under_nproc_without_out_every_rank_gets_the_directory_chosen_once(monkeypatch, tmp_path):
    # each rank used to stop with "under torchrun pass --out", a flag of torchrun's the user never used
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv: launched.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["fortify", "train", "--nproc", "2", "--epochs", "1"])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    chosen = result.output.split("run directory:")[1].split()[0]
    assert launched == [["train", "--epochs", "1", "--out", chosen]] and chosen.startswith("runs/digits-pgd-")


def test_under_torchrun_train_needs_an_out_directory(monkeypatch):
    # Prepare: the environment torchrun gives a 1-process group
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    try:
        result = CliRunner().invoke(app, ["train", "--dataset", "digits", "--device", "cpu"])
    finally:
        distributed.leave()
    assert result.exit_code == 2, result.output
    assert "under torchrun pass --out" in result.output and isinstance(result.exception, SystemExit)


def test_sharded_evaluation_refuses_a_journal(tmp_path):
    model, (_, _, test) = worker.new_mlp(), worker.data()
    context = distributed.DistributedContext(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match="keeps no journal"):
        evaluate(model, test.x, test.y, worker.attacks(), worker.THREAT, journal_dir=tmp_path,
                 shard=context)


# -- two ranks ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_with_half_batches_match_one_process_with_the_whole_batch(finished_run):
    # Prepare: the same standard training in this process, batch 64
    reference = worker.fit("standard", None, None).state_dict()
    # Execute: the 2-rank run (32 examples per rank; the last global batch has 1 example)
    trained = _weights(finished_run / "standard" / "model.safetensors")
    # Assert: equal up to float summation order
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-6)
    history = json.loads((finished_run / "standard" / ckpt.STATE_JSON).read_text())
    assert len(history["progress"]["history"]) == 3


@pytest.mark.slow
def test_awp_on_two_ranks_with_half_batches_matches_one_process_with_the_whole_batch(finished_run):
    # Prepare: the same AWP training in this process, and the same without the weight perturbation
    reference = worker.fit_awp(None, None).state_dict()
    unperturbed = worker.fit_awp(None, None, gamma=0.0).state_dict()
    # Execute: the 2-rank run, where each rank's share gives the perturbation's gradient only in part
    trained = _weights(finished_run / "awp" / "model.safetensors")
    # Assert: every rank perturbed by the gradient of the whole global batch, short batches included,
    # so the weights are one process's up to float summation order; the perturbation moved them far
    # more than that, so a rank perturbing by its own share's gradient would show
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-6)
    assert max(float((reference[n] - unperturbed[n]).abs().max()) for n in reference) > 1e-3


@pytest.mark.slow
def test_only_rank_zero_writes_checkpoints(finished_run):
    rank0 = json.loads((finished_run / "writes-rank0.json").read_text())
    rank1 = json.loads((finished_run / "writes-rank1.json").read_text())
    assert rank1 == []
    assert rank0.count("write_state_json") == 4  # 3 epochs + the finished state
    assert (finished_run / "standard" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sharded_evaluation_equals_the_single_process_report(finished_run):
    # Prepare: the trained weights and the same evaluation in one process
    model = worker.new_mlp()
    model.load_state_dict(_weights(finished_run / "standard" / "model.safetensors"))
    _, _, test = worker.data()
    single = evaluate(model.eval(), test.x, test.y, worker.attacks(), worker.THREAT, batch_size=16,
                      eps_grid=[0.05, 0.1])
    sharded = json.loads((finished_run / "sharded.json").read_text())
    # Assert: the evaluation spans several batches and the attacks flip examples
    assert sum(single.clean_correct) > 2 * 16
    assert single.worst_case_accuracy < single.clean_accuracy
    # Assert: per-example outcomes, norms and summaries are identical
    assert sharded == json.loads(json.dumps(single.to_dict()))


@pytest.mark.slow
def test_sharded_robust_validation_equals_the_single_process_numbers(finished_run):
    # Prepare: the trained weights, validated by a pgd Trainer in this process, in batches of 64
    model = worker.new_mlp()
    model.load_state_dict(_weights(finished_run / "standard" / "model.safetensors"))
    _, val, _ = worker.data()
    # Execute
    clean, robust = worker.validation_trainer(model, None)._validate(val)
    sharded = json.loads((finished_run / "validation.json").read_text())
    # Assert: three batches (rank 0 took two, rank 1 one), each from the random starts it meets in one
    # process; the attack flips examples, so the random starts matter
    assert len(val) == 180 and robust < clean
    assert sharded == {"clean": clean, "robust": robust}


@pytest.mark.slow
def test_a_run_whose_rank_dies_resumes_to_the_uninterrupted_weights(two_rank_run):
    out, crashed = two_rank_run
    # Assert: rank 1 died after epoch 1 (exit code 3); torchrun stopped rank 0 and failed
    assert crashed.returncode != 0
    assert "exitcode  : 3" in crashed.stderr, crashed.stderr[-3000:]
    state = json.loads((out / "fgsm-resumed" / ckpt.STATE_JSON).read_text())
    assert state["progress"]["epoch"] == 1 and not state["finished"]
    # Execute: resume with both ranks, then the same run uninterrupted
    resumed = _torchrun(str(WORKER), "resume", str(out))
    assert resumed.returncode == 0, _rank_errors(resumed.stderr)
    # Assert: bit-equal to the run that was never interrupted (random starts and BatchNorm
    # statistics included; each rank's statistics used to be its own, so rank 1 crafted other
    # examples after the resume), with the same validation numbers
    full = _weights(out / "fgsm-full" / "model.safetensors")
    again = _weights(out / "fgsm-resumed" / "model.safetensors")
    assert any("running_mean" in name for name in full)
    assert all(torch.equal(full[name], again[name]) for name in full)
    full_history, resumed_history = (
        [{k: v for k, v in record.items() if k != "seconds"}
         for record in json.loads((out / run / ckpt.STATE_JSON).read_text())["progress"]["history"]]
        for run in ("fgsm-full", "fgsm-resumed"))
    assert full_history == resumed_history
    # the best epoch came after the resume, so every rank reloaded a best.safetensors written since
    # (rank 1 used to check it against the hash that state.json held at the resume, and fail)
    assert json.loads((out / "fgsm-resumed" / ckpt.STATE_JSON).read_text())["progress"]["best_epoch"] > 1
    # Free AT too, whose perturbation each rank carries over its own shares (rank 1 used to resume with
    # rank 0's, the one checkpoint held)
    free_full, free_again = (_weights(out / run / "model.safetensors")
                             for run in ("free-full", "free-resumed"))
    assert all(torch.equal(free_full[name], free_again[name]) for name in free_full)


def test_ranks_reseed_apart_from_the_largest_training_seed():
    """train.seed may be up to 2**63 - 1; each rank's mixed seed must still be one torch takes, and
    differ between ranks and epochs."""
    class RecordedState:
        def set_rng_state(self, state, device):
            self.state = state

    drawn = {}
    for rank, epoch in [(0, 0), (1, 0), (0, 1)]:
        recorder = RecordedState()
        distributed.DistributedContext(rank, 2, rank, torch.device("cpu")).reseed(recorder, 2**63 - 1, epoch)
        drawn[rank, epoch] = (recorder.state, torch.rand(4))
    assert not torch.equal(drawn[0, 0][0], drawn[1, 0][0])
    assert not torch.equal(drawn[0, 0][0], drawn[0, 1][0])
    assert not torch.equal(drawn[0, 0][1], drawn[1, 0][1])


def test_under_torchrun_evaluating_a_model_file_is_refused(monkeypatch, tmp_path):
    # its ranks would each attack every example and write the same journal and results
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "model.onnx"),
                                      "--dataset", "digits", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "sharded evaluation under torchrun takes a model directory" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
