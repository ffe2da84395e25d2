"""Networks: a small CNN (task model, feature extractor), the DSSGD paper's MLP and CNN, and
heads on pretrained features."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a 128-d embedding layer; `embed` gives the penultimate features.

    Works for any square input size >= 8 (adaptive pooling fixes the flattened size), so the
    same class serves 8x8 digits, 16x16 USPS and 28x28 MNIST.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, embedding_dim: int = 128
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, embedding_dim),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (not normalised)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class PaperMLP(nn.Module):
    """DSSGD paper's MLP: flattened input - 128 - 64 - classes, ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PaperCNN(nn.Module):
    """DSSGD paper's CNN: conv5x5-32, tanh, maxpool3 / conv5x5-64, tanh, maxpool2 / fc-200 / fc.

    On 28x28 grey input it has the paper's 105,506 parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5),
            nn.Tanh(),
            nn.MaxPool2d(3),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, 200), nn.Tanh(), nn.Linear(200, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class FeatureHead(nn.Module):
    """A task head on pretrained features: linear (`hidden=0`) or one hidden ReLU layer.

    Its input is a feature vector stored as a 1x1 "image" with one channel per feature, (N, D,
    1, 1) (`ecos_flower.ecos.feature_space`), so every training, evaluation and federated code
    path that takes image batches takes features unchanged; `in_channels` is D. Like SmallCNN it
    has `embed` (the last layer's input: the features themselves for the linear head) and a
    linear `classifier`, so DP last-layer fine-tuning works on it as on any task model.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1280, image_size: int = 1, hidden: int = 0
    ) -> None:
        super().__init__()
        inputs = in_channels * image_size * image_size
        body: list[nn.Module] = [nn.Flatten()]
        if hidden:
            body += [nn.Linear(inputs, hidden), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.classifier = nn.Linear(hidden or inputs, num_classes)
        self.embedding_dim = hidden or inputs

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


HEAD_MODELS = ("linear-head", "mlp-head")
"""Task models that train on the frozen pretrained features of the run's `extractor`."""
MODEL_NAMES = ("small-cnn", "wide-cnn", "paper-mlp", "paper-cnn", *HEAD_MODELS)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    seed: int | None = None,
) -> nn.Module:
    """Build a model by its config name; unknown names raise a ValueError listing the choices.

    With `seed`, the initial weights come from a forked, seeded torch RNG (reproducible runs; the
    caller's random state is left as it was).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return build_model(name, num_classes, in_channels, image_size)
    if name == "small-cnn":
        return SmallCNN(num_classes=num_classes, in_channels=in_channels)
    if name == "wide-cnn":  # a larger model (4x the embedding): a distillation teacher
        return SmallCNN(num_classes=num_classes, in_channels=in_channels, embedding_dim=512)
    if name == "paper-mlp":
        return PaperMLP(num_classes, in_channels, image_size)
    if name == "paper-cnn":
        return PaperCNN(num_classes, in_channels, image_size)
    if name == "linear-head":
        return FeatureHead(num_classes, in_channels, image_size)
    if name == "mlp-head":
        return FeatureHead(num_classes, in_channels, image_size, hidden=256)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def seeded_model(
    name: str, seed: int, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """The run's initial model: the same parameters on the server and on every participant.

    Seeds a forked torch RNG, so the caller's random state is left as it was.
    """
    return build_model(name, num_classes, in_channels, image_size, seed=int(seed))
