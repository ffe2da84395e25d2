"""A picture of a scenario's domains: one row per domain, one sample per class where possible."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scenario import Scenario
from .types import ImageSet


def pick_examples(data: ImageSet, count: int) -> list[int]:
    """Indices of `count` samples, one per class in label order first, then the next ones."""
    labels = data.labels.numpy()
    order: list[int] = []
    for rank in range(len(labels)):
        added = False
        for cls in np.unique(labels):
            hits = np.flatnonzero(labels == cls)
            if rank < len(hits):
                order.append(int(hits[rank]))
                added = True
            if len(order) == count:
                return order
        if not added:
            break
    return order


def save_domain_montage(scenario: Scenario, path: Path, per_domain: int = 10) -> Path:
    """Draw `per_domain` samples of every scenario domain as a grid PNG at `path`; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .federation import load_domains

    domains = load_domains(scenario)
    rows = len(domains)
    fig, axes = plt.subplots(
        rows, per_domain, figsize=(1.0 * per_domain + 1.6, 1.05 * rows + 0.4), squeeze=False
    )
    for r, (name, data) in enumerate(domains.items()):
        picks = pick_examples(data, per_domain)
        for c in range(per_domain):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(picks):
                img = data.images[picks[c]].permute(1, 2, 0).numpy()
                if img.shape[2] == 1:
                    ax.imshow(img[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.imshow(img.clip(0.0, 1.0))
                ax.set_title(str(int(data.labels[picks[c]])), fontsize=8, pad=2)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(
        f"{scenario.source.name}: {scenario.image_size}x{scenario.image_size}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
