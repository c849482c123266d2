"""`python -m pipeline.server [OVERRIDES]` (`make server`): an MLflow tracking server for a team, on this machine.

PostgreSQL keeps the runs and the model registry; the server keeps the artifacts and serves them
(`--artifacts-destination`), and is the UI. It listens where `tracking=server` sends the stages
(conf/tracking/server.yaml: `tracking.uri`, http://127.0.0.1:5000, loopback), so one override moves both.

Everything lives in `<repo>/.server/` (git-ignored): `postgres/` is the database cluster, made by initdb on the
first start (no SQL by hand) and reached only through a Unix socket in a private temporary directory (no TCP
port, no password); `artifacts/` holds the artifacts, `postgres.log` the database's log. Ctrl-C or SIGTERM stops
the server and then the database; a database left running by a killed server is stopped and started again.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import config, files, tracking
from pipeline.cli import stop_on_signals
from pipeline.errors import PipelineError, Terminated

SERVER_DIR = ".server"
DATABASE = "mlflow"  # also the name of the cluster's superuser
SYSTEM_USER = "postgres"  # PostgreSQL refuses to run as root; Debian's package makes this user
START_TIMEOUT_S = 60


class ServerError(PipelineError):
    """The tracking server cannot be started."""


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, or in Debian's versioned directory (the newest version)."""
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                      key=lambda p: int(Path(p).parts[-3]), default=None)
    if found is None:
        raise ServerError(f"PostgreSQL's {name} not found: install Debian's postgresql (make server does, where apt "
                          f"and root are at hand)")
    return found


def _owner() -> dict:
    """subprocess arguments that run PostgreSQL as its own system user where this process is root."""
    return {"user": SYSTEM_USER, "group": SYSTEM_USER, "extra_groups": []} if os.geteuid() == 0 else {}


def _hand_over(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, SYSTEM_USER, SYSTEM_USER)


def _postgres(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as the user PostgreSQL runs as; a failure, if `check`, is one line."""
    result = subprocess.run([postgres_binary(args[0]), *args[1:]], capture_output=True, text=True, cwd="/",
                            **_owner(), **kwargs)  # cwd: a directory PostgreSQL's own user can enter
    if check and result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise ServerError(f"{args[0]} failed: {last[-1]}")
    return result


def ensure_cluster(root: Path) -> Path:
    """`root/postgres`, a cluster with the database `mlflow`: made whole in a temporary directory, then renamed
    into place, so that an interrupted first start leaves nothing a later start would take for a cluster."""
    cluster = root / "postgres"
    if (cluster / "PG_VERSION").is_file():
        return cluster
    with files.atomic_path(cluster, directory=True) as staging:
        _hand_over(staging)  # PostgreSQL wants its directory owned by the user it runs as
        _postgres("initdb", "--pgdata", str(staging), "--username", DATABASE, "--auth", "trust", "--encoding", "UTF8",
                  "--locale", "C.UTF-8")
        _postgres("postgres", "--single", "-D", str(staging), "postgres", input=f"CREATE DATABASE {DATABASE};\n")
    return cluster


def _stop(cluster: Path) -> None:
    """Stop the cluster if it runs (a Ctrl-C at a terminal may have reached it first)."""
    if _postgres("pg_ctl", "status", "-D", str(cluster), check=False).returncode == 0:
        _postgres("pg_ctl", "stop", "-D", str(cluster), "-m", "fast", "-w")


@contextlib.contextmanager
def running_postgres(cluster: Path, log: Path) -> Iterator[str]:
    """The cluster, started with its socket in a private temporary directory and no TCP port; yields the
    SQLAlchemy URI of the `mlflow` database. Stopped on the way out, whatever ends the block."""
    _stop(cluster)  # left running by a server that was killed: its socket directory is gone
    socket_dir = Path(tempfile.mkdtemp(prefix="mlflow-postgres-"))
    _hand_over(socket_dir)
    log.touch()
    _hand_over(log)
    try:
        _postgres("pg_ctl", "start", "-D", str(cluster), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S),
                  "-o", f"-c listen_addresses='' -k {socket_dir} -c unix_socket_permissions=0700")
        try:
            yield f"postgresql://{DATABASE}@/{DATABASE}?host={socket_dir}"
        finally:
            _stop(cluster)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def server_command(backend_uri: str, artifacts: Path, host: str, port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", str(workers)]


def address(uri: str | None) -> tuple[str, int]:
    """Host and port of `tracking.uri`, where this machine's server listens."""
    parts = urlsplit(uri or "")
    if parts.scheme != "http" or not parts.hostname:
        raise ServerError(f"tracking.uri={uri!r}: make server needs an http://host:port address on this machine")
    return parts.hostname, parts.port or 80


def serve(root: Path, host: str, port: int, workers: int) -> int:
    """Run the server until it exits or is stopped; its exit status (0 when stopped)."""
    log = root / "postgres.log"
    with running_postgres(ensure_cluster(root), log) as backend:
        artifacts = root / "artifacts"
        artifacts.mkdir(exist_ok=True)
        print(f"MLflow tracking server on http://{host}:{port} (PostgreSQL in {root / 'postgres'}, artifacts in "
              f"{artifacts}); stages use it with -S tracking=server; Ctrl-C stops it", flush=True)
        server = subprocess.Popen(server_command(backend, artifacts, host, port, workers),
                                  env=tracking.server_environment())
        try:
            return server.wait()
        except (KeyboardInterrupt, Terminated):
            server.terminate()
            server.wait()
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. tracking.uri=http://127.0.0.1:5050")
    parser.add_argument("--dir", type=Path, help=f"where the database and artifacts live (default <repo>/{SERVER_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="the server's worker processes (default 2)")
    args = parser.parse_args(argv)
    stop_on_signals()
    try:
        cfg = config.load(overrides=["tracking=server", *args.overrides])
        host, port = address(cfg.tracking.uri)
        return serve((args.dir or tracking.repo_root() / SERVER_DIR).resolve(), host, port, args.workers)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
