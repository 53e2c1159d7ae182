"""The benchmarks' own logic: the order contenders run in, the check of returned points, the
rank-by-rank strength verdict, and one small run of the attack benchmark end to end.

The benchmarks are run by hand (bench/README.md), but the performance claims in docs/PERFORMANCE.md
rest on what they print, so what decides a ratio or a verdict is tested here.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import attack_suite  # noqa: E402
import attack_throughput  # noqa: E402
import gpu_fast_at  # noqa: E402
import hsj_precision  # noqa: E402
from _common import ForwardCounter, Setting, package_version, repeat_order  # noqa: E402
from fortify.threat import ThreatModel  # noqa: E402
from fortify.training.step_graph import StepGraph  # noqa: E402

LINF = ThreatModel("linf", 0.1)


def test_each_repeat_runs_every_contender_once_in_an_order_its_seed_fixes():
    rows = list("abcdefgh")
    orders = [repeat_order(rows, r, seed=0) for r in range(5)]
    assert all(sorted(order) == rows for order in orders)
    assert orders == [repeat_order(rows, r, seed=0) for r in range(5)]
    assert orders != [repeat_order(rows, r, seed=1) for r in range(5)]
    assert rows == list("abcdefgh"), "the caller's list is left as it was"


def test_no_contender_keeps_the_same_predecessor_in_every_repeat():
    # a rotation by one keeps every predecessor; the permutations must not
    rows = list("abcdefgh")
    predecessors = {row: set() for row in rows}
    for r in range(5):
        order = repeat_order(rows, r, seed=0)
        for before, row in zip([None, *order], order, strict=False):
            predecessors[row].add(before)
    assert all(len(seen) > 1 for seen in predecessors.values())


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
            self.layer.bias.copy_(torch.tensor([-0.5, 0.5]))  # class 0 where feature 0 exceeds 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1))


def _setting() -> Setting:
    x = torch.full((5, 4), 0.5)
    x[:, 0] = torch.tensor([0.52, 0.6, 0.7, 0.8, 0.3])  # class 0 for the first four, 1 for the last
    return Setting("linear", _Linear().eval(), x, torch.zeros(5, dtype=torch.long))


def _measured(points: torch.Tensor, norm: str | None) -> attack_suite.Contender:
    setting = _setting()
    row = attack_suite.Contender("group", "peer", lambda x, y: attack_suite.Outcome(x_adv=points), norm=norm)
    args = type("Args", (), {"batch": 8})()
    attack_suite.measure(row, setting, ForwardCounter(setting.model), LINF, args)
    return row


def test_a_point_outside_the_box_or_ball_is_counted_and_not_credited_as_a_success():
    # every point is misclassified (feature 0 at 0.45); the first lies 0.07 from its example, the
    # others 0.15 to 0.35, and the third also leaves the box; the last example is wrong unattacked
    points = _setting().x.clone()
    points[:, 0] = 0.45
    points[2, 1] = 1.2
    bounded = _measured(points, norm=None)  # the L-inf ball of 0.1 holds the first alone
    # the first is fooled; the four outside keep their clean outcome: right three times, then wrong
    assert bounded.outside == 4 and bounded.robust == [pytest.approx(0.6)]
    minimal = _measured(points, norm="l2")  # the box alone: the third outside, the rest fooled
    assert minimal.outside == 1
    assert minimal.robust == [pytest.approx(0.2)] and minimal.success == [0.75]
    assert torch.isinf(minimal.norm_runs[0]).sum() == 1


def _norm_row(library: str, runs: list[list[float]]) -> attack_suite.Contender:
    row = attack_suite.Contender("C&W", library, lambda x, y: attack_suite.Outcome(), norm="l2")
    row.seconds = [1.0]
    row.norm_runs = [torch.tensor(sorted(run)) for run in runs]
    return row


def test_the_verdict_takes_fortifys_weakest_repeat_and_the_peers_strongest(capsys):
    ours = _norm_row("fortify", [[0.50, 0.60], [0.50, 0.70]])  # its second repeat is weaker at rank 2
    theirs = _norm_row("peer", [[0.52, 0.65], [0.55, 0.80]])  # its first repeat is the stronger
    attack_suite.print_dominance([ours, theirs])
    # at rank 2: fortify's worst 0.70 against the peer's best 0.65, beyond the 1% slack
    assert "weaker: 1 of 2 sorted norms larger (by up to 7.7%)" in capsys.readouterr().out
    attack_suite.print_dominance([_norm_row("fortify", [[0.50, 0.60]]), theirs])
    assert "at least as strong at every l2 radius" in capsys.readouterr().out


@pytest.mark.slow
def test_the_attack_benchmark_prints_each_rows_time_over_fortifys_fastest(capsys):
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():  # the bench seeds and sets threads for its whole process
            attack_throughput.main(["--threads", "1", "--repeats", "5", "--batch", "32", "--examples", "32",
                                    "--steps", "1", "--train-epochs", "1", "--no-art", "--channels-last"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| PGD-1 |")]
    header = next(line for line in out.splitlines() if line.startswith("| attack |")).split(" | ")
    fastest = header.index("time / fastest fortify")
    libraries = [row[1] for row in rows]
    assert "torchattacks channels_last" in " ".join(libraries), "every peer also on fortify's kernels"
    ratios = [float(row[fastest]) for row in rows if row[1].startswith("fortify")]
    assert min(ratios) == 1.0
    assert "warning: points outside the threat model" not in out


def test_the_gpu_bench_leaves_out_step_graph_variants_off_cuda_and_refuses_only_those(capsys):
    args = gpu_fast_at.parse_args(["--device", "cpu"])
    assert "bf16-cl-step-graph" not in args.step_variants.split(",")
    assert args.recipe_variants.split(",")[-1] == "bf16-cl-cudagraphs"  # the rest kept, in order
    assert "skipped on cpu: bf16-cl-step-graph" in capsys.readouterr().out
    assert "bf16-cl-step-graph" in gpu_fast_at.parse_args([]).step_variants  # cuda by default
    with pytest.raises(SystemExit):
        gpu_fast_at.parse_args(["--device", "cpu", "--recipe-variants", "bf16-cl-step-graph"])
    assert "need a CUDA device" in capsys.readouterr().err


def test_a_peers_version_is_read_without_importing_it():
    # importing ART reconfigures logging, which closed another library's handler and with it the
    # stream that handler wrote to (pytest's captured stderr, when keras had brought absl in first)
    installed = importlib.metadata.version("torch")
    assert package_version("no_module_of_this_name", "torch") == f"torch {installed}"
    assert package_version("no_module_of_this_name") == "no_module_of_this_name not installed"


def test_the_gpu_bench_replays_the_step_as_the_trainer_does(monkeypatch):
    # the step graph needs a CUDA stream to be built; on CPU a stand-in for it is enough to check that
    # the bench builds it with the arguments the Trainer gives it
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    config = gpu_fast_at.step_config(gpu_fast_at.VARIANTS["fp32"], batch=8)
    trainer = gpu_fast_at.trainer_for(gpu_fast_at.VARIANTS["fp32"], config, torch.device("cpu"))
    graph = gpu_fast_at.step_for(gpu_fast_at.VARIANTS["bf16-cl-step-graph"], trainer, 8)
    assert isinstance(graph, StepGraph) and graph.batch_size == 8 and graph.optimizer is trainer.optimizer
    assert gpu_fast_at.step_for(gpu_fast_at.VARIANTS["bf16-cl"], trainer, 8) == trainer._train_step


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_hopskipjump_precision_bench_measures_against_the_exact_distance(norm):
    # its verdicts are ratios over the closed form: stepping that far against the weight difference
    # (its sign under L-inf, its direction under L2) must land on the boundary
    model, x, y = hsj_precision.linear_setting((1, 4, 4), 3, seed=0)
    exact = hsj_precision.exact_distance(model, x, y, norm)
    layer = model[1].double()
    difference = (layer.weight[y] - layer.weight[1 - y]).detach()
    step = difference.sign() if norm == "linf" else difference / difference.norm(dim=1, keepdim=True)
    on_boundary = x.double().flatten(1) - exact[:, None] * step
    logits = layer(on_boundary).detach()
    torch.testing.assert_close(logits[:, 0], logits[:, 1], rtol=0, atol=1e-12)
    assert (exact > 0).all() and (on_boundary >= 0).all() and (on_boundary <= 1).all()  # box not binding
