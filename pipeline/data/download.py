"""Fetch data set files from an ordered list of sources, verified by checksum, written atomically.

A source is a local directory or an http(s)/file URL base; each file is tried at every source in turn
(as `<name>.gz`, then `<name>`), with retries for network sources. Files are stored uncompressed and
verified by the sha256 of their content, which is the same whichever mirror (or recompression) they
came from; where only the official archive's md5 is known, that is checked and the content's sha256
is recorded. A file already present with the right digest is not fetched again.

`SHA256SUMS` (for `sha256sum -c`) holds the content digests; `SOURCES.json` says what each was verified
against: the data set's name and the checksums configured for the file. A recorded digest vouches for a
file only while both match the current config: MNIST and Fashion-MNIST share file names, and MNIST has no
content sha256 in its config, so a digest recorded for one data set must never pass the other's files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import DataError
from pipeline.files import atomic_path, file_digest, write_json
from pipeline.schema import DataConfig, SourceFile

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
SOURCES_FILE = "SOURCES.json"
_CHUNK = 1 << 20


class SourceFailed(Exception):
    """One source could not deliver one file; the next source is tried."""


class NotThere(SourceFailed):
    """The source answered that it does not have the file: retrying will not help."""


def sources_of(data: DataConfig) -> list[str]:
    """The places to try, in order: `data.source` first, then the mirrors."""
    return ([data.source] if data.source else []) + list(data.mirrors)


def is_url(source: str) -> bool:
    return source.split("://", 1)[0] in ("http", "https", "file") and "://" in source


def fetch_files(data: DataConfig, dest: Path, backoff_s: float = 1.0) -> dict[str, str]:
    """Make `dest` hold exactly the data set's files, verified; return {file name: content sha256}."""
    dest.mkdir(parents=True, exist_ok=True)
    recorded = read_sources(dest / SOURCES_FILE, data.name)
    sums: dict[str, str] = {}
    for spec in data.files.values():
        target = dest / spec.name
        expected = spec.sha256 or _trusted(recorded.get(spec.name), spec)
        if target.is_file() and expected and file_digest(target) == expected:
            log.info("%s: already present and verified", target)
            sums[spec.name] = expected
            continue
        sums[spec.name] = _fetch_from_any(data, spec, target, backoff_s)
    write_sums(dest / SUMS_FILE, sums)
    write_json(dest / SOURCES_FILE, {"data": data.name, "files": {
        spec.name: {"sha256": sums[spec.name], "verified_against": _checksums(spec)} for spec in data.files.values()}})
    remove_strays(dest, keep=set(sums) | {SUMS_FILE, SOURCES_FILE})
    return sums


def _checksums(spec: SourceFile) -> dict[str, str | None]:
    """What the config says a file is verified against."""
    return {"sha256": spec.sha256, "md5": spec.md5}


def _trusted(entry: dict | None, spec: SourceFile) -> str | None:
    """The content sha256 recorded for the file, if it was verified against the checksums configured now."""
    return entry["sha256"] if entry and entry.get("verified_against") == _checksums(spec) else None


def read_sources(path: Path, data_name: str) -> dict[str, dict]:
    """The `SOURCES.json` entries by file name ({sha256, verified_against}), if they were recorded for the data set
    `data_name`; none otherwise (no manifest: a workspace of an older version, whose digests say not what for)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return manifest.get("files", {}) if manifest.get("data") == data_name else {}


def _fetch_from_any(data: DataConfig, spec: SourceFile, target: Path, backoff_s: float) -> str:
    failures = []
    for source in sources_of(data):
        try:
            digest = _fetch_from(source, spec, target, data.retries, data.timeout_s, backoff_s)
        except SourceFailed as e:
            log.warning("%s: %s", source, e)
            failures.append(f"{source}: {e}")
            continue
        log.info("%s: fetched from %s (sha256 %s)", target, source, digest[:12])
        return digest
    hint = f"install the Debian package ({data.apt_package}) or " if data.apt_package else ""
    tried = "; ".join(failures) or "no sources configured"
    raise DataError(f"could not get {spec.name} of {data.name} from any source ({tried}). "
                    f"To fix: {hint}point data.source at a directory holding {spec.name}[.gz]")


def _fetch_from(source: str, spec: SourceFile, target: Path, retries: int, timeout_s: float,
                backoff_s: float) -> str:
    """Fetch one file from one source; return the content's sha256 or raise `SourceFailed`."""
    if not is_url(source):
        for candidate in (Path(source) / (spec.name + suffix) for suffix in (".gz", "")):
            if candidate.is_file():
                return _install(candidate, spec, target)
        raise SourceFailed(f"no {spec.name}[.gz] there")
    return retrying(lambda: _fetch_url_once(source, spec, target, timeout_s), retries, backoff_s)


