"""Run a logged stage run again and compare: `python -m pipeline.reproduce RUN [OVERRIDES] [--tolerance X]`.

RUN is a stage run's id (or a stage's name: the workspace's run, else its latest). Its stage runs again as a DVC
experiment, from the git commit and with the composed config (`config.yaml`) that the run recorded, in a temporary
git worktree at that commit whose DVC cache is this repository's: the upstream outputs come from that cache (a
checkout of the commit's dvc.lock, or DVC's run cache), the stage itself is forced to run. Its new MLflow run lands
in the store the run was found in, tagged `pipeline.reproduces=<RUN>`. The accuracies are printed beside the logged
ones; exit 0 when each agrees within `tracking.reproduce_tolerance` (or --tolerance), 1 when not, 2 on bad input.
This workspace's files stay as they are; the worktree is removed afterwards, the experiment stays
(`dvc exp show -A`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import config, tracking
from pipeline.errors import ConfigError, PipelineError

COMPARED = {"test_accuracy": ("test", "accuracy"), "best_val_accuracy": ("val_accuracy",)}  # logged -> metrics/*.json
TAG = "pipeline.reproduces"
SLACK = 1e-12  # a difference equal to the tolerance agrees, whatever the float rounding of the subtraction
_ABSENT = object()


class ReproduceError(PipelineError):
    """A run cannot be reproduced: it is not a stage run, lacks what it needs, or its stage failed to run again."""


@dataclass(frozen=True)
class Original:
    """What a stage run recorded that a reproduction needs."""

    run_id: str
    stage: str
    commit: str
    dirty: bool
    metrics: dict[str, float]


@dataclass(frozen=True)
class Row:
    metric: str
    logged: float
    reproduced: float | None
    tolerance: float

    @property
    def difference(self) -> float | None:
        return None if self.reproduced is None else self.reproduced - self.logged

    @property
    def within(self) -> bool:
        return self.difference is not None and abs(self.difference) <= self.tolerance + SLACK


def compare(logged: dict[str, float], reproduced: dict[str, float], tolerance: float) -> list[Row]:
    """One row per accuracy the original run logged; one the reproduction lacks does not agree."""
    return [Row(name, logged[name], reproduced.get(name), tolerance) for name in COMPARED if name in logged]


def verdict(rows: list[Row]) -> tuple[bool, str]:
    """Whether every row agrees, and the final line saying so."""
    off = [row for row in rows if not row.within]
    if not off:
        return True, "reproduced within tolerance"
    reasons = [f"{row.metric} differs by {row.difference:+.4f}" if row.difference is not None
               else f"{row.metric} missing from the reproduction" for row in off]
    return False, f"NOT reproduced: {'; '.join(reasons)} (tolerance {off[0].tolerance:g})"


def table(rows: list[Row]) -> str:
    """metric, logged, reproduced, difference, within tolerance?"""
    tolerance = f"within {rows[0].tolerance:g}" if rows else "within"
    lines = [f"{'metric':<20} {'logged':>10} {'reproduced':>10} {'difference':>10}  {tolerance}"]
    for row in rows:
        new = f"{row.reproduced:>10.4f}" if row.reproduced is not None else f"{'-':>10}"
        diff = f"{row.difference:>+10.4f}" if row.difference is not None else f"{'-':>10}"
        lines.append(f"{row.metric:<20} {row.logged:>10.4f} {new} {diff}  {'yes' if row.within else 'NO'}")
    return "\n".join(lines)


def original(run: Any) -> Original:
    """The stage, commit and accuracies of a logged run (an MLflow run entity); a run that is not a stage run, or
    lacks them, is an error naming what is missing."""
    tags, run_id = run.data.tags, run.info.run_id
    kind = tags.get(tracking.KIND_TAG, "stage")  # only stage runs are reproduced; older runs have no kind
    if kind != "stage" or "pipeline.trial" in tags:
        kind = "trial" if "pipeline.trial" in tags else kind
        raise ReproduceError(f"run {run_id} is a {kind} run, not a stage run: reproduce a stage's run")
    if not tags.get("pipeline.stage"):
        raise ReproduceError(f"run {run_id} has no tag pipeline.stage: not a stage run of this pipeline")
    metrics = {name: run.data.metrics[name] for name in COMPARED if name in run.data.metrics}
    if not metrics:
        raise ReproduceError(f"run {run_id} ({tags['pipeline.stage']}) logged none of {', '.join(COMPARED)}: "
                             "only a model stage's run can be reproduced")
    commit = tags.get("mlflow.source.git.commit")
    if not commit:
        raise ReproduceError(f"run {run_id} records no git commit (tag mlflow.source.git.commit)")
    return Original(run_id, tags["pipeline.stage"], commit, tags.get("git.dirty") == "true", metrics)


def repository() -> tuple[Path, Path]:
    """This DVC repository's root and its local cache directory (which the worktree shares)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            return Path(repo.root_dir), Path(repo.cache.local_cache_dir)
    except NotDvcRepoError:
        raise ReproduceError(f"{Path.cwd()} is not inside a DVC repository") from None


