"""The server-owned pool of a deployment (run-config `pool`): the pool file, what the server
sends from it, that a server run reads nothing but the pool (an audit hook watches every file the
server's code opens), and that the simulation-only methods are refused before any message."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import FAST

import ecos_flower.data.node_data as node_data
import ecos_flower.data.pool as pool_module
from ecos_flower.cli import main as cli_main
from ecos_flower.client_app import app as client_app
from ecos_flower.data import ScenarioError, load_federation
from ecos_flower.data.pool import export_pool, load_pool, load_pool_spec, server_federation
from ecos_flower.flower.inprocess import InProcessGrid, run_in_process
from ecos_flower.flower.settings import merge_run_config
from ecos_flower.server_app import SIMULATION_ONLY, make_server_app, run_method
from ecos_flower.testing.scenarios import write_tiny_deployment, write_tiny_scenario

CLIENT_CODE = (
    str(Path(node_data.__file__).parents[1] / "client") + "/",
    str(Path(node_data.__file__).parents[1] / "client_app.py"),
)
AUDITED = {"open", "os.scandir", "os.listdir"}


class FileAudit:
    """Every path opened or listed while `active`, split by whether client code (a frame in
    `ecos_flower/client/` or `client_app.py`) is on the stack. In-process, the server calls
    the ClientApps, so a node's reads run above server frames; a read with no client frame
    at all is the server's own."""

    def __init__(self) -> None:
        self.active = False
        self.server: list[str] = []
        self.client: list[str] = []
        sys.addaudithook(self)  # audit hooks cannot be removed: it goes idle after the test

    def __call__(self, event: str, args: tuple) -> None:
        if not self.active or event not in AUDITED or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, str | Path):
            return  # a file descriptor
        path = str(Path(path).resolve())
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.startswith(CLIENT_CODE):
                self.client.append(path)
                return
            frame = frame.f_back
        self.server.append(path)


_AUDIT = FileAudit()


@pytest.fixture()
def audit() -> Iterator[FileAudit]:
    _AUDIT.server.clear()
    _AUDIT.client.clear()
    _AUDIT.active = True
    try:
        yield _AUDIT
    finally:
        _AUDIT.active = False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[Path, list[Path], Path, Path]:
    """(pool file, node folders, the scenario path made unreadable, the simulation's pool
    federation for comparison)."""
    root = tmp_path_factory.mktemp("deployment")
    pool_file, nodes = write_tiny_deployment(root)
    scenario = root / "scenario" / "tiny.toml"
    simulated = load_federation(scenario)
    scenario.unlink()  # the server must not need it (a read would fail with ScenarioError)
    return pool_file, nodes, scenario, simulated


def test_pool_file_holds_the_scenarios_public_pool(deployment):
    pool_file, nodes, _, simulated = deployment
    assert [p.name for p in nodes] == ["node-0", "node-1", "node-2"]
    spec = load_pool_spec(pool_file)
    assert (spec.image_size, spec.channels) == (8, 1)
    assert [(d.name, d.loader) for d in spec.domains] == [
        ("plain", "image-folder"),  # inferred from the folder
        ("inverted", "image-folder"),
    ]
    federation = load_pool(pool_file)
    assert federation.clients == () and federation.client_domain is None
    assert federation.scenario is None
    assert federation.class_names == simulated.class_names
    assert federation.num_classes == simulated.num_classes == 10
    assert (federation.image_size, federation.channels) == (8, 1)
    pool, reference = federation.pool, simulated.pool
    assert pool.domain_names == reference.domain_names
    for index in range(len(pool.domain_names)):
        mine, theirs = (
            pool.labels[pool.domains == index],
            reference.labels[reference.domains == index],
        )
        assert torch.equal(mine.sort().values, theirs.sort().values)
    # Same images up to 8-bit quantisation (sorted pixel sums; PNGs hold 0..255).
    a = pool.images.flatten(1).sum(1).sort().values
    b = reference.images.flatten(1).sum(1).sort().values
    assert torch.allclose(a, b, atol=64 / 255)


