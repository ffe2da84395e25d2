"""Task models, feature extractors and their train/evaluate loops (pure torch, no Flower)."""

from ecos_flower.models.nets import (
    HEAD_MODELS,
    FeatureHead,
    PaperCNN,
    PaperMLP,
    SmallCNN,
    build_model,
    seeded_model,
)
from ecos_flower.models.training import (
    batched_apply,
    evaluate_accuracy,
    set_torch_threads,
    train_epochs,
)

__all__ = [
    "HEAD_MODELS",
    "FeatureHead",
    "PaperCNN",
    "PaperMLP",
    "SmallCNN",
    "batched_apply",
    "build_model",
    "evaluate_accuracy",
    "seeded_model",
    "set_torch_threads",
    "train_epochs",
]
