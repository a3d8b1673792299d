"""Fetching npm package tarballs with the npm client, and checking them.

`npm pack NAME@VERSION` downloads the registry's tarball; it is accepted only when its sha512
matches the `dist.integrity` that `npm view NAME@VERSION dist.integrity` reports (and the value
pinned below, where there is one). Each tarball's sha256 and integrity are recorded in
`<downloads>/<file>.json`; a cached tarball is re-hashed and compared with that record before
it is used again, so a later run needs no network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from limoe.data.iconify_sets import pinned_integrity

# dist.integrity as published (npm view NAME@VERSION dist.integrity), checked on every download.
PINNED_INTEGRITY = {
    "emoji-datasource-google@16.0.0":
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "emoji-datasource-twitter@16.0.0":
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "emojibase-data@17.0.0":
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    "@tabler/icons-png@3.48.0":
        "sha512-7tZrPHDh+PaTFgKOuPqM3hFb1X32tTH8CKIiyetXPQDpsQgj7sHJ4RJpN6V8rw1chp+ISX8XKnvrYiN+UiNavg==",
    "@tabler/icons@3.48.0":
        "sha512-lQk06gVHNVBnJp0UOgtth54mcZBJM7rdYKsAxKOProj1bbSAx+/xiuOWfHlyvgdL3M+Y+I0HINrjHa3ygp8eXQ==",
    # ... and every @iconify-json/<prefix>@<version> of the emoji_art and iconsets sources, pinned
    # with its set's licence record in limoe/data/iconify_sets.py.
    **pinned_integrity(),
}

_ALGOS = {"sha512": hashlib.sha512, "sha384": hashlib.sha384, "sha256": hashlib.sha256, "sha1": hashlib.sha1}


class IntegrityError(RuntimeError):
    """A downloaded file does not match its published hash."""


def _digest(data: bytes | str | Path, algo: str) -> bytes:
    h = _ALGOS[algo]()
    if isinstance(data, (bytes, bytearray)):
        h.update(data)
    else:
        with open(data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.digest()


def sri(data: bytes | str | Path, algo: str = "sha512") -> str:
    """Subresource-integrity string ("sha512-<base64 digest>") of bytes or a file, as npm writes it."""
    return f"{algo}-{base64.b64encode(_digest(data, algo)).decode('ascii')}"


def sha256_hex(data: bytes | str | Path) -> str:
    return _digest(data, "sha256").hex()


def verify_integrity(data: bytes | str | Path, integrity: str) -> bool:
    """True when the bytes (or file) match an SRI string. Several space-separated hashes may be
    given (as npm allows); the strongest algorithm present decides."""
    entries = []
    for token in integrity.split():
        algo, _, value = token.partition("-")
        if algo in _ALGOS and value:
            entries.append((list(_ALGOS).index(algo), algo, value.split("?")[0]))
    if not entries:
        raise ValueError(f"no supported hash in integrity string {integrity!r}")
    best = min(e[0] for e in entries)
    digest = None
    for rank, algo, value in entries:
        if rank == best:
            digest = digest or base64.b64encode(_digest(data, algo)).decode("ascii")
            if digest == value:
                return True
    return False


def _npm(*args: str, cwd: str | Path | None = None, timeout: float = 600) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the npm client is needed to fetch this source (apt-get install npm)")
    out = subprocess.run([npm, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"npm {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def npm_view_integrity(spec: str) -> str:
    """`npm view NAME@VERSION dist.integrity` (the registry's published sha512)."""
    value = _npm("view", spec, "dist.integrity", timeout=120).strip().strip("'\"")
    if not value.startswith("sha"):
        raise RuntimeError(f"npm view {spec} dist.integrity gave {value!r}")
    return value


def fetch_npm(spec: str, downloads: str | Path, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """The tarball of an exact npm package version, fetched once with `npm pack` and verified.

    Returns a record {package, file (absolute path), bytes, sha256, integrity, seconds, cached}."""
    downloads = Path(downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.rpartition("@")
    if not name or not version:
        raise ValueError(f"npm spec must be NAME@VERSION, not {spec!r}")
    filename = f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    target, record_path = downloads / filename, downloads / f"{filename}.json"
    if not force and target.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        t0 = time.perf_counter()
        if record.get("sha256") == sha256_hex(target) and verify_integrity(target, record["integrity"]):
            return {**record, "file": str(target), "cached": True, "verify_seconds": round(time.perf_counter() - t0, 2)}
        log(f"{filename}: cached tarball does not match its record; fetching it again")

    t0 = time.perf_counter()
    published = npm_view_integrity(spec)
    pinned = PINNED_INTEGRITY.get(spec)
    if pinned is not None and pinned != published:
        raise IntegrityError(f"{spec}: the registry's integrity {published} differs from the pinned {pinned}")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".npm-pack-") as tmp:
        log(f"npm pack {spec} ...")
        out = _npm("pack", spec, "--json", "--ignore-scripts", "--pack-destination", tmp, cwd=tmp)
        packed = json.loads(out)[0]
        got = Path(tmp) / packed["filename"]
        if not verify_integrity(got, published):
            raise IntegrityError(f"{spec}: tarball sha512 {sri(got)} does not match the published {published}")
        os.replace(got, target)
    record = {"package": spec, "file": filename, "bytes": target.stat().st_size, "sha256": sha256_hex(target),
              "integrity": published, "integrity_verified": True,
              "seconds": round(time.perf_counter() - t0, 2)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"npm pack {spec}: {record['bytes'] / 1e6:.1f} MB in {record['seconds']:.1f}s, integrity verified")
    return {**record, "file": str(target), "cached": False}


def fetch_packages(specs: dict[str, str], downloads: str | Path, log: Callable[[str], None] = print
                   ) -> tuple[dict[str, str], list[dict]]:
    """fetch_npm for each {key: spec}: the tarball paths by key, and what was fetched (for SOURCE.json)."""
    tarballs, records = {}, []
    for key, spec in specs.items():
        rec = fetch_npm(spec, downloads, log=log)
        tarballs[key] = rec["file"]
        records.append({k: v for k, v in rec.items() if k != "file"} | {"file": Path(rec["file"]).name})
    return tarballs, records


def iter_tar(path: str | Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files of a (gzipped) tarball for which wanted(name),
    in archive order, streaming (one pass)."""
    import tarfile

    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if m.isfile() and wanted(m.name):
                f = tar.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def read_tar_member(path: str | Path, name: str) -> bytes:
    for _, data in iter_tar(path, lambda n: n == name):
        return data
    raise FileNotFoundError(f"{name} is not in {path}")


__all__ = [
    "PINNED_INTEGRITY",
    "IntegrityError",
    "fetch_npm",
    "iter_tar",
    "npm_view_integrity",
    "read_tar_member",
    "sha256_hex",
    "sri",
    "verify_integrity",
]