def check_commit(root: Path, commit: str, run_id: str) -> None:
    result = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True)
    if result.returncode != 0:
        raise ReproduceError(f"commit {commit} of run {run_id} is not in the repository at {root}")


@contextlib.contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """A temporary detached git worktree of `root` at `commit`, removed afterwards, also when the body fails."""
    parent = Path(tempfile.mkdtemp(prefix="pipeline-reproduce-"))
    path = parent / root.name
    added = subprocess.run(["git", "-c", "core.hooksPath=/dev/null",  # no `dvc install` hook: its cache is not set yet
                            "worktree", "add", "--detach", "--quiet", str(path), commit], cwd=root,
                           capture_output=True, text=True)
    try:
        if added.returncode != 0:
            raise ReproduceError(f"git worktree add at {commit} failed: {added.stderr.strip()}")
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=root, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)  # unlinks the store's link, never what it points at
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def params_text(logged: dict[str, Any], template: dict[str, Any]) -> str:
    """params.yaml as the run had it: the logged values, written as DVC's Hydra composition writes them, in the
    commit's key order, and with the commit's value where it is equal (30 for a logged 30.0): the values are the
    logged ones exactly, and the text DVC's run cache hashes is the one the run's stages had."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(_typed_like(logged, template)))


def _typed_like(logged: Any, template: Any = _ABSENT) -> Any:
    if isinstance(logged, dict) and isinstance(template, dict):
        keys = [key for key in template if key in logged] + [key for key in logged if key not in template]
        return {key: _typed_like(logged[key], template.get(key, _ABSENT)) for key in keys}
    return template if template is not _ABSENT and template == logged else logged


def _load_yaml(path: Path) -> dict[str, Any]:
    """YAML as OmegaConf reads it: `1e-05` is a float here, not the string a YAML 1.1 loader makes of it."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def route_store(workspace: Path, logged_uri: str | None, store: str, run_id: str) -> None:
    """Make the stage log its run to `store`, where the original run is, without changing a param: a stage that
    logs to its repository's local store (tracking.uri null) logs under the worktree's root (DVC's DVC_ROOT), so the
    worktree's store path is made a link to `store`'s database (SQLite follows it, journal and lock included)."""
    if logged_uri:
        if logged_uri != store:
            raise ReproduceError(f"run {run_id} logged to {logged_uri}, but was found in {store}: reproduce it "
                                 f"with tracking.uri={logged_uri}")
        return
    if not store.startswith("sqlite:///"):
        raise ReproduceError(f"run {run_id} logged to its repository's local store, but was found in {store}")
    database = Path(store.removeprefix("sqlite:///")).resolve()
    link = workspace / tracking.STORE_DIR / database.name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(database)


def prepare(workspace: Path, cache: Path, logged_config: Path, store: str, run_id: str) -> None:
    """The worktree's DVC cache is this repository's (as `dvc cache dir --local` sets it: in the worktree's
    git-ignored config.local); its params.yaml the run's; its store the run's."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo, repo.config.edit("local") as local:
        local.setdefault("cache", {})["dir"] = str(cache)
    logged = _load_yaml(logged_config)
    params = workspace / "params.yaml"
    params.write_text(params_text(logged, _load_yaml(params)), encoding="utf-8")
    route_store(workspace, (logged.get("tracking") or {}).get("uri"), store, run_id)


def upstream(workspace: Path, stage: str, commit: str) -> list[str]:
    """The stages `stage` depends on, directly or not, in the commit's dvc.yaml."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph
        node = next((s for s in graph if _address(s, workspace) == stage), None)
        if node is None:
            raise ReproduceError(f"stage {stage} is not in dvc.yaml at commit {commit}")
        return sorted(_address(s, workspace) for s in nx.descendants(graph, node))  # edges: stage -> its deps


def _address(stage: Any, workspace: Path) -> str:
    """A stage as `dvc repro` takes it in the worktree (DVC's own `addressing` is relative to the process's cwd)."""
    path = os.path.relpath(stage.path, workspace)
    name = getattr(stage, "name", None)
    return path if not name else name if path == "dvc.yaml" else f"{path}:{name}"


def run_again(workspace: Path, stage: str, commit: str) -> None:
    """Bring the upstream outputs from the cache (a checkout of the commit's lock, then `dvc repro`, which restores
    from the run cache what the run's params changed, or runs it), then run the stage itself as an experiment:
    forced (never restored from the run cache), alone, with params.yaml as written (--no-hydra: not recomposed)."""
    env = _env()
    above = upstream(workspace, stage, commit)
    forget_other_stages(workspace / "dvc.lock", {*above, stage})
    if above:
        if (workspace / "dvc.lock").is_file():
            _dvc(workspace, "checkout", "--quiet", "--allow-missing", *above, env=env, check=False)
        _dvc(workspace, "repro", *above, env=env)
    _dvc(workspace, "exp", "run", "--no-hydra", "--force", "--single-item", stage, env=env)


