"""dvc.yaml's code deps are exactly the modules each stage imports, and a stage's code digest follows its code."""

from __future__ import annotations

import ast
import copy
import gc
import re
import threading

import pytest
import yaml

from pipeline import deps
from tests.conftest import REPO, append

STAGE_CMD = re.compile(r"python -m pipeline\.stages\.(\w+)\b")


def dep_mismatches(stages: dict) -> list[str]:
    """One line per stage of a parsed dvc.yaml `stages:` whose `pipeline/` deps differ from the modules its
    module imports, directly or through others: the stage, and the missing and extra files."""
    lines = []
    for name, stage in stages.items():
        if not (match := STAGE_CMD.match(stage.get("cmd", ""))):
            lines.append(f"{name}: cmd is not `python -m pipeline.stages.<module>`, so its code is unknown")
            continue
        listed = {dep for dep in stage.get("deps", []) if dep.startswith("pipeline/")}
        imported = {path.as_posix() for path in deps.stage_modules(match.group(1))}
        if missing := sorted(imported - listed):
            lines.append(f"{name}: missing {', '.join(missing)}")
        if extra := sorted(listed - imported):
            lines.append(f"{name}: not imported, yet listed {', '.join(extra)}")
    return lines


@pytest.fixture(scope="module")
def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_the_modules_it_imports(stages):
    assert not (lines := dep_mismatches(stages)), "dvc.yaml deps are out of date:\n" + "\n".join(lines)


def test_a_missing_or_extra_dep_is_named(stages):
    changed = copy.deepcopy(stages)
    changed["cnn"]["deps"].remove("pipeline/data/split.py")
    changed["report"]["deps"].append("pipeline/ui.py")
    assert dep_mismatches(changed) == ["cnn: missing pipeline/data/split.py",
                                       "report: not imported, yet listed pipeline/ui.py"]


def test_imports_are_followed_through_modules_and_functions():
    modules = {path.as_posix() for path in deps.stage_modules("cnn")}
    assert {"pipeline/stages/cnn.py", "pipeline/stages/__init__.py", "pipeline/__init__.py",  # the packages too
            "pipeline/models/cnn.py", "pipeline/models/__init__.py",  # from pipeline.models.cnn import ...
            "pipeline/tracking.py",  # from pipeline import tracking (in cli.py)
            "pipeline/data/split.py", "pipeline/data/idx.py",  # through training.py, then data/split.py
            "pipeline/deps.py"} <= modules  # imported by training.py
    assert "pipeline/models/transfer.py" not in modules and "pipeline/ui.py" not in modules


def test_code_digest_changes_with_the_stages_code_only(code_copy):
    before = {stage: deps.code_digest(stage) for stage in ("cnn", "transfer")}
    assert before == {stage: deps.code_digest(stage, REPO) for stage in before}  # the same bytes, the same digest
    append(code_copy / "pipeline/models/transfer.py", "# a fix\n")
    after = {stage: deps.code_digest(stage) for stage in before}
    assert after["cnn"] == before["cnn"] and after["transfer"] != before["transfer"]


def test_relative_and_package_imports(tmp_path):
    package = tmp_path / "pipeline"
    for path, text in {"__init__.py": "", "stages/__init__.py": "", "stages/s.py": "from ..sub import a\n",
                       "sub/__init__.py": "from . import b\n", "sub/a.py": "def f():\n    from .c import x\n",
                       "sub/b.py": "class B:\n    from . import d\n", "sub/c.py": "import os\n", "sub/d.py": "",
                       "unused.py": ""}.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(text)
    assert [p.as_posix() for p in deps.stage_modules("s", tmp_path)] == [
        "pipeline/__init__.py", "pipeline/stages/__init__.py", "pipeline/stages/s.py", "pipeline/sub/__init__.py",
        "pipeline/sub/a.py", "pipeline/sub/b.py", "pipeline/sub/c.py", "pipeline/sub/d.py"]


class _Finalised:
    """Garbage with Python code in its finaliser, freed by the cyclic collector: where another thread can take the
    interpreter in the middle of building an AST."""

    def __init__(self):
        self.me = self

    def __del__(self):
        pass


def test_reading_imports_leaves_a_parse_on_another_thread_alone():
    """A stage reads its imports while its tracking thread imports MLflow, which parses (`inspect.signature`):
    CPython 3.11 counts `ast.parse`'s depth per interpreter, so two parses at once failed one of them with
    SystemError ("AST constructor recursion depth mismatch"). Forced here: collections during the other parse."""
    source, parsed, errors, stop = (REPO / "pipeline/training.py").read_text(), [], [], threading.Event()

    def parse_with_garbage():
        while not stop.is_set():
            garbage = [_Finalised() for _ in range(50)]
            del garbage
            try:
                parsed.append(ast.parse(source) is not None)
            except SystemError as error:
                errors.append(error)

    threshold = gc.get_threshold()
    gc.set_threshold(200)
    other = threading.Thread(target=parse_with_garbage, daemon=True)
    other.start()
    try:
        while not parsed and other.is_alive():  # until the other thread is parsing
            pass
        deps.stage_modules("transfer")
    finally:
        stop.set()
        other.join()
        gc.set_threshold(*threshold)
    assert errors == []
