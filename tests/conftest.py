"""Shared fixtures: tiny real data sets written by the tests, the real conf/ composed with small overrides."""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline import config
from pipeline.data.download import SOURCES_FILE, SUMS_FILE, read_sums
from pipeline.data.idx import write_idx
from pipeline.schema import Config

REPO = Path(__file__).resolve().parent.parent
IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def make_images(labels: np.ndarray, size: int = 28, channels: int | None = None, seed: int = 0) -> np.ndarray:
    """Noise plus a bright square whose position says the class: learnable, like a real data set."""
    rng = np.random.default_rng(seed)
    shape = (len(labels), size, size) + ((channels,) if channels else ())
    x = rng.integers(0, 60, size=shape, dtype=np.uint8)
    step = size // 4
    for i, label in enumerate(labels):
        r, c = divmod(int(label) % 12, 4)
        x[i, r * step:(r + 1) * step, c * step:(c + 1) * step] = 220
    return x


@dataclass
class IdxData:
    """An IDX data set on disk: its directory, the content digests, and the arrays written."""

    directory: Path
    sha256: dict[str, str]
    arrays: dict[str, np.ndarray]

    def overrides(self, *extra: str) -> list[str]:
        """Hydra overrides that point the real Fashion-MNIST config at this data."""
        sums = [f"data.files.{key}.sha256={digest}" for key, digest in self.sha256.items()]
        return [f"data.source={self.directory}", "data.mirrors=[]", *sums, *extra]


def assert_complete(raw: Path, sha256: dict[str, str]) -> None:
    sums = read_sums(raw / SUMS_FILE)
    for key, digest in sha256.items():
        assert sums[IDX_NAMES[key]] == digest
    assert sorted(p.name for p in raw.iterdir()) == sorted([*IDX_NAMES.values(), SUMS_FILE, SOURCES_FILE])


def write_idx_dataset(directory: Path, n_train: int = 300, n_test: int = 100, gz: bool = True,
                      seed: int = 0) -> IdxData:
    """Write the four IDX files of a 10-class data set of 28x28 images; return where and their digests."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y_train, y_test = np.arange(n_train) % 10, np.arange(n_test) % 10
    rng.shuffle(y_train)
    arrays = {"train_images": make_images(y_train, seed=seed), "train_labels": y_train.astype(np.uint8),
              "test_images": make_images(y_test, seed=seed + 1), "test_labels": y_test.astype(np.uint8)}
    sha256 = {}
    for key, array in arrays.items():
        path = directory / (IDX_NAMES[key] + (".gz" if gz else ""))
        write_idx(path, array)
        raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
        sha256[key] = hashlib.sha256(raw).hexdigest()
    return IdxData(directory, sha256, arrays)


@pytest.fixture
def idx_data(tmp_path: Path) -> IdxData:
    return write_idx_dataset(tmp_path / "source")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory standing in for the repository root that DVC runs stages in."""
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


# Unit tests train for the epochs they set (the smoke profile's `min_images` would multiply them) and search with
# the cheapest tuner; the smoke end-to-end test runs the profile as it is, and test_tuning each tuner kind.
UNIT = ("tuner=random", *(f"{s}.train.min_images=null" for s in ("cnn", "cnn_aug", "transfer", "finetune")))


