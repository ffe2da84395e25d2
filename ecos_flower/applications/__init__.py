"""What the cloud does with a selected proxy set, and DP fine-tuning on the client (pure
numpy/torch, no Flower): semi-supervised label outsourcing, distillation, private-kNN labelling
and DP last-layer fine-tuning (DP-SGD, DP least squares, DP-FC). The Flower glue is in
`ecos_flower.flower.applications`."""

from ecos_flower.applications.distill import distill, train_teacher
from ecos_flower.applications.dp_fc import dp_fc_head
from ecos_flower.applications.dp_least_squares import dp_least_squares_head
from ecos_flower.applications.finetune import (
    DEFAULT_NORMALISER,
    FinetuneResult,
    dp_finetune_head,
    head_features,
)
from ecos_flower.applications.linear_head import public_feature_scale
from ecos_flower.applications.private_knn import (
    KNN_MODES,
    aggregate_votes,
    knn_sensitivity,
    knn_votes,
    noisy_votes,
)
from ecos_flower.applications.semi_supervised import PseudoLabelStats, pseudo_label_train

__all__ = [
    "DEFAULT_NORMALISER",
    "KNN_MODES",
    "FinetuneResult",
    "PseudoLabelStats",
    "aggregate_votes",
    "distill",
    "dp_fc_head",
    "dp_finetune_head",
    "dp_least_squares_head",
    "head_features",
    "knn_sensitivity",
    "knn_votes",
    "noisy_votes",
    "public_feature_scale",
    "pseudo_label_train",
    "train_teacher",
]
