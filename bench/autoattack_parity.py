"""Strength parity of fortify's ``autoattack`` preset with pyautoattack's standard version.

Trains the small CNN that the tests use (PGD-trained on digits at L-inf eps 0.2, 10 epochs), then,
for each budget and seed, runs both cascades (APGD-CE, APGD-T, FAB-T, Square) on the whole digits
test split with the same reduced budget on both sides, and prints each side's robust accuracy
after every attack. Strength only: bench/attack_suite.py times the two ensembles.
``--square-schedule autoattack`` gives fortify's Square the window schedule of pyautoattack's
standard ensemble (laid out for 10,000 queries, not rescaled to the budget); by default it is
rescaled, as the preset does.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from _common import print_provenance
from fortify.config import EvalConfig, TrainConfig
from fortify.data import load_dataset
from fortify.evaluation import evaluate
from fortify.models import build_model
from fortify.pipeline import build_attacks
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}


def test_fixture_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The ``robust_model`` fixture of tests/conftest.py, rebuilt with the same recipe and seed."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small-cnn", data.input_shape, data.num_classes)
    threat = ThreatModel("linf", 0.2)
    config = TrainConfig(objective="pgd", epochs=10, early_stopping=False, attack_steps=5)
    Trainer(model, build_objective("pgd", ObjectiveOptions(threat, attack_steps=5)), config,
            threat=threat, show_progress=False).fit(data.train, data.val)
    return model.eval(), data.test.x, data.test.y


class _Trace(logging.Handler):
    """Collects the reference's 'robust accuracy after X' lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("robust accuracy after"):
            self.lines.append(message.split(":")[1].split("(")[0].strip())


def reference(model, x, y, threat: ThreatModel, iterations: int, queries: int, seed: int) -> list[str]:
    import pyautoattack

    attack = pyautoattack.AutoAttack(model, eps=threat.eps, norm=REFERENCE_NORMS[threat.norm], seed=seed,
                                     version="standard")
    attack.apgd.n_iter = attack.apgd_targeted.n_iter = attack.fab.n_iter = iterations
    attack.square.n_queries = queries
    trace = _Trace()
    attack.logger.addHandler(trace)
    attack.logger.setLevel(logging.DEBUG)
    attack.run_standard_evaluation(x, y, batch_size=len(y))
    attack.logger.removeHandler(trace)
    return trace.lines


def ours(model, x, y, threat: ThreatModel, iterations: int, queries: int, seed: int,
         rescale_schedule: bool) -> list[str]:
    config = EvalConfig(preset="autoattack", steps=iterations, queries=queries, seed=seed,
                        attack_options={"square": {"rescale_schedule": rescale_schedule}})
    attacks = build_attacks(config, threat, num_classes=10)
    report = evaluate(model, x, y, attacks, threat, cascade=True, batch_size=len(y))
    return [f"{100 * a.adversarial_accuracy:.2f}%" for a in report.attacks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="linf", choices=list(REFERENCE_NORMS))
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--iterations", default="20", help="comma-separated APGD/FAB iteration budgets")
    parser.add_argument("--queries", type=int, default=300, help="Square's query budget")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--square-schedule", choices=("rescaled", "autoattack"), default="rescaled",
                        help="fortify's Square: its window schedule rescaled to the budget (the preset's), "
                             "or laid out for 10,000 queries as in pyautoattack's standard ensemble")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_provenance([("pyautoattack", "pyautoattack")])
    model, x, y = test_fixture_model()
    threat = ThreatModel(args.norm, args.eps)
    print(f"setting:  small-cnn PGD-trained on digits, {len(y)} test examples, {threat.describe()}, "
          f"Square {args.queries} queries (fortify's schedule: {args.square_schedule}), APGD-T and FAB-T 9 "
          "targets, 1 restart")
    print("iterations | seed | fortify after apgd-ce, apgd-t, fab-t, square | pyautoattack after the same")
    for iterations in (int(i) for i in args.iterations.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            started = time.perf_counter()
            mine = ours(model, x, y, threat, iterations, args.queries, seed,
                        rescale_schedule=args.square_schedule == "rescaled")
            theirs = reference(model, x, y, threat, iterations, args.queries, seed)
            print(f"{iterations} | {seed} | {', '.join(mine)} | {', '.join(theirs)} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
