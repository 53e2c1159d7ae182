"""Evaluation: robustness reports, metrics, the gradient-masking verdict and certification."""

from fortify.evaluation.certify import Certificate, certified_accuracy_curve, certify, predict
from fortify.evaluation.masking import MaskingConfig, MaskingVerdict, masking_verdict
from fortify.evaluation.metrics import adversarial_metrics, robustness_score
from fortify.evaluation.robustness import AttackResult, RobustnessReport, evaluate

__all__ = ["AttackResult", "Certificate", "MaskingConfig", "MaskingVerdict", "RobustnessReport",
           "adversarial_metrics", "certified_accuracy_curve", "certify", "evaluate", "masking_verdict",
           "predict", "robustness_score"]
