"""Evaluation: robustness reports computed from attacks under a threat model."""

from fortify.evaluation.robustness import AttackResult, RobustnessReport, evaluate

__all__ = ["AttackResult", "RobustnessReport", "evaluate"]
