"""Writing outputs so that a failure never leaves a half-written file or loses what was there."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil


@contextlib.contextmanager
def atomic_path(dest: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or directory) beside `dest`; move it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dest)
    # keep the destination's suffixes: some writers choose the format by them (Model.save, DVC's dumpers) or insist
    # on them (Model.save_weights: `.weights.h5`)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix="".join(dest.suffixes) or ".tmp",
                                dir=dest.parent))
    if directory:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs get the usual permissions
    else:
        tmp.rmdir()
    try:
        yield tmp
        if directory and dest.is_dir():  # os.replace cannot replace a non-empty directory
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def remove_orphans(dest: Path) -> None:
    """Remove the temporary files of `dest` left by a process killed while writing it (named after its pid)."""
    for orphan in dest.parent.glob(f".{glob.escape(dest.name)}.*"):
        pid = orphan.name[len(dest.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(orphan) if orphan.is_dir() else orphan.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()
