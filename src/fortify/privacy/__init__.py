"""Privacy audits: membership inference, model inversion and reconstruction from gradients."""

from fortify.privacy.audit import (
    ATTACK_NAMES,
    DEFAULT_ATTACKS,
    PrivacyReport,
    audit,
    audit_trained_model,
    remove_overlap,
)
from fortify.privacy.inversion import InversionReport, evaluate_inversion, invert_classes, model_inversion
from fortify.privacy.label_only import (
    augmentation_attack,
    augmentation_scores,
    boundary_distance_attack,
    hopskipjump_boundary_distance,
    pgd_boundary_distance,
    random_direction_distance,
)
from fortify.privacy.lira import (
    SINGLE_QUERY,
    LiraQueries,
    ReferenceModels,
    lira_attack,
    lira_member_scores,
    train_reference_models,
)
from fortify.privacy.membership import membership_scores, shadow_attack, threshold_attack
from fortify.privacy.metrics import MembershipResult, membership_result
from fortify.privacy.recipe import TrainerRecipe, TrainRecipe
from fortify.privacy.reconstruction import (
    GradientReconstruction,
    ReconstructionReport,
    gradient_leakage,
    infer_labels,
    leakage_sweep,
    reconstruct,
    reconstruction_quality,
    shared_gradient,
)

__all__ = [
    "ATTACK_NAMES", "DEFAULT_ATTACKS", "GradientReconstruction", "InversionReport", "LiraQueries",
    "MembershipResult", "SINGLE_QUERY",
    "PrivacyReport", "ReconstructionReport", "ReferenceModels", "TrainRecipe", "TrainerRecipe", "audit",
    "audit_trained_model", "augmentation_attack", "augmentation_scores", "boundary_distance_attack",
    "evaluate_inversion", "gradient_leakage", "infer_labels", "invert_classes", "leakage_sweep",
    "lira_attack", "lira_member_scores", "membership_result", "membership_scores", "model_inversion",
    "hopskipjump_boundary_distance", "pgd_boundary_distance", "random_direction_distance", "reconstruct",
    "reconstruction_quality",
    "remove_overlap", "shadow_attack", "shared_gradient", "threshold_attack", "train_reference_models",
]