def test_npz_and_declared_names_and_bad_pool_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 1, 6, 6), dtype=np.uint8)
    np.savez(
        tmp_path / "public.npz",
        images=images,
        labels=np.arange(12) % 3,
        class_names=np.array(["bird", "cat", "dog"]),
    )
    file = tmp_path / "pool.toml"
    file.write_text(
        'image-size = 8\nchannels = 3\n[[domains]]\npath = "public.npz"\n'
        '[[domains]]\nname = "again"\nloader = "npz"\npath = "public.npz"\n'
    )
    federation = load_pool(file)
    assert federation.pool.domain_names == ("public", "again")
    assert federation.class_names == ("bird", "cat", "dog")
    assert tuple(federation.pool.images.shape) == (24, 3, 8, 8)
    assert federation.pool.labels.tolist() == (np.arange(24) % 3).tolist()

    bad = {
        'channels = 1\n[[domains]]\npath = "public.npz"\n': "key 'image-size' is missing",
        'image-size = 8\nchannels = 2\n[[domains]]\npath = "x.npz"\n': "key 'channels'",
        'image-size = 8\nchannels = 1\nclients = 3\n[[domains]]\npath = "public.npz"\n': (
            "unknown key 'clients'"
        ),
        'image-size = 8\nchannels = 1\n[[domains]]\npath = "nowhere.npz"\n': "needs a file",
        'image-size = 8\nchannels = 1\n[[domains]]\npath = "public.npz"\nmax-samples = 3\n': (
            "takes no options"
        ),
        'image-size = 8\nchannels = 1\n[[domains]]\npath = "public.npz"\n'
        '[[domains]]\npath = "public.npz"\n': "duplicate domain name 'public'",
    }
    for i, (text, message) in enumerate(bad.items()):
        broken = tmp_path / f"bad-{i}.toml"
        broken.write_text(text)
        with pytest.raises(ScenarioError, match=message) as info:
            load_pool(broken)
        assert str(broken) in str(info.value)
    with pytest.raises(ScenarioError, match="pool file not found"):
        load_pool(tmp_path / "missing.toml")


def test_server_federation_uses_the_pool_only_when_set(tmp_path, deployment):
    pool_file, _, missing_scenario, _ = deployment
    scenario = write_tiny_scenario(tmp_path)
    simulated = server_federation({"scenario": str(scenario), "num-clients": 2})
    assert simulated.num_clients == 2 and simulated.client_domain == "inverted"
    owned = server_federation({"scenario": str(missing_scenario), "pool": str(pool_file)})
    assert owned.num_clients == 0 and owned.client_domain is None