def forget_other_stages(lock: Path, keep: set[str]) -> None:
    """Drop from the worktree's dvc.lock the stages the reproduction does not run or read: their recorded outputs
    need not be in this cache (a lock committed before a later `dvc repro`), and DVC reads them all when it commits
    the experiment ("failed to load directory ...")."""
    if not lock.is_file():
        return
    recorded = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    recorded["stages"] = {name: entry for name, entry in (recorded.get("stages") or {}).items() if name in keep}
    lock.write_text(yaml.safe_dump(recorded, sort_keys=False), encoding="utf-8")


def reproduced_metrics(workspace: Path, stage: str) -> tuple[str, dict[str, float]]:
    """The new MLflow run's id and accuracies, as the stage wrote them to metrics/<stage>.json."""
    path = workspace / "metrics" / f"{stage}.json"
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReproduceError(f"the reproduction left no readable metrics/{stage}.json ({e})") from None
    if not written.get("mlflow_run_id"):
        raise ReproduceError(f"metrics/{stage}.json of the reproduction names no MLflow run (mlflow_run_id)")
    values = {}
    for name, keys in COMPARED.items():
        value: Any = written
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values[name] = float(value)
    return written["mlflow_run_id"], values


def reproduce(ref: str, tolerance: float | None = None, overrides: Sequence[str] = ()) -> tuple[bool, str]:
    """Run `ref`'s stage again from its commit and params; whether its accuracies agree, and the report."""
    cfg = config.load(overrides=overrides)
    tolerance = cfg.tracking.reproduce_tolerance if tolerance is None else tolerance
    if not 0 <= tolerance <= 1:
        raise ConfigError(f"--tolerance={tolerance:g} is out of range; it must be between 0 and 1")
    experiment_id = tracking.connect(cfg)
    run = original(tracking.find_run(ref, experiment_id))
    root, cache = repository()
    check_commit(root, run.commit, run.run_id)
    if run.dirty:
        _say(f"note: run {run.run_id} was made from uncommitted changes (git.dirty=true); the commit's code runs now")
    store = tracking.store_uri(cfg.tracking)
    with tempfile.TemporaryDirectory(prefix="pipeline-reproduce-config-") as tmp:
        logged_config = tracking.download(run.run_id, "config.yaml", Path(tmp))
        with worktree(root, run.commit) as workspace:
            _say(f"reproducing run {run.run_id} ({run.stage}) at commit {run.commit[:12]} in {workspace}")
            prepare(workspace, cache, logged_config, store, run.run_id)
            run_again(workspace, run.stage, run.commit)
            new_id, values = reproduced_metrics(workspace, run.stage)
    new = tracking.tag_run(new_id, {TAG: run.run_id})
    rows = compare(run.metrics, values, tolerance)
    agreed, last = verdict(rows)
    experiment = new.data.tags.get("dvc.exp_name", "?")
    head = (f"run {run.run_id} ({run.stage}, commit {run.commit[:12]}) reproduced as run {new_id} "
            f"in DVC experiment {experiment} (dvc exp show -A)")
    return agreed, "\n".join([head, table(rows), last])


def _env() -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter's tools first, no DVC variables of an enclosing run,
    and one execution id for the upstream repro and the experiment."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[tracking.EXECUTION_ID_ENV] = uuid.uuid4().hex[:12]
    return env


WORKTREE_APPLIED = "Experiment results have been applied to your workspace"


def _dvc(workspace: Path, *args: str, env: dict[str, str], check: bool = True) -> None:
    """`dvc ARGS` in the worktree, its output passed on to stderr as it comes; a failure names its last error."""
    _say(f"$ dvc {' '.join(args)}")
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workspace, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for line in process.stdout:
            if line.startswith(WORKTREE_APPLIED):  # DVC speaks of its workspace: the worktree, not the user's
                line = "Experiment results have been applied to the temporary worktree (this workspace is untouched).\n"
            sys.stderr.write(line)
            tail.append(line.strip())
    if check and process.returncode != 0:
        errors = [line for line in tail if line.startswith("ERROR")] or [line for line in tail if line] or ["?"]
        raise ReproduceError(f"`dvc {' '.join(args)}` failed (exit {process.returncode}): {errors[-1]}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a stage run's id, or a stage name: the run its metrics/<stage>.json names, else "
                        "its latest")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ for finding the run "
                        "(e.g. tracking.uri=...)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest |difference| of an accuracy that agrees (default: tracking.reproduce_tolerance)")
    args = parser.parse_args(argv)
    try:
        agreed, report = reproduce(args.run, args.tolerance, args.overrides)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