def load_config(*overrides: str) -> Config:
    """The real conf/ composed with overrides, validated as a stage would see it."""
    return config.load(overrides=["profile=smoke", *UNIT, *overrides])


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        server: FileServer = self.server  # type: ignore[assignment]
        server.hits[self.path] += 1
        body = server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        extra = 1000 if self.path in server.cut_short else 0  # promise more than is sent, then hang up
        self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class FileServer(http.server.ThreadingHTTPServer):
    """A real HTTP server on loopback serving bytes by path, counting requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, bytes] = {}
        self.cut_short: set[str] = set()
        self.hits: collections.Counter[str] = collections.Counter()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{prefix.strip('/')}/"

    def serve_dir(self, prefix: str, directory: Path) -> str:
        for path in directory.iterdir():
            self.routes[f"/{prefix}/{path.name}"] = path.read_bytes()
        return self.url(prefix)


@pytest.fixture
def file_server():
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def http_service(command: list[str], url: str, timeout_s: float = 180,
                 stop: signal.Signals = signal.SIGTERM) -> Iterator[subprocess.Popen]:
    """Start a server process in its own session, wait until `url`/health answers, and stop it with `stop` on the
    way out (the whole session). MLflow's servers take about 30 s to answer on 2 cores. Its output goes to a file:
    a pipe nobody reads fills up with the access log and blocks the server mid-request."""
    log = tempfile.NamedTemporaryFile(prefix="service-", suffix=".log")
    process = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"{command[2]} stopped:\n{Path(log.name).read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout_s:.0f} s"
            time.sleep(1)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, stop)
        process.wait(timeout=60)
        log.close()


def job_runners(process: subprocess.Popen) -> list[str]:
    """MLflow's GenAI job runners under a server process (the project starts its servers without them)."""
    commands = (" ".join(p.cmdline()) for p in psutil.Process(process.pid).children(recursive=True))
    return [command for command in commands if "huey" in command]


@pytest.fixture
def split_data(idx_data, workdir):
    """A workdir whose data/split/ holds the tiny IDX data set, made by the real download and split stages."""
    from pipeline.stages import download, split

    cfg = load_config(*idx_data.overrides())
    download.run(cfg)
    split.run(cfg)
    return cfg


@pytest.fixture
def code_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the `pipeline` package that stages' code digests are taken of (`pipeline.deps.ROOT`): editing a
    module in it stands in for a change of the code between a killed run and its resumption."""
    from pipeline import deps

    root = tmp_path / "code"
    shutil.copytree(deps.ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(deps, "ROOT", root)
    return root


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    import random

    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _new_stores_from_a_made_one(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """A SQLite store that a test's stage opens for the first time starts as a copy of one MLflow made (its
    migrations, about 3.4 s a store on 2 cores, then run once per worker). The copy happens under the lock the
    stages take, as the real creation does; tests marked `new_store` (the creation's own) and the stages that tests
    run in subprocesses make theirs as users' do."""
    if "new_store" in request.keywords:
        return
    from pipeline import tracking

    made, real_lock = tmp_path_factory.getbasetemp() / "made-store" / "mlflow.db", tracking._store_lock

    @contextlib.contextmanager
    def lock(uri: str) -> Iterator[None]:
        with real_lock(uri):
            db = Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None
            if db is not None and not db.exists():
                if not made.exists():
                    made.parent.mkdir(exist_ok=True)
                    import mlflow

                    mlflow.MlflowClient(f"sqlite:///{made}").search_experiments()
                shutil.copyfile(made, db)
            yield

    monkeypatch.setattr(tracking, "_store_lock", lock)


SMOKE_PIPELINES = ("test_pipeline_e2e.py::test_dvc_exp_run_composes_config_and_reruns_only_what_changed",
                   "test_server.py::test_the_smoke_pipeline_on_jax_lands_on_the_server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The two smoke pipelines, the suite's longest tests, go first and to one xdist worker (`--dist loadgroup`),
    one after the other: side by side they slowed each other down (the suite took 24:49 instead of 16:24), and
    started late they made its tail."""
    smoke = [item for item in items if item.nodeid.endswith(SMOKE_PIPELINES)]
    for item in smoke:
        item.add_marker(pytest.mark.xdist_group("smoke-pipelines"))
    rest = [item for item in items if item not in smoke]
    # then the other slow tests, then those that train (on split data), the short ones last: they fill the gaps,
    # so that both workers end about together
    items[:] = smoke + sorted(rest, key=lambda item: (item.get_closest_marker("slow") is None,
                                                      "split_data" not in getattr(item, "fixturenames", ())))
