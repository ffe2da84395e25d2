"""A scenario with 3 classes end to end: ECOS, DSSGD and FedAvg on image-folder data of the
digits 0, 1 and 2, in process. The server tells every client `num-classes` (3); every model a
client receives, trains or keeps has 3 outputs, and ECOS and FedAvg beat the 1/3 chance."""

from __future__ import annotations

import numpy as np
import pytest
from flower_helpers import run_tiny
from flwr.app import Message
from PIL import Image
from sklearn.datasets import load_digits

from ecos_flower.client.dssgd import STATE_PARAMS
from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.models import build_model

CLASSES, NODES = 3, 3

SCENARIO = """
seed = 0
image-size = 8
channels = 1
client-domain = "inverted"
num-clients = 3
share = 0.5
test-fraction = 0.25
pool-domains = ["plain", "inverted"]

[[domains]]
name = "plain"
loader = "image-folder"
path = "plain"

[[domains]]
name = "inverted"
loader = "image-folder"
path = "inverted"
"""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Two ImageFolder trees (plain and inverted 8x8 PNG digits, classes 0-2) and their scenario."""
    root = tmp_path_factory.mktemp("three-classes")
    digits = load_digits()
    for domain in ("plain", "inverted"):
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            if label >= CLASSES:
                continue
            pixels = np.round(image / 16.0 * 255).astype(np.uint8)
            if domain == "inverted":
                pixels = 255 - pixels
            folder = root / domain / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    path = root / "three.toml"
    path.write_text(SCENARIO)
    return path


def _outputs(message: Message) -> list[int]:
    """The output sizes of every model state dict the message carries (its last layer's bias)."""
    if message.has_error():
        return []
    sizes = []
    for record in message.content.array_records.values():
        keys = [k for k in record if k.endswith(".bias")]
        if keys:
            sizes.append(int(record[keys[-1]].shape[0]))
    return sizes


def _recording_grid(seen: list) -> InProcessGrid:
    def app(msg: Message, context) -> Message:
        reply = client_app(msg, context)
        local = context.state.get(STATE_PARAMS)
        size = None if local is None else int(local["params"].shape[0])
        seen.append((msg.metadata.message_type, _outputs(msg), _outputs(reply), size))
        return reply

    return InProcessGrid(app, NODES)


def _params(model: str, num_classes: int) -> int:
    net = build_model(model, num_classes, in_channels=1, image_size=8)
    return sum(p.numel() for p in net.parameters())


def test_the_scenario_has_three_classes(scenario):
    federation = load_federation(scenario)
    assert federation.num_classes == CLASSES
    assert federation.pool.label_set() == {0, 1, 2}


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("ecos", {"budget": 120, "cloud-epochs": 20}),
        ("fedavg", {"num-server-rounds": 3, "local-epochs": 2}),
        ("dssgd", {"dssgd-epochs": 2, "model": "paper-mlp", "theta-u": 0.5}),
    ],
)
def test_every_client_model_has_three_outputs(scenario, flwr_home, method, overrides):
    seen: list = []
    report, _ = run_tiny(scenario, NODES, _recording_grid(seen), method=method, **overrides)
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert all(0 <= a <= 1 for a in report.accuracy_per_client.values())
    assert seen, "no message reached the clients"
    for kind, sent, replied, _ in seen:
        assert all(size == CLASSES for size in sent + replied), (kind, sent, replied)
    if method == "dssgd":
        local = {size for kind, _, _, size in seen if kind == "train.dssgd"}
        assert local == {_params("paper-mlp", CLASSES)} != {_params("paper-mlp", 10)}
    else:  # the model sent for evaluation (ECOS: trained in the cloud) has 3 outputs
        assert any(kind == "evaluate" and sent == [CLASSES] for kind, sent, _, _ in seen)
        assert report.accuracy_mean > 1 / CLASSES + 0.1, report.accuracy_per_client