def retrying(attempt, retries: int, backoff_s: float):
    """Call `attempt` until it succeeds, up to `retries` times with exponential backoff; not on `NotThere`."""
    for number in range(1, retries + 1):
        try:
            return attempt()
        except NotThere:
            raise
        except SourceFailed as e:
            reason = str(e)
        if number < retries:
            log.info("%s (attempt %d of %d); retrying", reason, number, retries)
            time.sleep(backoff_s * 2 ** (number - 1))
    raise SourceFailed(f"{reason} (after {retries} attempts)")


def _fetch_url_once(source: str, spec: SourceFile, target: Path, timeout_s: float) -> str:
    missing = []
    for name in (spec.name + ".gz", spec.name):
        url = source.rstrip("/") + "/" + name
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
            local = Path(tmp) / name
            try:
                download(url, local, timeout_s)
            except NotThere as e:
                missing.append(str(e))
                continue
            return _install(local, spec, target)
    raise NotThere(f"not found: {', '.join(missing)}")


def download(url: str, dest: Path, timeout_s: float) -> None:
    """Stream `url` into `dest`; a short read fails, so a partial body never passes as complete."""
    request = urllib.request.Request(url, headers={"User-Agent": "pipeline-download"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, dest.open("wb") as out:
            expected = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as e:
        raise (NotThere if e.code == 404 else SourceFailed)(f"HTTP {e.code} for {url}") from None
    except (OSError, http.client.HTTPException) as e:  # refused, unreachable, timed out, cut short
        raise SourceFailed(f"{url}: {type(e).__name__}: {e}") from None
    if expected is not None and size != int(expected):
        raise SourceFailed(f"{url}: incomplete transfer, {size} of {expected} bytes")


def _install(candidate: Path, spec: SourceFile, target: Path) -> str:
    """Decompress `candidate` into `target` atomically if its checksum matches; return the sha256."""
    compressed = candidate.suffix == ".gz"
    with atomic_path(target) as tmp:
        sha256 = hashlib.sha256()
        try:
            with (gzip.open if compressed else open)(candidate, "rb") as src, tmp.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    sha256.update(chunk)
                    out.write(chunk)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceFailed(f"{candidate.name} is not readable: {e}") from None
        _verify(candidate, compressed, sha256.hexdigest(), spec)
    return sha256.hexdigest()


def _verify(candidate: Path, compressed: bool, sha256: str, spec: SourceFile) -> None:
    if spec.sha256:
        if sha256 != spec.sha256:
            raise SourceFailed(f"{candidate.name}: checksum mismatch (content sha256 {sha256[:12]}..., "
                                f"expected {spec.sha256[:12]}...)")
    elif not compressed:
        raise SourceFailed(f"{candidate.name}: only the md5 of the official .gz is known, cannot verify")
    elif (md5 := file_digest(candidate, "md5")) != spec.md5:
        raise SourceFailed(f"{candidate.name}: checksum mismatch (md5 {md5}, expected {spec.md5})")


def read_sums(path: Path) -> dict[str, str]:
    """Parse a `sha256sum`-style file into {name: digest}; missing file: empty."""
    if not path.is_file():
        return {}
    pairs = (line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {name.lstrip("*"): digest for digest, name in pairs}


def write_sums(path: Path, sums: dict[str, str]) -> None:
    """Write {name: digest} in `sha256sum` format, so `sha256sum -c SHA256SUMS` checks the files."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())), encoding="utf-8")


def remove_strays(directory: Path, keep: Iterable[str]) -> None:
    """Delete entries of `directory` not in `keep` (files of another data set, leftovers)."""
    keep = set(keep)
    for entry in directory.iterdir():
        if entry.name not in keep:
            log.info("removing %s: not part of this data set", entry)
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
