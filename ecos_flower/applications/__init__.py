"""What the cloud does with a selected proxy set, and DP fine-tuning on the client (pure
numpy/torch, no Flower): semi-supervised label outsourcing, distillation, private-kNN labelling
and DP last-layer fine-tuning. The Flower glue is in `ecos_flower.flower.applications`."""

from ecos_flower.applications.distill import distill, train_teacher
from ecos_flower.applications.finetune import FinetuneResult, dp_finetune_head, head_features
from ecos_flower.applications.private_knn import (
    KNN_MODES,
    aggregate_votes,
    knn_sensitivity,
    knn_votes,
    noisy_votes,
)
from ecos_flower.applications.semi_supervised import PseudoLabelStats, pseudo_label_train

__all__ = [
    "KNN_MODES",
    "FinetuneResult",
    "PseudoLabelStats",
    "aggregate_votes",
    "distill",
    "dp_finetune_head",
    "head_features",
    "knn_sensitivity",
    "knn_votes",
    "noisy_votes",
    "pseudo_label_train",
    "train_teacher",
]
