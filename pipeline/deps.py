"""The code a stage runs: every module of the `pipeline` package that `pipeline/stages/<stage>.py` imports, directly
or through other modules, found by compiling the source (nothing is imported). DVC's deps of the stage must list
exactly these (tests/test_deps.py), and the stage's resumable state is keyed by their digest, so that neither a
stale output nor an old run's weights outlive a change of the code that made them.

The imports are read from the compiled bytecode, not from `ast.parse`: CPython 3.11 counts the depth of the AST
objects that `ast.parse` builds in one counter per interpreter, not per thread, so a parse on another thread at the
same time fails one of them with "SystemError: AST constructor recursion depth mismatch", and a stage computes its
digest while its tracking thread imports MLflow (whose pydantic models call `inspect.signature`, which parses).
"""

from __future__ import annotations

import dis
import hashlib
import types
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent.parent  # the repository root: the paths returned are relative to it


def stage_modules(stage: str, root: Path | None = None) -> list[Path]:
    """Repo-relative paths of the stage's module and of every `pipeline` module it imports, directly or through
    other modules (imports inside functions too), with the `__init__.py` of each package on the way, sorted."""
    root = ROOT if root is None else root
    start = f"{PACKAGE}.stages.{stage}"
    if _module_file(start, root) is None:
        raise FileNotFoundError(f"no stage module {start} under {root}")
    seen: dict[str, Path] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or (path := _module_file(name, root)) is None:
            continue
        seen[name] = path
        todo.extend(_parents(name))
        todo.extend(_imported(path, name, root))
    return sorted(path.relative_to(root) for path in seen.values())


def code_digest(stage: str, root: Path | None = None) -> str:
    """A short sha256 of the stage's modules (their paths and bytes, sorted by path): to key resumable state."""
    root = ROOT if root is None else root
    digest = hashlib.sha256()
    for path in stage_modules(stage, root):
        digest.update(f"{path.as_posix()}\0".encode())
        digest.update((root / path).read_bytes())
    return digest.hexdigest()[:16]


def _module_file(name: str, root: Path) -> Path | None:
    """The file of module `name` of the package (a module, or a package's `__init__.py`), or None."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(name: str) -> list[str]:
    """The packages Python imports before module `name`: `a.b.c` -> `a`, `a.b`."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(path: Path, name: str, root: Path) -> list[str]:
    """Names of the modules (of any package) that the module at `path` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for module, level, names in _import_statements(compile(path.read_bytes(), str(path), "exec", dont_inherit=True)):
        base = _absolute(module, level, package)
        found.append(base)
        # `from pipeline import tracking` imports the module pipeline/tracking.py
        found += [f"{base}.{alias}" for alias in names if alias != "*" and _module_file(f"{base}.{alias}", root)]
    return found


def _import_statements(code: types.CodeType) -> Iterator[tuple[str, int, tuple[str, ...]]]:
    """(module, level, from-names) of every import in `code` and the functions and classes compiled into it: an
    import compiles to `LOAD_CONST level; LOAD_CONST from-names (None for a plain import); IMPORT_NAME module`."""
    instructions = list(dis.get_instructions(code))
    for i, instruction in enumerate(instructions):
        if instruction.opname == "IMPORT_NAME":
            level, names = instructions[i - 2].argval, instructions[i - 1].argval
            yield instruction.argval, level, names or ()
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _import_statements(const)


def _absolute(module: str, level: int, package: str) -> str:
    """The absolute name of `from <dots><module> import ...` written in `package`."""
    if level == 0:
        return module
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))