def test_export_shards_pool_option(tmp_path):
    scenario = write_tiny_scenario(tmp_path / "sim")
    out = tmp_path / "out"
    assert cli_main(["export-shards", str(scenario), str(out), "--pool"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["node-0", "node-1", "node-2", "pool"]
    assert sorted(p.name for p in (out / "pool").iterdir()) == ["inverted", "plain", "pool.toml"]
    assert len(load_pool(out / "pool" / "pool.toml").pool) == len(load_federation(scenario).pool)
    with pytest.raises(node_data.DataError, match="not empty"):
        export_pool(scenario, out / "pool")


RUNS = {
    # Enough cloud training that accuracy is far above chance (FAST's 2 epochs are near 0.1).
    "ecos": {"method": "ecos", "budget": 300, "cloud-epochs": 15},
    "dssgd": {
        "method": "dssgd",
        "model": "small-cnn",
        "dssgd-epochs": 10,
        "dssgd-schedule": "parallel",
    },
    "fedavg": {"method": "fedavg", "num-server-rounds": 3, "local-epochs": 2},
}


def run_on_pool(deployment, audit: FileAudit, monkeypatch, overrides: dict):
    """Run the ServerApp with `pool` set and the scenario deleted, on nodes reading their own
    exported folders; assert the server read no client data and did read its pool."""
    pool_file, nodes, scenario, _ = deployment
    # Fresh caches, so every read this run needs really happens (and the audit sees it).
    monkeypatch.setattr(pool_module, "_CACHE", {})
    node_data._load_raw.cache_clear()
    config = merge_run_config(FAST, overrides, {"scenario": str(scenario), "pool": str(pool_file)})
    # The audit catches a read of client data outside client code (this test's own frame).
    next(nodes[0].rglob("*.png")).read_bytes()
    assert audit.server and audit.server[-1].startswith(str(nodes[0].resolve()))
    audit.server.clear()
    node_configs = {i: {"data": str(folder)} for i, folder in enumerate(nodes)}
    grid = InProcessGrid(client_app, len(nodes), node_configs=node_configs)
    reports = []
    run_in_process(make_server_app(config, on_report=reports.append), grid)
    audit.active = False
    (report,) = reports

    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert report.extra["pool"] == str(pool_file)
    client_data = [str(folder.resolve()) for folder in nodes] + [str(scenario)]
    touched = [p for p in audit.server if p.startswith(tuple(client_data))]
    assert not touched, f"the server read client data: {touched[:5]}"
    pool_root = str(pool_file.parent.resolve())
    # Positive controls: the server read its pool and each node read its own folder.
    assert any(p.startswith(pool_root + "/plain/") for p in audit.server)
    for folder in nodes:
        assert any(p.startswith(str(folder.resolve())) for p in audit.client), folder
    assert not any(p.startswith(pool_root) for p in audit.client)
    return report


@pytest.mark.parametrize("method", sorted(RUNS))
def test_server_reads_only_its_pool(deployment, audit, monkeypatch, flwr_home, method):
    # No `num-clients`: the server takes the node count from the connected nodes.
    report = run_on_pool(deployment, audit, monkeypatch, RUNS[method])
    # DSSGD: the shared server model every node evaluates on its own test set (a node's local
    # model after its last local steps varies widely across nodes, in simulation too).
    accuracy = (
        report.extra["server-accuracy-per-client"]
        if method == "dssgd"
        else report.accuracy_per_client
    )
    assert min(accuracy.values()) > 0.3, accuracy  # chance is 0.1 (10 classes)
    if method == "ecos":
        assert report.extra["domain-precision"] is None
        assert "does not know" in report.extra["domain-precision-note"]


SMOKE = {
    "random": {"method": "random"},
    "kcenter": {"method": "kcenter"},
    "oracle": {"method": "oracle"},  # research nodes answer exact counts; deployed ones refuse
    "local": {"method": "local", "local-train-epochs": 1},
    "dp-fedavg": {"method": "dp-fedavg"},
    "dp-linear-probe": {
        "method": "dp-linear-probe",
        "finetune-epsilon": 1.0,
        "teacher-epochs": 1,
        "finetune-steps": 5,
    },
    "private-knn": {"method": "ecos", "application": "private-knn"},
    "semi-supervised": {
        "method": "random",
        "application": "semi-supervised",
        "semi-rounds": 1,
        "semi-epochs": 1,
        "semi-max-unlabelled": 200,
    },
    "distill": {"method": "random", "application": "distill", "teacher-epochs": 1},
    "dp-finetune": {"method": "random", "finetune-epsilon": 1.0, "finetune-steps": 5},
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_other_methods_run_on_the_pool_alone(deployment, audit, monkeypatch, flwr_home, name):
    """Every method and application not simulation-only runs with nothing but the pool on the
    server (FAST settings: the accuracy is not the point here)."""
    run_on_pool(deployment, audit, monkeypatch, {**SMOKE[name], "num-clients": 3})


class NoMessageGrid(InProcessGrid):
    """A grid that fails the test on the first message sent."""

    def push_messages(self, messages):
        raise AssertionError("a message was sent")


@pytest.mark.parametrize("method", sorted(SIMULATION_ONLY))
def test_simulation_only_methods_are_refused_with_a_pool(tmp_path, method):
    config = merge_run_config(
        {"method": method, "pool": str(tmp_path / "pool.toml"), "node-wait": 60.0}
    )
    grid = NoMessageGrid(client_app, 2)
    with pytest.raises(ValueError, match=rf"method '{method}' is simulation-only") as info:
        run_method(grid, config)
    assert SIMULATION_ONLY[method] in str(info.value)


def test_oracle_is_not_refused_by_the_server(tmp_path):
    """The oracle reads no client data on the server; a deployed node refuses its exact
    counts itself (its policy), so the server does not decide for it."""
    config = merge_run_config({"method": "oracle", "pool": str(tmp_path / "pool.toml")})
    with pytest.raises(FileNotFoundError, match="pool file"):
        run_method(NoMessageGrid(client_app, 1), config)
